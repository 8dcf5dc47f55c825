"""What a cell records: per-sample records (token traces joined with lmms-eval's scores, FLOPs), flat summary rows
with the cell's means and medians, and the run's provenance."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time

from benchmarks.defaults import REPO
from benchmarks.plan import Cell, RunSpec
from methods import TokenReducer


def provenance(spec: RunSpec, device: str) -> dict:
    import lmms_eval
    import torch
    import transformers

    from benchmarks.distributed import launched_world_size
    from methods.llava import resolve_dtype

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
        "model": str(spec.model),
        "limit": spec.limit,
        "seed": spec.seed,
        "batch_size": spec.batch_size,
        "device": dev,
        "dtype": str(resolve_dtype(spec.dtype, device)).removeprefix("torch."),  # as run, not "auto"
        "git_sha": sha,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "lmms_eval_version": getattr(lmms_eval, "__version__", None) or _dist_version("lmms-eval"),
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def cell_times(batches: list[dict]) -> dict:
    """Medians over a cell's batches of their per-sample times (`lmms_model.per_sample_ms`), after a warm-up batch.

    The first batch is the warm-up (allocator, kernel selection, caches) and is left out when there are others.
    """
    kept = batches[1:] if len(batches) > 1 else batches

    def median(key: str) -> float | None:
        values = [b[key] for b in kept if b[key] is not None]
        return round(statistics.median(values), 4) if values else None

    return {f"{k}_median": median(k) for k in ("prefill_ms", "decode_ms_per_token", "reducer_ms")} | {
        "timed_batches": len(kept)}


def peak_rss() -> int:
    """Bytes: this process's peak resident set so far (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def primary_metric(res: dict, task: str) -> str | None:
    """The task's main metric: the first of its lmms-eval `metric_list`."""
    return (res["configs"][task].get("metric_list") or [{}])[0].get("metric")


def sample_records(res: dict, cell: Cell, lm) -> list[dict]:
    """One record per scored doc: lmms-eval's prediction and score joined with the model's token trace and MACs.

    When the doc records which patches its question is about (`relevant_patches`, the synthetic benchmark does),
    the record also says how well the kept patches cover them: `relevant_precision` (share of kept patches that
    are relevant) and `relevant_recall` (share of relevant patches kept).
    """
    from flops.analytic import ModelShape, count

    shape = ModelShape.from_config(lm.model.config)
    primary = primary_metric(res, cell.task)
    samples = []
    for d in sorted(res["samples"][cell.task], key=lambda d: d["doc_id"]):  # several processes: rank by rank
        rec = lm.records.get((cell.task, d["doc_id"]), {})
        correct = d.get(primary)
        macs = count(rec, shape) if rec else None
        out = {
            "task": cell.task, "method": cell.method, "budget": cell.budget, "doc_id": d["doc_id"],
            "prediction": d["filtered_resps"][0] if d.get("filtered_resps") else None, "target": d.get("target"),
            "correct": float(correct) if isinstance(correct, (int, float)) else None,
            **rec,
            "prefill_gmacs": None if macs is None else round(macs.prefill / 1e9, 6),
            "llm_prefill_gmacs": None if macs is None else round(macs.llm_prefill / 1e9, 6),
            "reducer_gmacs": None if macs is None else round(macs.reducer / 1e9, 6),
            "total_gmacs": None if macs is None else round(macs.total / 1e9, 6),
        }
        relevant = (d.get("doc") or {}).get("relevant_patches")
        if relevant is not None and rec:
            kept = set(range(shape.num_patches)) if rec["kept_indices"] is None else set(rec["kept_indices"])
            hit = len(kept & set(relevant))
            out["relevant_precision"] = round(hit / len(kept), 4) if kept else None
            out["relevant_recall"] = round(hit / len(relevant), 4) if relevant else None
        samples.append(out)
    return samples


def summary_rows(res: dict, cell: Cell, samples: list[dict], reducer: TokenReducer, wall: float,
                 prov: dict) -> list[dict]:
    """One flat row per metric of the cell, with the cell's token, FLOPs and timing means."""

    def mean_of(key: str, scale: float = 1.0, digits: int = 3) -> float | None:
        return _mean([scale * s[key] for s in samples if s.get(key) is not None], digits)

    visual = [s["visual_tokens"] for s in samples if "visual_tokens" in s]
    common = {
        "task": cell.task, "method": cell.method, "budget": cell.budget,
        "visual_tokens_mean": _mean(visual), "visual_tokens_max": max(visual) if visual else None,
        "llm_prefill_tokens_mean": _mean([s["llm_tokens_per_layer"][0] for s in samples
                                          if "llm_tokens_per_layer" in s]),
        "generated_tokens_mean": mean_of("generated_tokens"),
        **{f"{k}_tflops_mean": mean_of(f"{k}_gmacs", 2e-3, 6) for k in ("prefill", "llm_prefill", "reducer", "total")},
        "relevant_precision_mean": mean_of("relevant_precision", digits=4),
        "relevant_recall_mean": mean_of("relevant_recall", digits=4),
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
        n = sum(1 for d in docs if d.get(metric) is not None) or res["n-samples"][cell.task]["effective"]
        rows.append({**common, "metric": metric, "value": float(value), "primary": metric == primary, "n": n})
    return rows


def _mean(xs: list, digits: int = 3) -> float | None:
    return round(sum(xs) / len(xs), digits) if xs else None
