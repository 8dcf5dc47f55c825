"""Evaluate token-reduction methods at several budgets on lmms-eval tasks, and write the results.

With no arguments: the smoke benchmark (the committed small LLaVA on the synthetic VQA task) for every registered
method at budgets of about 1/9, 1/4 and 1/3 of the patches, plus `full`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EPILOG = """examples:
  python run_bench.py                                    # smoke benchmark, every method, default budgets
  python run_bench.py --methods full fastv --budgets 16 36 --limit 100 --method-args fastv.layer=1
  python run_bench.py --model /ckpt/llava-1.5-7b-hf --methods adaptive fastv --budgets 64 576 --tasks gqa pope
  python run_bench.py --model /ckpt/llava-1.5-7b-hf --methods full --tasks pope gqa \\
      --task-data pope=/data/POPE gqa=/data/GQA          # lmms-eval's tasks on local dataset copies, offline
  python run_bench.py --list                             # methods (name, site, defaults) and our tasks
  python run_bench.py --dry-run                          # print the (task, method, budget) plan and exit
  accelerate launch --multi_gpu --num_processes 4 run_bench.py --device cuda ...   # one shard per GPU
  accelerate launch --multi_gpu --num_processes 2 run_bench.py --device cpu ...    # CPU processes (gloo)

