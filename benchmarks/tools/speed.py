"""Speed benchmarks (scripts that print figures, not tests): do FLOPs savings become time savings, and what does the
harness itself cost?

    python -m benchmarks.tools.speed speedup   # LLaVA-1.5-7B-shaped random model, reduced depth: realised vs predicted
    python -m benchmarks.tools.speed overhead  # run_bench.py `full` vs a bare HF generate loop on the smoke model
    python -m benchmarks.tools.speed gpu       # on a CUDA machine: the prepared check (full-depth 7B, bfloat16)
    python -m benchmarks.tools.speed gpu --model-config qwen3-vl-8b   # the same check on another family

`speedup` builds LLaVA-1.5-7B's real config (4096-wide LLM, 1024-wide CLIP at 336 px, 576 patches; or
`--model-config`, any family's: `qwen2.5-vl-7b`, `qwen3-vl-8b`, whose image is `--image-size` pixels sized as its
processor sizes it) with the depths cut (`--vision-layers`, `--llm-layers`) and random weights, and for each batch size
of `--batch-sizes` times every plan entry's prefill, decoding steps (`--answer-tokens` per sample, no early stop) and
end to end: median and spread of `--repeats` rounds after a warm-up round, the entries interleaved within each round
(slow drifts of a shared machine hit all alike). Per entry it prints the KV cache per sample (analytic), the peak
memory (CUDA only), realised / FLOPs-predicted speed-up over `full` for prefill and decode separately (1.0 = time
follows FLOPs), and measured / roofline-predicted time (`flops/roofline.py`; on a CPU the profile is calibrated
in every measured round, by a few seconds of matmuls at the LLM's width and a large copy, interleaved with the
methods like their runs, and priced with the median over the rounds). On a CPU freed memory is kept for reuse
(`--allocator reuse`, see `reuse_freed_memory`), as a GPU's caching allocator does. Times are per batch.
Learned controllers are untrained here: their cost does not depend on their weights.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from benchmarks.defaults import SMOKE_MODEL, go_offline
from benchmarks.plan import RunSpec, make_plan
from benchmarks.runner import load_model, run
from benchmarks.tasks.manager import task_manager
from benchmarks.tasks.synthetic.generate import make_samples
from benchmarks.tasks.synthetic.tasks.utils import doc_to_text
from flops.analytic import ModelShape, QwenShape, count, kv_cache_bytes, model_shape
from flops.roofline import (
    CALIBRATION_ROWS,
    DTYPE_BYTES,
    PROFILES,
    Device,
    calibrate_cpu,
    device_profile,
    median_profile,
    predict,
    profile_for,
)
from flops.shapes import QWEN_DEFAULT_SIZE, load_config, qwen_grid, stand_in_reducer
from methods import get_reducer_class, list_reducers
from methods.cli import OneLineParser, at_least, check_device, first_line, pair
from methods.families import family_of
from methods.llava import llava_prompt, load_llava
from methods.trace import LlavaLayout, QwenLayout

COUNTS = (64, 192)  # the visual tokens every method is timed at (of LLaVA-1.5's 576)


def default_plan() -> list[tuple[str, int | str | None, dict]]:
    """(method, budget label, constructor arguments): `full` once, then every registered method (reference rows such
    as `oracle` left out: they are not methods) at each of COUNTS and, where its own arguments can set its count, at
    its `count_args_example` (FastV's R=0.5). An entry a model cannot run (a layer-averaged budget its stages cannot
    meet, say) is skipped with its reason when the sweep starts."""
    plan: list[tuple[str, int | str | None, dict]] = [("full", None, {})]
    for m in list_reducers():
        cls = get_reducer_class(m)
        if cls.reference or not cls.uses_budget:
            continue
        plan += [(m, b, {}) for b in COUNTS]
        if cls.count_args_example:
            plan.append((m, cls.budget_label(cls.count_args_example), dict(cls.count_args_example)))
    return plan


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def reuse_freed_memory() -> str:
    """Keep freed memory in this process for reuse, as a GPU's caching allocator does, and return what was done (one
    line). glibc's malloc maps every block over 32 MiB fresh and unmaps it when freed, so each large tensor a CPU run
    makes is first touched page by page: on this project's 2-core VM that cost 28 % of a batch-8 prefill (unfused
    elementwise ops writing fresh 200 MB tensors at a fraction of the copy bandwidth) and half of its decode steps
    (`DynamicCache` concatenating into a fresh cache). With mallopt's M_MMAP_MAX 0 and M_TRIM_THRESHOLD at its
    largest, blocks come from the heap and stay there, so later rounds reuse them. Process-wide and for good: call it
    in a process that only benchmarks."""
    import ctypes  # noqa: PLC0415 - only where the allocator is tuned
    import ctypes.util  # noqa: PLC0415

    if platform.libc_ver()[0] != "glibc":
        return f"the system's ({platform.libc_ver()[0] or 'not glibc'}: no mallopt), not tuned"
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)):
        return "glibc refused mallopt, not tuned"
    return "glibc keeps freed memory for reuse (mallopt M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB)"


def allocator(args: argparse.Namespace) -> str:
    """The allocator the timed runs use, tuned first where `--allocator reuse` asks (a CPU; a GPU has its own)."""
    if args.device.startswith("cuda"):
        return "PyTorch's CUDA caching allocator"
    return reuse_freed_memory() if args.allocator == "reuse" else "the system's, not tuned"


def machine() -> str:
    return (f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
            if not torch.cuda.is_available() else torch.cuda.get_device_name())


def sweep_config(args: argparse.Namespace):
    """`--model-config` with its depths cut as asked (SDPA attention). A Qwen vision tower keeps its special blocks
    inside the cut: Qwen2.5-VL's full-attention blocks (the last block if none is left), Qwen3-VL's DeepStack taps at
    the same relative depths (8, 16 and 24 of 27 become 1, 2 and 3 of 4)."""
    config = load_config(args.model_config)
    vc = config.vision_config
    if args.vision_layers:
        if config.model_type == "llava":
            vc.num_hidden_layers = args.vision_layers
        else:
            depth, vc.depth = vc.depth, args.vision_layers
            if config.model_type == "qwen2_5_vl":
                vc.fullatt_block_indexes = [b for b in vc.fullatt_block_indexes if b < vc.depth] or [vc.depth - 1]
            else:
                taps = vc.deepstack_visual_indexes or []
                vc.deepstack_visual_indexes = sorted({min(round(t * vc.depth / depth), vc.depth - 1) for t in taps})
    if args.llm_layers:
        config.text_config.num_hidden_layers = args.llm_layers
    config._attn_implementation = "sdpa"
    return config


def vision_depth(config) -> int:
    """The vision tower's blocks (LLaVA: encoder layers)."""
    vc = config.vision_config
    return vc.num_hidden_layers if config.model_type == "llava" else vc.depth


