"""Speed benchmarks (scripts that print figures, not tests): do FLOPs savings become time savings, and what does the
harness itself cost?

    python -m benchmarks.speed speedup      # LLaVA-1.5-7B-shaped random model, reduced depth: realised vs predicted
    python -m benchmarks.speed overhead     # run_bench.py `full` vs a bare HF generate loop on the smoke model

`speedup` builds LLaVA-1.5-7B's real config (4096-wide LLM, 1024-wide CLIP at 336 px, 576 patches) with the depths
cut (`--vision-layers`, `--llm-layers`) and random weights, and times one sample's reduced prefill per method and
budget: median of `--repeats` runs after a warm-up run. It prints the analytic prefill FLOPs ratio to `full`, the
measured time ratio, and realised speed-up / FLOPs-predicted speed-up (1.0 = time follows FLOPs exactly).
Learned controllers are untrained here: their cost does not depend on their weights.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

PLAN = [("full", None, {}), ("fastv", 64, {}), ("fastv", 192, {}), ("fastv", "R=0.5", {"ratio": 0.5}),
        ("prumerge", 64, {}), ("prumerge", 192, {}), ("prumerge_plus", 64, {}), ("prumerge_plus", 192, {}),
        ("random", 64, {}), ("random", 192, {}), ("adaptive_a", 64, {}), ("adaptive_a", 192, {}),
        ("adaptive_b", 64, {}), ("adaptive_b", 192, {})]


def machine() -> str:
    return (f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
            if not torch.cuda.is_available() else torch.cuda.get_device_name())


def speedup(args: argparse.Namespace) -> list[dict]:
    from transformers import LlavaForConditionalGeneration

    from flops.analytic import ModelShape, count
    from flops.shapes import load_config
    from methods import create_reducer, get_reducer_class
    from methods.adaptive import ControllerConfig
    from methods.llava import ReducedLlava

    config = load_config("llava-1.5-7b")
    config.vision_config.num_hidden_layers = args.vision_layers
    config.text_config.num_hidden_layers = args.llm_layers
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(dtype=getattr(torch, args.dtype), device=args.device).eval()
    n = 576
    ids = torch.tensor([[1] + [7] * 5 + [config.image_token_id] * n + [9] * (args.text_tokens - 6)])
    mask = torch.ones_like(ids)
    pixels = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    shape = ModelShape.from_config(config)
    rows = []
    print(f"LLaVA-1.5-7B shapes, {args.vision_layers} vision / {args.llm_layers} LLM layers, random weights, batch 1, "
          f"{args.text_tokens} text tokens, {args.dtype} on {machine()}; median of {args.repeats} after 1 warm-up")
    for method, budget, kw in PLAN:
        cls = get_reducer_class(method)
        if getattr(cls, "needs_checkpoint", False):
            kw = {**kw, "config": ControllerConfig(method=method, dim=1024, num_patches=n)}
        reducer = create_reducer(method, budget if isinstance(budget, int) else None, **kw).to(args.device).eval()
        run = ReducedLlava(model, reducer)
        times = []
        with torch.no_grad():
            for i in range(args.repeats + 1):
                gen = run.generate(ids, mask, pixels, max_new_tokens=1)
                if i:
                    times.append(gen.timing.prefill_s)
        macs = count(gen.trace.sample(0, n), shape).prefill
        rows.append({"method": method, "budget": budget if budget is not None else n, "prefill_gmacs": macs / 1e9,
                     "prefill_s": statistics.median(times), "reducer_s": gen.timing.reducer_s})
        r = rows[-1]
        print(f"  {method:14s} {str(r['budget']):>6s}  {r['prefill_gmacs']:8.1f} GMACs  {1e3 * r['prefill_s']:8.1f} ms"
              f"  (reducer {1e3 * r['reducer_s']:.1f} ms)", flush=True)
    base = rows[0]
    print(f"\n| method | budget | prefill GMACs | FLOPs ratio | prefill ms | time ratio | realised / predicted speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        flops_ratio, time_ratio = r["prefill_gmacs"] / base["prefill_gmacs"], r["prefill_s"] / base["prefill_s"]
        r["realised_over_predicted"] = flops_ratio / time_ratio
        print(f"| `{r['method']}` | {r['budget']} | {r['prefill_gmacs']:.1f} | {flops_ratio:.3f} | "
              f"{1e3 * r['prefill_s']:.0f} | {time_ratio:.3f} | {r['realised_over_predicted']:.2f} |")
    return rows


def overhead(args: argparse.Namespace) -> float:
    """Per-sample time of `run_bench.py --methods full` vs a bare HF `generate` loop over the same samples."""
    import os
    import tempfile

    from PIL import Image

    from benchmarks.lmms_model import load_llava
    from benchmarks.runner import SMOKE_MODEL, RunSpec, run
    from benchmarks.synthetic.generate import make_samples
    from benchmarks.synthetic.tasks.utils import doc_to_text
    from methods.llava import llava_prompt

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    model, processor = load_llava(SMOKE_MODEL)
    docs = make_samples("test", args.samples)
    bs = args.batch_size
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(docs), bs):
            chunk = docs[i:i + bs]
            images = [Image.open(__import__("io").BytesIO(d["image"]["bytes"])).convert("RGB") for d in chunk]
            texts = [llava_prompt(processor, doc_to_text(d)) for d in chunk]
            inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
            model.generate(**inputs, max_new_tokens=16, do_sample=False)
    bare = (time.perf_counter() - t0) / len(docs)
    with tempfile.TemporaryDirectory() as out:
        spec = RunSpec(methods=("full",), limit=args.samples, batch_size=bs, output=Path(out))
        t0 = time.perf_counter()
        run(spec, progress=False)
        harness = (time.perf_counter() - t0) / args.samples
    ratio = harness / bare
    print(f"smoke model, {args.samples} synth_vqa samples, batch {bs}, {machine()}")
    print(f"bare HF generate loop: {1e3 * bare:.2f} ms/sample; run_bench `full`: {1e3 * harness:.2f} ms/sample "
          f"(lmms-eval task setup, scoring and result files included); ratio {ratio:.3f}")
    return ratio


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speedup", help="realised vs FLOPs-predicted prefill speed-up, 7B-shaped model")
    s.add_argument("--vision-layers", type=int, default=4)
    s.add_argument("--llm-layers", type=int, default=4)
    s.add_argument("--text-tokens", type=int, default=64)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    o = sub.add_parser("overhead", help="run_bench.py vs a bare HF generate loop, smoke model")
    o.add_argument("--samples", type=int, default=500)
    o.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    if args.what == "speedup":
        speedup(args)
    else:
        overhead(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
