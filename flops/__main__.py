"""Print FLOPs per method and budget for a LLaVA, Qwen2.5-VL or Qwen3-VL config, from shapes alone (no weights, no
data).

    python -m flops --model-config llava-1.5-7b --text-tokens 64 --methods full fastv --budgets 64 576
    python -m flops --model-config llava-1.5-7b --text-tokens 40 --methods fastv \\
        --method-args fastv.layer=3 fastv.ratio=0.5
    python -m flops --model-config /ckpt/llava-1.5-13b-hf --methods prumerge adaptive --budgets 32 144 --json
    python -m flops --model-config qwen2.5-vl-7b --image-size 640x480 --methods full fastv --budgets 0.25 64
    python -m flops --model-config qwen2.5-vl-7b --image-tokens 16x16 --methods divprune --budgets 0.111
    python -m flops --model-config qwen3-vl-8b --image-size 640x480 --methods full fastv divprune --budgets 0.111
    python -m flops --model-config llava-1.5-7b --methods full fastv --budgets 64 --device-profile h100 --batch-size 8

A Qwen2.5-VL or Qwen3-VL image has no fixed size: --image-size W x H pixels is resized as the model's processor does
(sides rounded to multiples of 28 px, 4 to 1,280 visual tokens, on Qwen2.5-VL; of 32 px, 64 to 16,384 tokens, on
Qwen3-VL; default 448x448: 256 and 196 tokens), or --image-tokens gives the grid of visual tokens after the merger
(R x C, or N for N x N). A budget is a count of visual tokens or a fraction
of the image's (0.25 keeps 25 %).

--device-profile (h100, h200, a100, l40s, or cpu: this machine, calibrated first in a few seconds) adds the roofline
model's predicted times (`flops/roofline.py`) for a batch of --batch-size such samples in --dtype: the prefill, and
the mean decoding step over the answer's --generated-tokens.
"""

from __future__ import annotations

import argparse
import json
import sys

from tabulate import tabulate

from flops.analytic import count, model_shape
from flops.roofline import PROFILES, device_profile, predict
from flops.shapes import QWEN_DEFAULT_SIZE, QWEN_PIXELS, load_config, qwen_grid, shape_record, stand_in_reducer
from methods import check_arguments, create_reducer, expand_methods, get_reducer_class, method_budgets
from methods.budget import AUTO, parse_budget
from methods.cli import OneLineParser, pair, parse_method_arg, wrap
from methods.families import family_of

# the console table's columns and headers (--json has every field); fits 120 columns. FLOPs in GFLOPs, the one unit of
# every column of this project (MACs, which some papers call "FLOPs", are half)
TABLE = {
    "method": "method", "budget": "budget", "visual_tokens": "tokens", "visual_tokens_layer_mean": "layer mean",
    "llm_prefill_gflops": "LLM GFLOPs", "prefill_gflops": "prefill GFLOPs", "total_gflops": "total GFLOPs",
    "llm_prefill_ratio": "LLM/full", "prefill_ratio": "prefill/full"}
# the JSON's FLOPs fields: {name}_gflops <- 2 x the counter's MACs of that part
GFLOPS_PARTS = {"llm_prefill": "llm_prefill", "prefill": "prefill", "total": "total", "vision": "vision",
                "reducer": "reducer", "projector": "projector", "lm_head": "lm_head_prefill"}
ROOFLINE = {"roofline_prefill_ms": "prefill ms", "roofline_decode_ms_per_token": "decode ms"}  # replace the last 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m flops", description=" ".join(__doc__.split("\n\n")[0].split()),
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model-config", default="llava-1.5-7b",
                   help="llava-1.5-7b, llava-1.5-13b, qwen2.5-vl-7b, a config.json or a checkpoint folder")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--image-size", type=pair, metavar="WxH", help="Qwen: the image's pixels (default 448x448)")
    size.add_argument("--image-tokens", type=pair, metavar="RxC", help="Qwen: the image's grid of visual tokens")
    p.add_argument("--text-tokens", type=int, default=64, help="prompt tokens besides the image (default 64)")
    p.add_argument("--generated-tokens", type=int, default=1, help="answer length for the end-to-end column")
    p.add_argument("--methods", nargs="+", default=["full"], metavar="NAME")
    p.add_argument("--budgets", nargs="+", type=parse_budget, default=[], metavar="N",
                   help="visual tokens the LLM sees: a count, or a fraction of the image's (0.25)")
    p.add_argument("--method-args", nargs="+", type=parse_method_arg, default=[], metavar="METHOD.ARG=VALUE",
                   help="e.g. fastv.layer=3 fastv.ratio=0.5 (a FastV ratio replaces its budgets)")
    p.add_argument("--device-profile", choices=PROFILES, default=None,
                   help="add roofline-predicted times on this device (cpu: calibrated here first)")
    p.add_argument("--batch-size", type=int, default=1, help="samples per batch, for the predicted times")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="for the predicted times (default: bfloat16 on a GPU profile, float32 on cpu)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def image_grid(args: argparse.Namespace, config) -> tuple[int, int, int] | None:
    """A Qwen2.5-VL or Qwen3-VL image's patch grid (t, h, w) from --image-size or --image-tokens; None for LLaVA."""
    if config.model_type not in QWEN_PIXELS:
        if args.image_size or args.image_tokens:
            raise ValueError("--image-size and --image-tokens apply to Qwen2.5-VL and Qwen3-VL; a LLaVA image is "
                             "resized to the vision encoder's size")
        return None
    if args.image_tokens:
        merge = config.vision_config.spatial_merge_size
        return (1, args.image_tokens[0] * merge, args.image_tokens[1] * merge)
    return qwen_grid(config, *(args.image_size or QWEN_DEFAULT_SIZE))