A method name that is a family prefix expands to the family: `adaptive` runs adaptive_a and adaptive_b.
`full`, and any budget >= the model's patch count, mean no pruning and run once per task, as `full`.
Finished cells are kept in OUTPUT/cells; rerunning the same command computes only what is missing.
"""


class _Parser(argparse.ArgumentParser):
    """Bad arguments get one line (what is wrong, where the options are listed) and exit status 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message}; `python run_bench.py --help` lists the options\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from benchmarks.runner import RunSpec

    d = RunSpec.__dataclass_fields__
    p = _Parser(prog="run_bench.py", description=__doc__.splitlines()[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=[], metavar="NAME", help="methods or families (default: all)")
    p.add_argument("--budgets", nargs="+", type=_budget, default=[], metavar="N",
                   help="visual tokens the LLM sees, or 'auto' for methods that choose their own count (prumerge); "
                   "default: ~1/9, 1/4, 1/3 of the patches")
    p.add_argument("--tasks", nargs="+", default=list(d["tasks"].default), metavar="TASK",
                   help="lmms-eval task names (default: synth_vqa)")
    p.add_argument("--model", type=Path, default=d["model"].default,
                   help="local llava-hf checkpoint folder (default: the committed smoke model)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples of each task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=d["batch_size"].default)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--output", type=Path, default=d["output"].default, help="results directory")
    p.add_argument("--include-path", nargs="+", type=Path, default=[], metavar="DIR",
                   help="extra folders of lmms-eval task YAMLs")
    p.add_argument("--method-args", nargs="+", type=_method_arg, default=[], metavar="METHOD.ARG=VALUE",
                   help="constructor arguments of a method, e.g. fastv.layer=1 random.seed=3")
    p.add_argument("--task-data", nargs="+", action="extend", default=[], metavar="TASK=PATH",
                   help="run lmms-eval's TASK on a local copy of its dataset (a save_to_disk folder or an "
                   "`hf download` snapshot), offline; repeatable; see docs/standard_tasks.md")
    p.add_argument("--list", action="store_true", help="list methods and tasks, then exit")
    p.add_argument("--dry-run", action="store_true", help="print the plan, then exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def _budget(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget {text!r} is not a whole number of visual tokens or 'auto'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"budget {value} must be >= 1 (visual tokens the LLM sees)")
    return value


def _method_arg(text: str) -> tuple[str, str, object]:
    import ast

    head, sep, value = text.partition("=")
    method, dot, arg = head.partition(".")
    if not (sep and dot and method and arg):
        raise argparse.ArgumentTypeError(f"{text!r}: write METHOD.ARG=VALUE, e.g. fastv.layer=1")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value  # a plain string, e.g. a path
    return method, arg, parsed


def list_everything() -> None:
    from methods import get_reducer_class, list_reducers

    print("methods (name, site, defaults):")
    for name in list_reducers():
        cls = get_reducer_class(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"  {name:16s} {cls.site.value:9s} {doc}")
    print("\ntasks of this project: synth_vqa (synthetic VQA; per-type metrics acc_color, acc_shape, acc_count, "
          "acc_exists, acc_position)\nany lmms-eval task name also works, e.g. gqa pope mme textvqa_val "
          "scienceqa_img mmbench_en_dev_static;\noffline, point each at a local copy of its dataset with "
          "--task-data TASK=PATH (docs/standard_tasks.md)")


def main(argv: list[str] | None = None) -> int:
    from benchmarks.runner import OutputBusyError

    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _main(args)
    except KeyboardInterrupt:
        print("interrupted: finished cells are kept; rerun the same command to continue", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, PermissionError, NotImplementedError, OutputBusyError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    if args.list:
        list_everything()
        return 0
    from benchmarks.distributed import is_main_process
    from benchmarks.runner import RunSpec, make_reducer, run
    from benchmarks.standard_tasks import parse_task_data

    spec = RunSpec(model=args.model, methods=tuple(args.methods), budgets=tuple(args.budgets),
                   tasks=tuple(args.tasks), limit=args.limit, seed=args.seed, batch_size=args.batch_size,
                   output=args.output, include_paths=tuple(args.include_path), device=args.device, dtype=args.dtype,
                   method_kwargs=tuple(args.method_args),
                   task_data=tuple(parse_task_data(t) for t in args.task_data))
    if not (Path(spec.model) / "config.json").is_file():
        raise FileNotFoundError(f"--model {spec.model} is not a llava-hf checkpoint folder (no config.json)")
    num_patches, feature_width = _features(spec.model)
    cells, notes = spec.cells(num_patches)
    say = print if is_main_process() else (lambda *_: None)  # several processes: rank 0 speaks
    say(f"plan: {len(cells)} cells on {spec.model} ({num_patches} patches) -> {spec.output}")
    for note in notes:
        say(f"  note: {note}")
    for c in cells:
        say(f"  {c.task:14s} {c.method:14s} budget {c.budget}")
    if not cells:
        raise ValueError("the plan is empty: give methods and budgets that apply to each other")
    for c in cells:  # every method argument, and each method against the model, before anything expensive starts
        make_reducer(c, spec).check_model(num_patches, feature_width)
    if args.dry_run:
        return 0
    _quiet_lmms_eval()
    import torch

    torch.manual_seed(spec.seed)
    rows = run(spec)
    if not is_main_process():
        return 0  # rank 0 has written the results
    print_table(rows)
    print(f"\nwrote {spec.output / 'summary.csv'} and {spec.output / 'samples.jsonl'}")
    from plots.__main__ import make_all
    from plots.data import ResultsError

    try:
        figures = make_all([spec.output])
        print(f"wrote {len(figures)} figures and tables (python -m plots {spec.output} redraws them), e.g. "
              f"{figures[0] if figures else '-'}")
    except (ResultsError, OSError, ValueError) as e:  # the results are safe; only the drawing failed
        print(f"warning: results written, but the plots failed: {e}; retry with `python -m plots {spec.output}`",
              file=sys.stderr)
    return 0


def _features(model: Path) -> tuple[int, int]:
    """(patches, feature width) of a llava-hf checkpoint's vision features, from its config.json."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises several kinds for a bad or foreign config
        from methods.base import first_line

        raise ValueError(f"--model {model}: config.json cannot be read as a model config ({first_line(e)})") from None
    if config.model_type != "llava":
        raise ValueError(f"--model {model} is a {config.model_type!r} checkpoint; run_bench.py needs a llava-hf one "
                         "(LlavaForConditionalGeneration, e.g. llava-hf/llava-1.5-7b-hf)")
    vc, layers = config.vision_config, config.vision_feature_layer
    return (vc.image_size // vc.patch_size) ** 2, vc.hidden_size * (len(layers) if isinstance(layers, list) else 1)


def _quiet_lmms_eval() -> None:
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def print_table(rows: list[dict]) -> None:
    """Readable summary: one line per (task, metric), one column per (method, budget)."""
    import pandas as pd

    if not rows:
        print("no results")
        return
    df = pd.DataFrame(rows)
    df["column"] = df["method"] + "@" + df["budget"].astype(str)
    df["order"] = pd.to_numeric(df["budget"], errors="coerce").fillna(float("inf"))  # "auto" last
    order = df.sort_values(["method", "order"])["column"].unique()
    table = df.pivot_table(index=["task", "metric"], columns="column", values="value", aggfunc="first")
    print()
    print(table[order].round(3).to_string())


if __name__ == "__main__":
    sys.exit(main())