@dataclass(frozen=True)
class Prompts:
    """A batch of the sweep's prompts for a family: `bs` copies of one prompt (text, the image, text), each with its
    own random image; `image_tokens` visual tokens per image. `inputs(bs, seed)` gives the adapter's `generate`
    arguments (LLaVA: ids, mask, pixels; Qwen: also the image grid)."""

    config: object
    text_tokens: int
    grid: tuple[int, int, int] | None  # a Qwen image's patch grid (t, h, w); None on LLaVA

    @property
    def image_tokens(self) -> int:
        if self.grid is None:
            return LlavaLayout.from_config(self.config).num_patches
        return QwenLayout.from_config(self.config).tokens(torch.tensor([self.grid])).item()

    def inputs(self, bs: int, seed: int) -> tuple:
        g, c, n = torch.Generator().manual_seed(seed), self.config, self.image_tokens
        if self.grid is None:
            ids = torch.tensor([[1] + [7] * 5 + [c.image_token_id] * n + [9] * (self.text_tokens - 6)] * bs)
            side = c.vision_config.image_size
            return ids, torch.ones_like(ids), torch.randn(bs, 3, side, side, generator=g)
        image = [c.vision_start_token_id] + [c.image_token_id] * n + [c.vision_end_token_id]
        ids = torch.tensor([[1] + [7] * 4 + image + [9] * (self.text_tokens - 7)] * bs)
        patch = c.vision_config.patch_size
        pixels = torch.randn(bs * math.prod(self.grid), 3 * c.vision_config.temporal_patch_size * patch ** 2,
                             generator=g)  # a different random image per sample
        return ids, torch.ones_like(ids), pixels, torch.tensor([self.grid] * bs)


