"""Speed benchmarks (scripts that print figures, not tests): do FLOPs savings become time savings, and what does the
harness itself cost?

    python -m benchmarks.speed speedup      # LLaVA-1.5-7B-shaped random model, reduced depth: realised vs predicted
    python -m benchmarks.speed overhead     # run_bench.py `full` vs a bare HF generate loop on the smoke model

`speedup` builds LLaVA-1.5-7B's real config (4096-wide LLM, 1024-wide CLIP at 336 px, 576 patches) with the depths
cut (`--vision-layers`, `--llm-layers`) and random weights, and times one sample's reduced prefill per method and
budget: median of `--repeats` rounds after a warm-up round, the methods interleaved within each round. It prints
the analytic prefill FLOPs ratio to `full`, the measured time ratio, and realised speed-up / FLOPs-predicted speed-up
(1.0 = time follows FLOPs exactly).
Learned controllers are untrained here: their cost does not depend on their weights.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from benchmarks.defaults import SMOKE_MODEL, go_offline
from benchmarks.plan import RunSpec
from benchmarks.runner import run
from benchmarks.synthetic.generate import make_samples
from benchmarks.synthetic.tasks.utils import doc_to_text
from flops.analytic import ModelShape, count
from flops.shapes import load_config, stand_in_reducer
from methods.cli import OneLineParser, at_least, check_device
from methods.llava import ReducedLlava, llava_prompt, load_llava
from methods.trace import LlavaLayout

PLAN = [("full", None, {}), ("fastv", 64, {}), ("fastv", 192, {}), ("fastv", "R=0.5", {"ratio": 0.5}),
        ("prumerge", 64, {}), ("prumerge", 192, {}), ("prumerge_plus", 64, {}), ("prumerge_plus", 192, {}),
        ("random", 64, {}), ("random", 192, {}), ("adaptive_a", 64, {}), ("adaptive_a", 192, {}),
        ("adaptive_b", 64, {}), ("adaptive_b", 192, {}), ("divprune", 64, {}), ("divprune", 192, {}),
        ("fastervlm", 64, {}), ("fastervlm", 192, {}), ("vispruner", 64, {}), ("vispruner", 192, {}),
        ("visionzip", 64, {}), ("visionzip", 192, {}), ("dart", 64, {}), ("dart", 192, {}),
        ("pdrop", 192, {}), ("pdrop", "ratios", {"ratios": (0.5, 0.25, 0.125)}),  # pdrop 192: a layer mean
        ("sparsevlm", 192, {}), ("sparsevlm", "retained=64", {"retained_tokens": 64})]  # sparsevlm 192: likewise


def machine() -> str:
    return (f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
            if not torch.cuda.is_available() else torch.cuda.get_device_name())


def speedup(args: argparse.Namespace) -> list[dict]:
    from transformers import LlavaForConditionalGeneration  # noqa: PLC0415 - Hugging Face imports follow go_offline()

    config = load_config("llava-1.5-7b")
    config.vision_config.num_hidden_layers = args.vision_layers
    config.text_config.num_hidden_layers = args.llm_layers
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(dtype=getattr(torch, args.dtype), device=args.device).eval()
    layout = LlavaLayout.from_config(config)
    n, side, bs = layout.num_patches, layout.image_size, args.batch_size
    ids = torch.tensor([[1] + [7] * 5 + [config.image_token_id] * n + [9] * (args.text_tokens - 6)] * bs)
    mask = torch.ones_like(ids)
    pixels = torch.randn(bs, 3, side, side, generator=torch.Generator().manual_seed(0))
    plan = [p for p in PLAN if p[0] == "full" or not args.budgets or str(p[1]) in args.budgets]
    shape = ModelShape.from_config(config)
    print(f"LLaVA-1.5-7B shapes, {args.vision_layers} vision / {args.llm_layers} LLM layers, random weights, "
          f"batch {bs}, {args.text_tokens} text tokens, {args.dtype} on {machine()}; median of {args.repeats} rounds "
          "after 1 warm-up round, methods interleaved within each round (slow drifts of a shared machine hit all "
          "alike)")
    runs = [ReducedLlava(model, stand_in_reducer(method, budget if isinstance(budget, int) else None, config, **kw)
                         .to(args.device)) for method, budget, kw in plan]
    times: list[list[float]] = [[] for _ in plan]
    gens = [None] * len(plan)
    with torch.no_grad():
        for i in range(args.repeats + 1):
            for j, run in enumerate(runs):
                gens[j] = run.generate(ids, mask, pixels, max_new_tokens=1)
                if i:
                    times[j].append(gens[j].timing.prefill_s / bs)  # per sample
    rows = []
    for (method, budget, _), gen, ts in zip(plan, gens, times, strict=True):
        rows.append({"method": method, "budget": budget if budget is not None else n,
                     "prefill_gmacs": count(gen.trace.sample(0, n), shape).prefill / 1e9,
                     "prefill_s": statistics.median(ts), "reducer_s": gen.timing.reducer_s / bs})
        r = rows[-1]
        print(f"  {method:14s} {str(r['budget']):>6s}  {r['prefill_gmacs']:8.1f} GMACs  {1e3 * r['prefill_s']:8.1f} ms"
              f"  (reducer {1e3 * r['reducer_s']:.1f} ms; spread {1e3 * min(ts):.0f}-{1e3 * max(ts):.0f} ms)")
    base = rows[0]
    print("\n| method | budget | prefill GMACs | FLOPs ratio | prefill ms | time ratio "
          "| realised / predicted speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        flops_ratio, time_ratio = r["prefill_gmacs"] / base["prefill_gmacs"], r["prefill_s"] / base["prefill_s"]
        r["realised_over_predicted"] = flops_ratio / time_ratio
        print(f"| `{r['method']}` | {r['budget']} | {r['prefill_gmacs']:.1f} | {flops_ratio:.3f} | "
              f"{1e3 * r['prefill_s']:.0f} | {time_ratio:.3f} | {r['realised_over_predicted']:.2f} |")
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
            run(RunSpec(methods=("full",), limit=n, batch_size=bs, output=Path(out)), progress=False)
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
    if args.what == "speedup":
        known = {str(b) for m, b, _ in PLAN if m != "full"}
        unknown = [b for b in args.budgets if b not in known]
        if unknown:
            raise ValueError(f"--budgets {' '.join(unknown)}: the plan has {' '.join(sorted(known, key=str))}")
        check_device(args.device)
    elif args.samples < 2 * args.batch_size:
        raise ValueError(f"--samples {args.samples}: give at least two batches (2 x --batch-size {args.batch_size}), "
                         "the overhead is measured at two sizes")


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m benchmarks.speed", description=__doc__.splitlines()[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speedup", help="realised vs FLOPs-predicted prefill speed-up, 7B-shaped model")
    s.add_argument("--vision-layers", type=at_least(2), default=4, help="at least 2 (LLaVA reads layer -2)")
    s.add_argument("--llm-layers", type=at_least(3), default=4, help="at least 3 (FastV prunes at layer 2)")
    s.add_argument("--text-tokens", type=at_least(7), default=64)
    s.add_argument("--repeats", type=at_least(1), default=5)
    s.add_argument("--batch-size", type=at_least(1), default=1, help="samples per prefill (times are per sample)")
    s.add_argument("--budgets", nargs="*", default=[], help="only these plan budgets (e.g. 64 R=0.5); full always")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    o = sub.add_parser("overhead", help="run_bench.py vs a bare HF generate loop, smoke model")
    o.add_argument("--samples", type=at_least(2), default=1000)
    o.add_argument("--batch-size", type=at_least(1), default=32)
    args = p.parse_args(argv)
    go_offline()
    try:
        check(args)
        speedup(args) if args.what == "speedup" else overhead(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
