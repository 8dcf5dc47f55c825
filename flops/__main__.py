"""Print MACs and FLOPs per method and budget for a LLaVA config, from shapes alone (no weights, no data).

    python -m flops --model-config llava-1.5-7b --text-tokens 64 --methods full fastv --budgets 64 576
    python -m flops --model-config llava-1.5-7b --text-tokens 40 --methods fastv \\
        --method-args fastv.layer=3 fastv.ratio=0.5
    python -m flops --model-config /ckpt/llava-1.5-13b-hf --methods prumerge adaptive --budgets 32 144 --json
"""

from __future__ import annotations

import argparse
import json
import sys

from flops.analytic import ModelShape, count
from flops.shapes import load_config, shape_record, stand_in_reducer
from methods import create_reducer, expand_methods, get_reducer_class, method_budgets
from methods.base import AUTO
from methods.cli import OneLineParser, parse_budget, parse_method_arg
from methods.llava import check_reducer
from methods.trace import LlavaLayout

TABLE = ("method", "budget", "visual_tokens", "visual_tokens_layer_mean", "llm_prefill_tmacs", "llm_prefill_tflops",
         "prefill_tmacs", "prefill_tflops", "total_tflops", "llm_prefill_ratio", "prefill_ratio")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m flops", description=__doc__.splitlines()[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model-config", default="llava-1.5-7b",
                   help="llava-1.5-7b, llava-1.5-13b, a config.json or a llava-hf checkpoint folder")
    p.add_argument("--text-tokens", type=int, default=64, help="prompt tokens besides the image (default 64)")
    p.add_argument("--generated-tokens", type=int, default=1, help="answer length for the end-to-end column")
    p.add_argument("--methods", nargs="+", default=["full"], metavar="NAME")
    p.add_argument("--budgets", nargs="+", type=parse_budget, default=[], metavar="N",
                   help="visual tokens the LLM sees")
    p.add_argument("--method-args", nargs="+", type=parse_method_arg, default=[], metavar="METHOD.ARG=VALUE",
                   help="e.g. fastv.layer=3 fastv.ratio=0.5 (a FastV ratio replaces its budgets)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def rows_for(args: argparse.Namespace) -> list[dict]:
    """One row per (method, budget), with MACs from `flops.analytic.count` on `flops.shapes.shape_record`."""
    if args.text_tokens < 0 or args.generated_tokens < 1:
        raise ValueError("--text-tokens must be >= 0 and --generated-tokens >= 1")
    config = load_config(args.model_config)
    shape = ModelShape.from_config(config)
    n = shape.num_patches
    kwargs: dict[str, dict] = {}
    for method, arg, value in args.method_args:
        kwargs.setdefault(method, {})[arg] = value
    names = expand_methods(tuple(args.methods))
    if not args.budgets:
        plain = [m for m in names if get_reducer_class(m).uses_budget
                 and get_reducer_class(m).budget_label(kwargs.get(m, {})) is None]
        if plain:
            raise ValueError(f"{plain[0]} needs --budgets (visual tokens the LLM sees)")
    pairs, notes = method_budgets(names, list(args.budgets), n, lambda m: kwargs.get(m, {}))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    rows = []
    for method, label in pairs:
        cls, kw = get_reducer_class(method), kwargs.get(method, {})
        if label == AUTO:
            raise ValueError(f"{method}: an 'auto' budget depends on the image; give numbers of visual tokens")
        budget = label if cls.uses_budget and cls.budget_label(kw) is None else None
        reducer = stand_in_reducer(method, budget, config, **kw)
        check_reducer(reducer, LlavaLayout.from_config(config))  # as run_bench.py checks it: layer in range, ...
        rec = shape_record(config, reducer, args.text_tokens, args.generated_tokens)
        macs = count(rec, shape)
        visual = [c - args.text_tokens for c in rec["llm_tokens_per_layer"]]  # entering each LLM layer
        rows.append({"method": method, "budget": label, "visual_tokens": visual[0],
                     "visual_tokens_layer_mean": sum(visual) / len(visual),
                     "llm_prefill_tmacs": macs.llm_prefill / 1e12, "llm_prefill_tflops": 2 * macs.llm_prefill / 1e12,
                     "prefill_tmacs": macs.prefill / 1e12,
                     "prefill_tflops": 2 * macs.prefill / 1e12, "total_tflops": 2 * macs.total / 1e12,
                     "vision_tmacs": macs.vision / 1e12, "reducer_tmacs": macs.reducer / 1e12,
                     "projector_tmacs": macs.projector / 1e12, "lm_head_tmacs": macs.lm_head_prefill / 1e12})
    full = count(shape_record(config, create_reducer("full"), args.text_tokens, args.generated_tokens), shape)
    for r in rows:
        r["llm_prefill_ratio"] = r["llm_prefill_tmacs"] * 1e12 / full.llm_prefill
        r["prefill_ratio"] = r["prefill_tmacs"] * 1e12 / full.prefill
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows = rows_for(args)
    except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{args.model_config}: {args.text_tokens} text tokens + the image, {args.generated_tokens} generated; "
          "1 MAC = 1 multiply-add, FLOPs = 2 x MACs; prefill = vision + reducer + projector + LLM + lm_head (last "
          "position); ratios are to full")
    widths = [max(len(c), 10) for c in TABLE]
    print("  ".join(c.rjust(w) for c, w in zip(TABLE, widths, strict=True)))
    for r in rows:
        cells = [r[c] if isinstance(r[c], str) else (f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]))
                 for c in TABLE]
        print("  ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