def prompts_for(args: argparse.Namespace, config) -> Prompts:
    """The sweep's prompts: LLaVA's image at its encoder's size; a Qwen image at `--image-size` pixels, resized as the
    family's processor does (`flops.shapes.qwen_grid`)."""
    grid = None if config.model_type == "llava" else qwen_grid(config, *args.image_size)
    return Prompts(config, args.text_tokens, grid)


def memory_needed(args: argparse.Namespace, config) -> tuple[int, str]:
    """Bytes the sweep needs on its device at least, before activations: the weights (parameters counted on the meta
    device, at `--dtype`) and the KV cache of the largest batch (prompt and answer); and a line that says so."""
    with torch.device("meta"):
        params = sum(p.numel() for p in family_of(config).model_class(config).parameters())
    size, layers, batch = DTYPE_BYTES[args.dtype], config.text_config.num_hidden_layers, max(args.batch_sizes)
    prompt = prompts_for(args, config).image_tokens + args.text_tokens  # as the sweep's prompts are built
    sample = {"llm_tokens_per_layer": [prompt] * layers, "generated_tokens": args.answer_tokens}
    kv = kv_cache_bytes(sample, model_shape(config), size) * batch
    need = params * size + kv
    return need, (f"{args.model_config} at {vision_depth(config)} vision / "
                  f"{layers} LLM layers in {args.dtype} needs at least {need / 2**30:.1f} GiB on "
                  f"{args.device}: {params * size / 2**30:.1f} GiB of weights ({params / 1e9:.2f} B parameters) and "
                  f"{kv / 2**30:.2f} GiB of KV cache at batch {batch}, before activations")