def rows_for(args: argparse.Namespace) -> list[dict]:
    """One row per (method, budget), with MACs from `flops.analytic.count` on `flops.shapes.shape_record`."""
    if args.text_tokens < 0 or args.generated_tokens < 1 or args.batch_size < 1:
        raise ValueError("--text-tokens must be >= 0, --generated-tokens >= 1 and --batch-size >= 1")
    dtype = args.dtype or ("float32" if args.device_profile == "cpu" else "bfloat16")
    config = load_config(args.model_config)
    shape, grid = model_shape(config), image_grid(args, config)
    device = None if args.device_profile is None else device_profile(args.device_profile, dtype, shape.width)
    n = shape.image_tokens({"image_grid_thw": grid})
    kwargs: dict[str, dict] = {}
    for method, arg, value in args.method_args:
        kwargs.setdefault(method, {})[arg] = value
    names = expand_methods(tuple(args.methods))
    for m in names:
        check_arguments(m, kwargs.get(m, {}))  # the registry's types, before any method reads its arguments
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
        kw = kwargs.get(method, {})
        if label.kind == AUTO:
            raise ValueError(f"{method}: an 'auto' budget depends on the image; give numbers of visual tokens")
        reducer = stand_in_reducer(method, label.argument(n), config, **kw)  # a fraction: a count, of this image
        family = family_of(config)  # as run_bench.py checks it: signals provided, layer in range, ...
        family.check_reducer(reducer, family.layout(config), **({} if grid is None else {"image_tokens": n}))
        rec = shape_record(config, reducer, args.text_tokens, args.generated_tokens, image_grid=grid)
        macs = count(rec, shape)
        visual = [c - args.text_tokens for c in rec["llm_tokens_per_layer"]]  # entering each LLM layer
        rows.append({"method": method, "budget": label.record, "visual_tokens": visual[0],
                     "visual_tokens_layer_mean": sum(visual) / len(visual),
                     **{f"{part}_gflops": 2 * getattr(macs, attr) / 1e9 for part, attr in GFLOPS_PARTS.items()},
                     "image_tokens": n, **({} if grid is None else {"image_grid_thw": list(grid)})})
        if device is not None:
            p = predict([rec] * args.batch_size, shape, device, dtype)
            rows[-1] |= {"roofline_prefill_ms": 1e3 * p.prefill_s,
                         "roofline_decode_ms_per_token": 1e3 * p.decode_step_s,
                         "roofline_memory_bound_share": p.memory_bound_share, "roofline_device": device.name,
                         "roofline_batch_size": args.batch_size, "roofline_dtype": dtype}
    full = count(shape_record(config, create_reducer("full"), args.text_tokens, args.generated_tokens, image_grid=grid),
                 shape)
    for r in rows:
        r["llm_prefill_ratio"] = r["llm_prefill_gflops"] * 1e9 / (2 * full.llm_prefill)
        r["prefill_ratio"] = r["prefill_gflops"] * 1e9 / (2 * full.prefill)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows = rows_for(args)
    except (ValueError, KeyError, FileNotFoundError, TypeError, NotImplementedError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    grid = rows[0].get("image_grid_thw") if rows else None
    image = ("the image" if grid is None
             else f"an image of {grid[1]} x {grid[2]} patches ({rows[0]['image_tokens']} tokens)")
    print(wrap(f"{args.model_config}: {args.text_tokens} text tokens + {image}, {args.generated_tokens} generated; "
              "1 MAC = 1 multiply-add, FLOPs = 2 x MACs; prefill = vision + reducer + projector + LLM + lm_head (last "
              "position); ratios are to full"))
    table = TABLE
    if args.device_profile:
        table = {**dict(list(TABLE.items())[:-3]), **ROOFLINE}
        print(wrap(f"roofline on {rows[0]['roofline_device']}, batch {args.batch_size}, {rows[0]['roofline_dtype']}: "
                  "milliseconds per batch (prefill) and per decoding step"))
    formats = ["g" if c in ("budget", "visual_tokens") else ".1f" if c.endswith("_mean")
               else ".5g" if c.endswith("_gflops") else ".4f" for c in table]
    print(tabulate([[r[c] for c in table] for r in rows], headers=list(table.values()), floatfmt=formats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
