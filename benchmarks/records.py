"""What a cell records: what the model writes while lmms-eval runs it (`Recorder`), per-sample records (token traces
joined with lmms-eval's scores, FLOPs), flat summary rows with the cell's means and medians, and the run's
provenance."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import ClassVar

import lmms_eval
import torch
import transformers

from benchmarks.defaults import REPO
from benchmarks.distributed import World, launched_world_size
from benchmarks.plan import Cell, RunConditions
from benchmarks.stats import CI_METHOD, mean_ci
from flops.analytic import conversation_kv_bytes, count, later_turns, model_shape
from methods import TokenReducer
from methods.budget import Budget


@dataclass
class Recorder:
    """What the model records while lmms-eval evaluates a cell, besides lmms-eval's own sample logs. The runner owns
    it and hands it to the model (`ReducedLMM.recorder`), which writes to it (lm-eval's `set_cache_hook` shape);
    `take` hands the runner one cell's records and starts the next cell empty.

    Attributes:
        samples: (task, doc_id) -> the sample's token trace (`TokenTrace.sample`) and per-sample times.
        batches: per batch, in run order: its `per_sample_ms` times.
        pictures: (task, doc_id) -> {"image", "question", "grid"}: the image the patches were cut from, for the docs
            below `picture_docs` (the token-selection pictures).
        peak_bytes: the cell's peak memory, set by the runner.
    """

    samples: dict[tuple[str, int], dict] = field(default_factory=dict)
    batches: list[dict] = field(default_factory=list)
    pictures: dict[tuple[str, int], dict] = field(default_factory=dict)
    peak_bytes: int = 0

    picture_docs: ClassVar[int] = 4  # docs 0..3 of each task keep their model-input image

    def wants_picture(self, task: str, doc_id: int) -> bool:
        return doc_id < self.picture_docs and (task, doc_id) not in self.pictures

    def take(self, world: World) -> Recorder:
        """This cell's records, and an empty recorder for the next cell. Several processes (a collective call): rank
        0 gets every process's samples and pictures, its own batches followed by each other process's without its
        warm-up (first) batch (`cell_times` leaves out the first batch, so every warm-up is left out), and the
        largest peak memory of any process; the other ranks get their own records."""
        parts = world.gather(self)
        out = Recorder(dict(self.samples), list(self.batches), dict(self.pictures),
                       max(part.peak_bytes for part in parts))
        if world.is_main:
            for part in parts[1:]:
                out.samples.update(part.samples)
                out.batches.extend(part.batches[1:] if len(part.batches) > 1 else part.batches)
                for key, pic in part.pictures.items():
                    out.pictures.setdefault(key, pic)
        self.samples, self.batches, self.pictures, self.peak_bytes = {}, [], {}, 0
        return out


def provenance(run: RunConditions, device: str, config: str | None = None) -> dict:
    """What every row of a run shares: its settings and dtype as run (`run`, computed once by the plan), the device
    `device` by name, the sweep config file it came from (`config`), the code and library versions."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=5).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        sha += "-dirty" if dirty and sha != "unknown" else ""  # uncommitted changes to tracked files
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    if device.startswith("cuda"):
        dev = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    else:
        dev = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    if launched_world_size() > 1:
        dev += f" x {launched_world_size()} processes"
    return {
        "model": run.model,
        "limit": run.limit,
        "seed": run.seed,
        "batch_size": run.batch_size,
        "device": dev,
        "dtype": run.dtype,
        "config": config,
        "git_sha": sha,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "lmms_eval_version": getattr(lmms_eval, "__version__", None) or _dist_version("lmms-eval"),
    }


def _dist_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


# what a run measures of the machine rather than computes: differs between two runs of the same cell (`--retime`
# keeps the rest; the tests of identical reruns compare everything else)
MEASURED_COLUMNS = frozenset({
    "prefill_ms_median", "decode_ms_per_token_median", "reducer_ms_median", "follow_up_prefill_ms_median",
    "prefill_ms_iqr", "decode_ms_per_token_iqr", "reducer_ms_iqr", "follow_up_prefill_ms_iqr", "timed_batches",
    "machine_load_other", "cpu_cores", "timing_reliable", "peak_memory_mb", "wall_s", "samples_per_s", "time_utc",
    "prefill_ms", "decode_ms_per_token", "reducer_ms", "follow_up_prefill_ms"})
UNRELIABLE_SPREAD = 0.25  # a timing whose interquartile range over batches exceeds this share of its median
UNRELIABLE_LOAD = 0.25  # other processes' busy threads per core, while the cell ran, above which timings compete


def cell_times(batches: list[dict], load: dict | None = None) -> dict:
    """Medians over a cell's batches of their per-sample times (`lmms_model.per_sample_ms`), after a warm-up batch,
    each with its spread (`_iqr`: the interquartile range over those batches, in ms; 0 for one batch), and whether
    the timings can be trusted (`timing_reliable`): False when the prefill's spread exceeds `UNRELIABLE_SPREAD` of its
    median or `load` (`machine_load`, from the runner) says other processes kept more than `UNRELIABLE_LOAD` of the
    cores busy.

    The first batch is the warm-up (allocator, kernel selection, caches) and is left out when there are others.
    """
    kept = batches[1:] if len(batches) > 1 else batches
    out: dict = {}
    keys = ("prefill_ms", "decode_ms_per_token", "reducer_ms") + (
        ("follow_up_prefill_ms",) if any("follow_up_prefill_ms" in b for b in kept) else ())  # a conversation task's
    for k in keys:
        values = [b[k] for b in kept if b.get(k) is not None]
        out[f"{k}_median"] = round(statistics.median(values), 4) if values else None
        if len(values) > 1:
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
            out[f"{k}_iqr"] = round(q3 - q1, 4)
        else:
            out[f"{k}_iqr"] = 0.0 if values else None
    out["timed_batches"] = len(kept)
    load = load or {}
    out |= load
    median, iqr = out["prefill_ms_median"], out["prefill_ms_iqr"]
    spread_ok = median is None or not median or iqr <= UNRELIABLE_SPREAD * median
    load_ok = (load.get("machine_load_other") or 0) <= UNRELIABLE_LOAD * (load.get("cpu_cores") or 1)
    out["timing_reliable"] = bool(spread_ok and load_ok)
    return out


def machine_load(wall_s: float, cpu_s: float, load_after: float | None) -> dict:
    """How busy the machine was besides this process while a cell ran: the 1-minute load average at its end (busy and
    waiting threads) less this process's own CPU use over the cell (`cpu_s` / `wall_s`, in cores), floored at 0, as
    `machine_load_other`; `cpu_cores` the machine's. A lagging average: a cell of a few seconds after a busy minute
    reads busy too, which errs on the side of distrust. None where the OS gives no load average."""
    own = cpu_s / wall_s if wall_s > 0 else 0.0
    other = None if load_after is None else round(max(0.0, load_after - own), 2)
    return {"machine_load_other": other, "cpu_cores": os.cpu_count()}


def peak_rss() -> int:
    """Bytes: this process's peak resident set so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def primary_metric(res: dict, task: str) -> str | None:
    """The task's main metric: the first of its lmms-eval `metric_list`."""
    return (res["configs"][task].get("metric_list") or [{}])[0].get("metric")


def cache_value_bytes(config) -> int:
    """Bytes per cached key or value: the loaded model's dtype (its config's `dtype`; float32 when it names none)."""
    dtype = getattr(config, "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    return torch.finfo(dtype).bits // 8 if isinstance(dtype, torch.dtype) and dtype.is_floating_point else 4


def sample_records(res: dict, cell: Cell, traces: dict[tuple[str, int], dict], config) -> list[dict]:
    """One record per scored doc: lmms-eval's prediction and score joined with the model's token trace and MACs.

    When the doc records which patches its question is about (`relevant_patches`, the synthetic benchmark does),
    the record also says how well the kept patches cover them: `relevant_precision` (share of kept patches that
    are relevant) and `relevant_recall` (share of relevant patches kept). `traces`: the `Recorder.samples` of the
    cell; `config`: the checkpoint's config, for the FLOPs.
    """
    shape = model_shape(config)
    value_bytes = cache_value_bytes(config)
    primary = primary_metric(res, cell.task)
    samples = []
    for d in sorted(res["samples"][cell.task], key=lambda d: d["doc_id"]):  # several processes: rank by rank
        rec = traces.get((cell.task, d["doc_id"]), {})
        correct = d.get(primary)
        macs = count(rec, shape) if rec else None
        later = later_turns(rec, shape) if rec else []
        out = {
            "task": cell.task, "method": cell.method, "budget": cell.budget.record, "controller_seed": cell.seed,
            "conversation": cell.conversation, "doc_id": d["doc_id"],
            "prediction": d["filtered_resps"][0] if d.get("filtered_resps") else None, "target": d.get("target"),
            "correct": float(correct) if isinstance(correct, (int, float)) else None,
            **{k: v for k, v in rec.items() if k != "reducer_macs"},  # the trace; its MACs as `reducer_gflops`
            "prefill_gflops": None if macs is None else round(2 * macs.prefill / 1e9, 6),
            "llm_prefill_gflops": None if macs is None else round(2 * macs.llm_prefill / 1e9, 6),
            "reducer_gflops": None if macs is None else round(2 * macs.reducer / 1e9, 6),
            "total_gflops": None if macs is None else round(2 * (macs.total + sum(m.total for m in later)) / 1e9, 6),
            "kv_cache_mb": None if macs is None else round(conversation_kv_bytes(rec, shape, value_bytes) / 2**20, 4),
        }
        if "follow_ups" in rec:  # a conversation: its later turns' FLOPs (in `total_gflops` too; `prefill_gflops` is
            # the first turn's); `kv_cache_mb` is the cache after its last turn
            out["follow_up_prefill_gflops"] = round(2 * sum(m.prefill for m in later) / 1e9, 6)
            out["follow_up_gflops"] = round(2 * sum(m.total for m in later) / 1e9, 6)
        relevant = (d.get("doc") or {}).get("relevant_patches")
        if relevant is not None and rec:
            kept = kept_patches(rec, rec, shape)
            hit = len(kept & set(relevant))
            out["relevant_precision"] = round(hit / len(kept), 4) if kept else None
            out["relevant_recall"] = round(hit / len(relevant), 4) if relevant else None
        ups = (d.get("doc") or {}).get("follow_ups") or []
        if ups and rec.get("follow_ups"):  # the second question's patches among those its turn saw
            seen = rec["follow_ups"][0] if "kept_indices" in rec["follow_ups"][0] else rec  # re-prune: its own
            kept = kept_patches(seen, rec, shape)
            relevant = set(ups[0]["relevant_patches"])
            out["relevant_recall_turn2"] = round(len(kept & relevant) / len(relevant), 4) if relevant else None
        samples.append(out)
    return samples


def kept_patches(trace: dict, rec: dict, shape) -> set[int]:
    """The patch indices a turn's `trace` kept (`kept_indices`; None: every one of the image's visual tokens, counted
    from the sample's record `rec`), as `relevant_patches` index them."""
    return set(range(shape.image_tokens(rec))) if trace["kept_indices"] is None else set(trace["kept_indices"])


def cell_records(evaluated, cell: Cell, reducer: TokenReducer, rec: Recorder, config, prov: dict
                 ) -> tuple[list[dict], list[dict]]:
    """A finished cell's summary rows and sample records, from lmms-eval's results (`runner.Evaluated`), the model's
    records of the cell (`Recorder.take`) and the run's provenance; `config`: the checkpoint's, for the FLOPs."""
    samples = sample_records(evaluated.results, cell, rec.samples, config)
    times = cell_times(rec.batches, evaluated.load) | {"peak_memory_mb": round(rec.peak_bytes / 2**20, 1)}
    rows = summary_rows(evaluated.results, cell, samples, reducer, evaluated.wall_s, {**times, **prov})
    return rows, samples


def budget_tokens(budget: Budget, visual_tokens_mean: float | None) -> float | None:
    """A cell's number to order and plot by (`budget_tokens`): its budget where that is a number (a count, a share,
    every token), else the visual tokens it kept on average (`auto`, a method's own count)."""
    return budget.record if budget.is_number else visual_tokens_mean


def summary_rows(res: dict, cell: Cell, samples: list[dict], reducer: TokenReducer, wall: float,
                 prov: dict) -> list[dict]:
    """One flat row per metric of the cell, with the cell's token, FLOPs and timing means."""

    def mean_of(key: str, digits: int = 3) -> float | None:
        return _mean([s[key] for s in samples if s.get(key) is not None], digits)

    visual = [s["visual_tokens"] for s in samples if "visual_tokens" in s]
    common = {
        "task": cell.task, "method": cell.method, "budget": cell.budget.record, "controller_seed": cell.seed,
        "conversation": cell.conversation, "budget_tokens": budget_tokens(cell.budget, _mean(visual)),
        "visual_tokens_mean": _mean(visual), "visual_tokens_max": max(visual) if visual else None,
        "visual_tokens_layer_mean": _mean([sum(v) / len(v) for s in samples
                                           if (v := s.get("visual_tokens_per_layer"))]),
        "llm_prefill_tokens_mean": _mean([s["llm_tokens_per_layer"][0] for s in samples
                                          if "llm_tokens_per_layer" in s]),
        "generated_tokens_mean": mean_of("generated_tokens"),
        "kv_cache_mb_mean": mean_of("kv_cache_mb", digits=4),
        **{f"{k}_gflops_mean": mean_of(f"{k}_gflops", digits=6)
           for k in ("prefill", "llm_prefill", "reducer", "total")},
        "relevant_precision_mean": mean_of("relevant_precision", digits=4),
        "relevant_recall_mean": mean_of("relevant_recall", digits=4),
        **({"follow_up_prefill_gflops_mean": mean_of("follow_up_prefill_gflops", digits=6),
            "follow_up_gflops_mean": mean_of("follow_up_gflops", digits=6),
            "relevant_recall_turn2_mean": mean_of("relevant_recall_turn2", digits=4)}
           if cell.conversation else {}),
        "wall_s": round(wall, 3), "samples_per_s": round(len(samples) / wall, 3) if wall > 0 else None,
        "method_args": json.dumps(reducer.method_args, sort_keys=True),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **prov,
    }
    docs = res["samples"][cell.task]
    primary = primary_metric(res, cell.task)
    rows = []
    for key, value in res["results"][cell.task].items():
        metric, _, _ = key.partition(",")
        if metric == "alias" or "_stderr" in metric or not isinstance(value, (int, float)):
            continue
        scored = sum(1 for d in docs if d.get(metric) is not None)  # per-type metrics: None on other types' docs
        n = scored if any(metric in d for d in docs) else res["n-samples"][cell.task]["effective"]
        rows.append({**common, "metric": metric, "value": float(value), "primary": metric == primary, "n": n,
                     **metric_ci(docs, metric, float(value))})
    return rows


def metric_ci(docs: list[dict], metric: str, value: float) -> dict:
    """`ci95_low`, `ci95_high` and `ci_method` of a metric that is the mean of its per-question scores
    (`stats.mean_ci`); empty for a metric lmms-eval aggregates otherwise (a sum, a per-category score), which a
    bootstrap of the mean would misstate."""
    scores = [float(d[metric]) for d in docs if isinstance(d.get(metric), (int, float))]  # None: not this type's
    ci = mean_ci(scores) if scores and abs(sum(scores) / len(scores) - value) < 1e-9 else None
    if ci is None:
        return {"ci95_low": None, "ci95_high": None, "ci_method": None}
    return {"ci95_low": round(ci[0], 6), "ci95_high": round(ci[1], 6), "ci_method": CI_METHOD}


def _mean(xs: list, digits: int = 3) -> float | None:
    return round(sum(xs) / len(xs), digits) if xs else None