def memory_free(device: str) -> int | None:
    """Bytes free on `device`: CUDA's own count, or the kernel's MemAvailable for the CPU (None if unknown)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(args: argparse.Namespace, config) -> None:
    """Say what the sweep needs before building the model, and refuse (ValueError) when the device has less free."""
    need, line = memory_needed(args, config)
    free = memory_free(args.device)
    print(line + ("" if free is None else f"; {free / 2**30:.1f} GiB free"))
    if free is not None and need > free:
        raise ValueError(f"{line}, but {args.device} has {free / 2**30:.1f} GiB free: use fewer --llm-layers, smaller "
                         "--batch-sizes, another --dtype or a larger device")


def build(args: argparse.Namespace):
    """The random-weight model of `--model-config` (its family's class) with its depths cut, on `--device` in
    `--dtype`."""
    config = sweep_config(args)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, args.dtype))  # built in place, on the device: a 7B fits and starts fast
    try:
        config.dtype = args.dtype  # the shipped configs say float16; build in the dtype asked for
        with torch.device(args.device):
            model = family_of(config).model_class(config).to(getattr(torch, args.dtype)).eval()
    finally:
        torch.set_default_dtype(default)
    return config, model


def gpu(args: argparse.Namespace, out: RowsFile) -> bool:
    """The prepared GPU check: `--model-config` (LLaVA-1.5-7B by default; any family's) at full depth with random
    weights, `full` against HF `generate` on a short prompt (a Qwen image of `--image-size`), then the sweep at batch
    1 and 8. Returns whether `full` matched."""
    t0 = time.perf_counter()
    config, model = build(args)
    family = family_of(config)
    print(f"built {args.model_config} at {vision_depth(config)} vision / "
          f"{config.text_config.num_hidden_layers} LLM layers, {args.dtype} on "
          f"{machine()} in {time.perf_counter() - t0:.0f} s")
    inputs = [x.to(args.device) for x in replace(prompts_for(args, config), text_tokens=16).inputs(1, 0)]
    inputs[2] = inputs[2].to(model.dtype)  # the pixels
    ids = inputs[0]
    kw = dict(zip(("input_ids", "attention_mask", "pixel_values", "image_grid_thw"), inputs, strict=False))
    if not family.fixed_tokens:  # Qwen: the image's tokens by type, for its M-RoPE positions
        kw["mm_token_type_ids"] = (ids == config.image_token_id).int()
    with torch.no_grad():
        ours = family.runner(model, stand_in_reducer("full", None, config)).generate(
            *inputs, max_new_tokens=args.answer_tokens, eos_token_id=None)
        hf = model.generate(**kw, do_sample=False, max_new_tokens=args.answer_tokens,
                            min_new_tokens=args.answer_tokens)
        first = model(**kw).logits[0, -1].float()
    same = ours.tokens[0].tolist() == hf[0, ids.size(1):].tolist()
    gap = (ours.first_logits[0] - first).abs().max().item()
    print(f"full vs HF generate ({args.answer_tokens} tokens, greedy): {'identical' if same else 'DIFFERENT'} "
          f"(ours {ours.tokens[0].tolist()}, HF {hf[0, ids.size(1):].tolist()}); first-token logits differ by at "
          f"most {gap:.3g}")
    out.add(full_equals_generate=same, first_logit_gap=gap)
    speedup(args, out, (config, model))
    print(f"gpu check done in {time.perf_counter() - t0:.0f} s")
    return same


def roofline_profile(device: str) -> str:
    """The roofline profile for `--device` when `--roofline` is not given: this CPU calibrated, or the GPU's own."""
    if device == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    known = profile_for(name)
    if known is None:
        print(f"note: no roofline profile for {name}; priced on h100 (pass --roofline to choose)")
    return known or "h100"


def plan_for(args: argparse.Namespace) -> list[tuple[str, int | str | None, dict]]:
    """(method, budget label, constructor arguments): `default_plan()`, or its entries at `--budgets` (a count it
    does not have runs every method it runs at a count)."""
    default = [p for p in default_plan() if p[0] == "full" or not args.methods or p[0] in args.methods]
    if not args.budgets:
        return default
    counted = list(dict.fromkeys(m for m, b, kw in default if isinstance(b, int) and not kw))
    plan = [default[0]]
    for label in args.budgets:
        known = [p for p in default[1:] if str(p[1]) == label]
        plan += known or [(m, int(label), {}) for m in counted]
    return plan


def speedup(args: argparse.Namespace, out: RowsFile, built: tuple | None = None) -> list[dict]:
    """The batch sweep: for each batch size, every plan entry's prefill, decoding step and end-to-end time (median
    and spread over interleaved rounds), peak memory (CUDA), KV cache, analytic FLOPs and roofline times, added to
    `out` as each batch size finishes (batch sizes it holds are not measured again). `built`: (config, model)
    already built by `build`."""
    config, model = built or build(args)
    family, shape, prompts = family_of(config), model_shape(config), prompts_for(args, config)
    n = prompts.image_tokens
    profile = args.roofline or roofline_profile(args.device)
    dev = None if profile == "cpu" else device_profile(profile, args.dtype)  # None: calibrated in every round
    roof = (f"{dev.name} ({dev.source})" if dev else f"this CPU, calibrated in every round ({shape.width}-wide "
            f"{args.dtype} matmuls and a copy, interleaved with the methods; the median over the rounds)")
    image = "" if prompts.grid is None else f"a {args.image_size[0]} x {args.image_size[1]} px image ({n} tokens), "
    print(f"{args.model_config} shapes, {vision_depth(config)} vision / "
          f"{config.text_config.num_hidden_layers} LLM layers, random weights, {image}"
          f"{args.text_tokens} text tokens, answers of {args.answer_tokens} tokens, {args.dtype} on {machine()}; "
          f"median of {args.repeats} rounds after 1 warm-up round, methods interleaved within each round; roofline "
          f"on {roof}; allocator: {args.allocator_note}")
    entries, runs = [], []
    for method, budget, kw in plan_for(args):
        try:
            reducer = stand_in_reducer(method, budget if isinstance(budget, int) else None, config, **kw)
            if not family.fixed_tokens:  # images vary in size: the stages are checked on this one
                family.check_reducer(reducer, family.layout(config), image_tokens=n)
            runs.append(family.runner(model, reducer.to(args.device)))
            entries.append((method, budget if budget is not None else n))
        except (ValueError, NotImplementedError) as e:
            print(f"  {method} {budget}: skipped ({first_line(e)})")
    rows = []
    for bs in args.batch_sizes:
        if bs in out.measured():
            print(f"batch {bs}: in {out.path} already, kept")
            continue
        try:
            done = [r | {"allocator": args.allocator_note}
                    for r in _time_batch(args, runs, entries, prompts.inputs(bs, bs), Pricing(shape, dev, n))]
            rows += done
            out.add(done)
        except torch.OutOfMemoryError:
            print(f"batch {bs}: out of memory, skipped")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


SETTINGS = ("what", "model_config", "vision_layers", "llm_layers", "text_tokens", "answer_tokens", "repeats", "budgets",
            "roofline", "device", "dtype", "allocator")  # the arguments a row's numbers depend on (not batch sizes)


@dataclass
class RowsFile:
    """`--output`: one JSON object {machine, settings, rows, ...}, rewritten atomically (a temporary file, then a
    rename) after each batch size, so an interrupt keeps every finished row. A rerun with the same settings on the
    same machine keeps the rows there and measures only the batch sizes they lack; other settings are refused.
    The unit is a batch size: its entries are timed interleaved, round by round, so none is finished before all."""

    path: Path | None
    head: dict
    rows: list[dict]

    @classmethod
    def open(cls, args: argparse.Namespace) -> RowsFile:
        head = {"machine": machine(), "settings": {k: getattr(args, k, None) for k in SETTINGS}}
        path = args.output
        if path is None:
            return cls(None, head, [])
        rows = []
        if path.exists():
            try:
                old = json.loads(path.read_text())
                rows, settings = list(old["rows"]), {k: old["settings"][k] for k in SETTINGS}
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"--output {path} exists and is not this benchmark's file; choose another --output "
                                 "or remove it") from None
            if (settings, old.get("machine")) != (head["settings"], head["machine"]):
                theirs = ({k: v for k, v in settings.items() if head["settings"][k] != v}
                          or {"machine": old.get("machine")})
                raise ValueError(f"--output {path} holds rows measured with other settings ({theirs}); choose another "
                                 "--output or remove it")
        out = cls(path, head, rows)
        out.write()  # fails here, before any model is built, when the folder cannot be written
        return out

    def measured(self) -> set[int]:
        """Batch sizes already in the file."""
        return {r["batch_size"] for r in self.rows}

    def add(self, rows: list[dict] = (), **extra) -> None:
        self.rows += rows
        self.head.update(extra)
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        try:
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, prefix=f".{self.path.name}.",
                                             delete=False) as f:
                f.write(json.dumps({**self.head, "rows": self.rows}, indent=2) + "\n")
            Path(f.name).replace(self.path)
        except OSError as e:
            raise ValueError(f"--output {self.path}: cannot write there ({e.strerror or e}); choose a folder you "
                             "can write to") from None


@dataclass(frozen=True)
class Pricing:
    """What the sweep prices its runs with: the counter's shape, the roofline's device (None: this CPU, calibrated
    once in every measured round, so its peaks see the conditions of the times they price), the image's tokens."""

    shape: ModelShape | QwenShape
    device: Device | None
    image_tokens: int


def _time_batch(args, runs, entries, inputs, price: Pricing) -> list[dict]:
    shape, n = price.shape, price.image_tokens
    bs = inputs[0].size(0)
    cuda = args.device.startswith("cuda")
    samples: list[dict[str, list[float]]] = [{"prefill": [], "decode": [], "e2e": [], "peak": []} for _ in runs]
    gens = [None] * len(runs)
    calibrations = []
    sizes = tuple(sorted({*CALIBRATION_ROWS, bs * inputs[0].size(1)}))  # up to the most rows priced: full prefill
    with torch.no_grad():
        for i in range(args.repeats + 1):
            if i and price.device is None:
                calibrations.append(calibrate_cpu(args.dtype, shape.width, sizes, repeats=1))  # once a round
            for j, run in enumerate(runs):
                if cuda:
                    torch.cuda.reset_peak_memory_stats(args.device)
                gen = gens[j] = run.generate(*inputs, max_new_tokens=args.answer_tokens, eos_token_id=None)
                if i:
                    t = gen.timing
                    samples[j]["prefill"].append(t.prefill_s)
                    samples[j]["decode"].append(t.decode_s / max(t.decode_steps, 1))
                    samples[j]["e2e"].append(t.prefill_s + t.decode_s)
                    if cuda:
                        samples[j]["peak"].append(torch.cuda.max_memory_allocated(args.device) / 2**20)
    dev = price.device or median_profile(calibrations)
    if dev.rows:
        curve = ", ".join(f"{r:.3f} at {m}" for m, r in dev.rows[args.dtype])
        top = [c.rows[args.dtype][-1][1] for c in calibrations]
        print(f"\nbatch {bs} calibration, the median of {len(top)} rounds: matmul TFLOP/s by rows {curve} (the "
              f"rounds {min(top):.3f}-{max(top):.3f} at {dev.rows[args.dtype][-1][0]}); copy bandwidth "
              f"{dev.bandwidth_gbs:.1f} GB/s")
    rows = []
    for (method, budget), gen, ts in zip(entries, gens, samples, strict=True):
        recs = [gen.trace.sample(b, n) for b in range(bs)]
        macs = [count(r, shape) for r in recs]
        pred = predict(recs, shape, dev, args.dtype)
        steps = max(args.answer_tokens - 1, 1)
        rows.append({
            "method": method, "budget": budget, "batch_size": bs,
            "prefill_ms": 1e3 * statistics.median(ts["prefill"]),
            "prefill_ms_min": 1e3 * min(ts["prefill"]), "prefill_ms_max": 1e3 * max(ts["prefill"]),
            "decode_ms_per_token": 1e3 * statistics.median(ts["decode"]),
            "decode_ms_min": 1e3 * min(ts["decode"]), "decode_ms_max": 1e3 * max(ts["decode"]),
            "end_to_end_ms": 1e3 * statistics.median(ts["e2e"]),
            "peak_memory_mb": statistics.median(ts["peak"]) if ts["peak"] else None,
            "kv_cache_mb_per_sample": kv_cache_bytes(recs[0], shape, DTYPE_BYTES[args.dtype]) / 2**20,
            "prefill_gflops": 2 * sum(m.prefill for m in macs) / 1e9, "decode_gflops_per_token": 2 * sum(
                m.decode for m in macs) / steps / 1e9,
            "reducer_ms": 1e3 * gen.timing.reducer_s,
            "roofline_prefill_ms": 1e3 * pred.prefill_s, "roofline_decode_ms": 1e3 * pred.decode_step_s,
            "roofline_device": dev.name,
        })
    base = rows[0]  # full
    for r in rows:
        r["prefill_realised_over_predicted"] = ((r["prefill_gflops"] / base["prefill_gflops"])
                                                / (r["prefill_ms"] / base["prefill_ms"]))
        r["decode_realised_over_predicted"] = ((r["decode_gflops_per_token"] / base["decode_gflops_per_token"])
                                               / (r["decode_ms_per_token"] / base["decode_ms_per_token"]))
        r["prefill_measured_over_roofline"] = r["prefill_ms"] / r["roofline_prefill_ms"]
        r["decode_measured_over_roofline"] = r["decode_ms_per_token"] / r["roofline_decode_ms"]
    print(f"\nbatch {bs} (times per batch; realised / predicted: the speed-up over `full` measured, over the one "
          "FLOPs predict; measured / roofline: time over the roofline's)")
    print("| method | budget | prefill ms (spread) | decode ms/token (spread) | end-to-end ms | KV MB/sample "
          "| peak MB | prefill r/p | decode r/p | prefill m/roofline | decode m/roofline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "n/a" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        print(f"| `{r['method']}` | {r['budget']} | {r['prefill_ms']:.1f} ({r['prefill_ms_min']:.0f}-"
              f"{r['prefill_ms_max']:.0f}) | {r['decode_ms_per_token']:.2f} ({r['decode_ms_min']:.1f}-"
              f"{r['decode_ms_max']:.1f}) | {r['end_to_end_ms']:.0f} | {r['kv_cache_mb_per_sample']:.2f} | {peak} | "
              f"{r['prefill_realised_over_predicted']:.2f} | {r['decode_realised_over_predicted']:.2f} | "
              f"{r['prefill_measured_over_roofline']:.2f} | {r['decode_measured_over_roofline']:.2f} |")
    return rows


def overhead(args: argparse.Namespace) -> float:
    """Per-sample time of `run_bench.py --methods full` vs a bare HF `generate` loop over the same samples.

    Both run at N / 2 and N samples: the end-to-end ratio at N includes the harness's fixed per-run cost (model
    load, lmms-eval task index and set-up, post-processing, result files); the ratio of the slopes between the two
    sizes is the marginal cost of one more sample.
    """
    model, processor = load_llava(SMOKE_MODEL)
    bs, sizes = args.batch_size, (args.samples // 2, args.samples)
    docs = make_samples("test", args.samples)

    def bare(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, n, bs):
                chunk = docs[i:min(i + bs, n)]
                images = [Image.open(io.BytesIO(d["image"]["bytes"])).convert("RGB") for d in chunk]
                texts = [llava_prompt(processor, doc_to_text(d)) for d in chunk]
                inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
                model.generate(**inputs, max_new_tokens=16, do_sample=False)
        return time.perf_counter() - t0

    def harness(n: int) -> float:
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            spec = RunSpec(methods=("full",), limit=n, batch_size=bs, output=Path(out))
            run(spec, make_plan(spec), task_manager(spec.tasks), load_model(spec), progress=False)
            return time.perf_counter() - t0

    bare(bs), harness(bs)  # warm-up: one-time imports, the task index, the test split's file
    b = [bare(n) for n in sizes]
    h = [harness(n) for n in sizes]
    end_to_end = (h[1] / sizes[1]) / (b[1] / sizes[1])
    marginal = ((h[1] - h[0]) / (sizes[1] - sizes[0])) / ((b[1] - b[0]) / (sizes[1] - sizes[0]))
    print(f"smoke model, synth_vqa, batch {bs}, {machine()}")
    for n, tb, th in zip(sizes, b, h, strict=True):
        print(f"  {n:5d} samples: bare HF generate loop {tb:.2f} s, run_bench `full` {th:.2f} s")
    print(f"end to end at {sizes[1]}: {1e3 * h[1] / sizes[1]:.2f} vs {1e3 * b[1] / sizes[1]:.2f} ms/sample, ratio "
          f"{end_to_end:.3f}; marginal per sample (slope between the sizes): ratio {marginal:.3f}; harness fixed "
          f"cost about {h[1] - sizes[1] * (h[1] - h[0]) / (sizes[1] - sizes[0]):.1f} s per run")
    return marginal


def check(args: argparse.Namespace) -> None:
    """What the arguments can get wrong, before any model is built (ValueError)."""
    if args.what in ("speedup", "gpu"):
        known = {str(b) for m, b, _ in default_plan() if m != "full"}
        unknown = [b for b in args.budgets if b not in known and not (b.isdigit() and int(b) >= 1)]
        if unknown:
            raise ValueError(f"--budgets {' '.join(unknown)}: give counts of visual tokens or the plan's labels "
                             f"{' '.join(sorted(known, key=str))}")
        planned = {m for m, _, _ in default_plan()}
        if set(args.methods) - planned:
            raise ValueError(f"--methods {' '.join(sorted(set(args.methods) - planned))}: not in the plan; it times "
                             f"{' '.join(sorted(planned))}")
        check_device(args.device)
        if args.output is not None and not args.output.parent.is_dir():
            raise ValueError(f"--output {args.output}: {args.output.parent} is not a folder; the rows would be lost "
                             "at the end of the sweep")
        if args.output is not None and args.output.is_dir():
            raise ValueError(f"--output {args.output} is a folder; name a JSON file")
    elif args.samples < 2 * args.batch_size:
        raise ValueError(f"--samples {args.samples}: give at least two batches (2 x --batch-size {args.batch_size}), "
                         "the overhead is measured at two sizes")


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m benchmarks.tools.speed", description=" ".join(__doc__.split("\n\n")[0].split()),
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speedup", help="the batch sweep: realised vs FLOPs-predicted speed-ups, roofline, 7B shapes")
    g = sub.add_parser("gpu", help="the prepared GPU check: full-depth 7B in bfloat16, full vs HF generate, sweep")
    for q, cut, dtype, repeats, sizes in ((s, 4, "float32", 5, "1 8 32 on CUDA, 1 8 on a CPU"),
                                          (g, None, "bfloat16", 3, "1 8")):
        q.add_argument("--vision-layers", type=at_least(2), default=cut,
                       help="at least 2 (LLaVA reads layer -2)" + ("" if cut else "; default: the config's"))
        q.add_argument("--llm-layers", type=at_least(3), default=cut,
                       help="at least 3 (FastV prunes at layer 2)" + ("" if cut else "; default: the config's"))
        q.add_argument("--text-tokens", type=at_least(7), default=64)
        q.add_argument("--repeats", type=at_least(1), default=repeats)
        q.add_argument("--batch-sizes", type=at_least(1), nargs="+", default=None,
                       help=f"the sweep's batch sizes (default {sizes})")
        q.add_argument("--answer-tokens", type=at_least(2), default=8,
                       help="tokens generated per sample (no early stop), for decode and end-to-end times")
        q.add_argument("--model-config", default="llava-1.5-7b",
                       help="a LLaVA-1.5, Qwen2.5-VL or Qwen3-VL config: name (qwen3-vl-8b), config.json or folder")
        q.add_argument("--image-size", type=pair, default=QWEN_DEFAULT_SIZE, metavar="WxH",
                       help="Qwen families: the image's pixels, resized as the processor does (default 448x448)")
        q.add_argument("--roofline", choices=PROFILES, default=None,
                       help="device profile for the roofline columns (default: this CPU calibrated, or the GPU's own)")
        q.add_argument("--output", type=Path, default=None,
                       help="write the rows to this JSON file as each batch size finishes; the same command again "
                            "measures only the batch sizes it lacks")
        q.add_argument("--budgets", nargs="*", default=[],
                       help="plan labels (64 192 R=0.5 ...) or counts; default the whole plan; full always")
        q.add_argument("--methods", nargs="*", default=[],
                       help="the plan's methods to time (default all); full always")
        q.add_argument("--device", default="cuda" if q is g or torch.cuda.is_available() else "cpu",
                       help="default: cuda for the GPU check (it stops in one line without one), else cuda if "
                            "present, else cpu")
        q.add_argument("--dtype", default=dtype, choices=["float32", "bfloat16", "float16"])
        q.add_argument("--allocator", choices=["reuse", "system"], default="reuse",
                       help="on a CPU: reuse keeps freed memory in the process, as a GPU's caching allocator does "
                            "(glibc mallopt; see reuse_freed_memory); system leaves malloc as it is")
    o = sub.add_parser("overhead", help="run_bench.py vs a bare HF generate loop, smoke model")
    o.add_argument("--samples", type=at_least(2), default=1000)
    o.add_argument("--batch-size", type=at_least(1), default=32)
    args = p.parse_args(argv)
    go_offline()
    try:
        check(args)
        if args.what in ("speedup", "gpu"):
            args.allocator_note = allocator(args)  # before any model is built, so that it is built in reused memory
        if args.what == "speedup":
            args.batch_sizes = args.batch_sizes or ([1, 8, 32] if args.device.startswith("cuda") else [1, 8])
            check_memory(args, sweep_config(args))
            speedup(args, RowsFile.open(args))
        elif args.what == "gpu":
            args.batch_sizes = args.batch_sizes or [1, 8]
            check_memory(args, sweep_config(args))
            return 0 if gpu(args, RowsFile.open(args)) else 1
        else:
            overhead(args)
    except KeyboardInterrupt:
        print("interrupted" + (f": the finished batch sizes are in {args.output}; rerun the same command to add the "
                               "rest" if getattr(args, "output", None) else ""), file=sys.stderr)
        return 130
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
