"""Evaluate token-reduction methods at several budgets on lmms-eval tasks, and write the results.

With no arguments: the smoke benchmark (the committed small LLaVA on the synthetic VQA task) for every registered
method at budgets of about 1/9, 1/4 and 1/3 of the patches, plus `full`.

`--help`, `--list` and argument errors answer without importing torch (the methods are read from
methods/catalogue.json); everything else a run would reject is checked before anything is written.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import sys
from pathlib import Path

import yaml

from benchmarks.defaults import (
    CONVERSATIONS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_OUTPUT,
    PLANNED_TEXT_TOKENS,
    SMOKE_LIMIT,
    SMOKE_MODEL,
    catalogue,
    default_output,
    go_offline,
)
from benchmarks.tasks import OTHER_TASKS, SMOKE_TASKS
from methods import expand_methods
from methods.budget import parse_budget
from methods.cli import (
    CONSOLE_WIDTH,
    MODEL_TYPES,
    OneLineParser,
    at_least,
    known_families,
    parse_method_arg,
    parse_shard,
    wrap,
)

EPILOG = """examples:
  python run_bench.py                                    # smoke benchmark, every method, default budgets
  python run_bench.py --methods full fastv --budgets 16 36 --limit 100 --method-args fastv.layer=1
  python run_bench.py --model /ckpt/llava-1.5-7b-hf --methods adaptive fastv --budgets 64 576 --tasks gqa pope
  python run_bench.py --model /ckpt/llava-1.5-7b-hf --methods full --tasks pope gqa \\
      --task-data pope=/data/POPE gqa=/data/GQA          # lmms-eval's tasks on local dataset copies, offline
  python run_bench.py --model /ckpt/Qwen2.5-VL-7B-Instruct --methods fastv divprune --budgets 0.111 0.25 \\
      --tasks pope --task-data pope=/data/POPE            # Qwen2.5-VL: budgets as fractions of each image's tokens
  python run_bench.py --list                             # methods (name, site, arguments) and tasks
  python run_bench.py --dry-run                          # check everything, print the plan and its cost, exit
  accelerate launch --multi_gpu --num_processes 4 run_bench.py --device cuda ...   # one shard per GPU
  accelerate launch --multi_gpu --num_processes 2 run_bench.py --device cpu ...    # CPU processes (gloo)
  python run_bench.py ... --shard 2/8                    # the 2nd of 8 parts of the plan's cells (a cluster's jobs)

A method name that is a family prefix expands to the family: `adaptive` runs adaptive_a and adaptive_b.
`full`, and any budget >= the model's patch count, mean no pruning and run once per task, as `full`.
A budget below 1 is a fraction of each image's visual tokens (0.25 keeps a quarter, at least 1); on a family whose
images differ in size (Qwen2.5-VL) a count is at most that many per image, and the default budgets are fractions.
Finished cells are kept in OUTPUT/cells; rerunning the same command computes only what is missing.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=CONSOLE_WIDTH)


def _rel(path: Path) -> str:
    """A path relative to the working directory when it is below it, for help and messages."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="run_bench.py", description=__doc__.splitlines()[0], epilog=EPILOG,
                      formatter_class=_Formatter)
    p.add_argument("--methods", nargs="+", default=[], metavar="NAME",
                   help="methods, families (adaptive) or groups: question_aware, the methods that read the question "
                   "(--list's question column), question_blind, those that do not (default: every method that can run "
                   "on the model; learned ones need a trained controller)")
    p.add_argument("--budgets", nargs="+", type=parse_budget, default=[], metavar="N",
                   help="visual tokens the LLM sees: a count, a fraction of each image's (0.25), or 'auto' for "
                   "methods that choose their own count (prumerge) (default: about 1/9, 1/4 and 1/3 of them)")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help=f"lmms-eval task names, separated by spaces (default: {' '.join(SMOKE_TASKS)} on the LLaVA "
                   f"smoke model, the tasks it knows; {' '.join(OTHER_TASKS)} on any other)")
    p.add_argument("--conversation", nargs="+", choices=CONVERSATIONS, default=list(CONVERSATIONS),
                   metavar="MODE", help="how a conversation task (synth_scenes_followup) answers its later questions, "
                   "one cell per mode: prune-once (on the cache the first turn left, the image reduced once) and/or "
                   "re-prune (the whole conversation prefilled again from the full image) (default: both)")
    p.add_argument("--model", type=Path, default=SMOKE_MODEL,
                   help="local checkpoint folder, LLaVA-1.5 (llava-hf) or Qwen2.5-VL (default: "
                   f"{_rel(SMOKE_MODEL)}, the committed smoke model)")
    p.add_argument("--limit", type=at_least(1), default=None,
                   help=f"evaluate only the first N samples of each task (default: {SMOKE_LIMIT} on the smoke model, "
                        "all on any other)")
    p.add_argument("--seed", type=int, default=0, help="seeds lmms-eval and every method that draws at random "
                   "(default: %(default)s)")
    p.add_argument("--batch-size", type=at_least(1), default=DEFAULT_BATCH_SIZE,
                   help="prompts per forward pass; predictions do not depend on it (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU (default: %(default)s)")
    p.add_argument("--output", type=Path, default=None,
                   help=f"results directory (default: {_rel(DEFAULT_OUTPUT)} for the smoke model, "
                        f"{_rel(DEFAULT_OUTPUT.with_name('smoke_qwen'))} for the Qwen2.5-VL one, "
                        f"{_rel(DEFAULT_OUTPUT.with_name('<model folder name>'))} for any other)")
    p.add_argument("--include-path", nargs="+", type=Path, default=[], metavar="DIR",
                   help="extra folders of lmms-eval task YAMLs (default: none)")
    p.add_argument("--method-args", nargs="+", type=parse_method_arg, default=[], metavar="METHOD.ARG=VALUE",
                   help="constructor arguments of a method, e.g. fastv.layer=1 random.seed=3 (default: none; "
                   "`--list` shows each method's arguments and defaults)")
    p.add_argument("--task-data", nargs="+", action="extend", default=[], metavar="TASK=PATH",
                   help="run lmms-eval's TASK on a local copy of its dataset (a save_to_disk folder or an "
                   "`hf download` snapshot), offline; repeatable; see docs/standard_tasks.md (default: none)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--force", action="store_true",
                       help="recompute every cell of the plan, even those already in the output folder under the "
                       "same conditions (the earlier files move to OUTPUT/cells/superseded/)")
    again.add_argument("--retime", action="store_true",
                       help="measure the timings of the plan's stored cells again (on a quieter machine) and keep "
                       "them only if every prediction is the stored one; cells not stored yet are computed")
    p.add_argument("--shard", type=parse_shard, default=None, metavar="I/N",
                   help="run only the I-th of N disjoint parts of the plan's cells, balanced by planned cost, e.g. "
                   "one per job of a cluster's job array; parts may share the --output folder; the same command "
                   "without --shard afterwards computes nothing stored and builds the comparisons and figures "
                   "(default: the whole plan)")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="a sweep config file (YAML) holding any of: " + ", ".join(CONFIG_KEYS) + "; the command "
                   "line's options replace its values (default: none)")
    p.add_argument("--list", action="store_true", help="list methods and tasks, then exit")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything a run would check, print the plan and its estimated cost, then exit")
    p.add_argument("--verbose", action="store_true", help="show lmms-eval's own progress bars and messages")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


# what a sweep config file may set (run_bench.py's options by their names, `-` or `_`), and what stays per command
CONFIG_KEYS = ("model", "tasks", "methods", "budgets", "method_args", "limit", "seed", "batch_size", "output",
               "device", "dtype", "include_path", "task_data", "conversation")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; with `--config FILE`, the file's settings first and the command line's over them (an
    option given on the command line replaces the file's value). The file is checked on its own first, its errors
    one line naming it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is None:
        return args
    tokens = config_tokens(args.config, parser, argv)
    checker = build_parser()
    checker.error = lambda message: checker.exit(2, f"error: {args.config}: {message}\n")  # the file's own errors
    checker.parse_args(tokens)
    args = parser.parse_args(tokens + argv)
    args.config_record = f"{args.config} (sha1 {hashlib.sha1(args.config.read_bytes()).hexdigest()[:10]})"
    return args


def config_tokens(path: Path, parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """A sweep config file (YAML: a mapping of `CONFIG_KEYS`) as command-line tokens, leaving out the options the
    command line gives. `method_args` is a mapping {method: {argument: value}} (a list is a tuple), `task_data`
    {task: path}; lists give several values. A wrong key or shape exits with one line naming the file."""
    def fail(message: str) -> None:
        parser.exit(2, f"error: {path}: {message}\n")

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        fail(f"cannot be read ({e.strerror})")
    except UnicodeDecodeError:
        fail("is not a text file (not UTF-8); a sweep config is YAML text")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        fail(f"is not YAML{f' (line {mark.line + 1})' if mark else ''}: {getattr(e, 'problem', None) or e}")
    if not isinstance(data, dict):
        fail("must be a YAML mapping of run_bench.py's options, e.g. `methods: [full, fastv]`")
    given = {t.split("=", 1)[0] for t in argv if t.startswith("--")}
    tokens = []
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in CONFIG_KEYS:
            close = difflib.get_close_matches(name, CONFIG_KEYS, n=1)
            fail(f"unknown key {key!r}{f' (did you mean {close[0]}?)' if close else ''}; it may set "
                 f"{', '.join(CONFIG_KEYS)}")
        flag = "--" + name.replace("_", "-")
        if flag in given or value is None:
            continue
        if name == "method_args":
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                fail("method_args must map each method to its arguments, e.g. `method_args: {fastv: {layer: 3}}`")
            values = [f"{m}.{a}={tuple(v) if isinstance(v, list) else v!r}" for m, d in value.items()
                      for a, v in d.items()]
        elif name == "task_data":
            if not isinstance(value, dict):
                fail("task_data must map each task to its local dataset copy, e.g. `task_data: {gqa: /data/gqa}`")
            values = [f"{t}={p}" for t, p in value.items()]
        else:
            values = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        if isinstance(value, (dict, list)) and not values:
            continue
        tokens += [flag, *values]
    return tokens


# ---------------------------------------------------------------------------------------------- torch-free checks


def check_arguments(args: argparse.Namespace) -> None:
    """What can be checked from the arguments and the model's config.json alone, in milliseconds."""
    known = catalogue()
    methods = expand_methods(tuple(args.methods), list(known)) if args.methods else list(known)
    for task in args.tasks or ():
        if "," in task:
            raise ValueError(f"--tasks {task}: separate task names with spaces (--tasks {' '.join(task.split(','))})")
    for method, arg, _ in args.method_args:
        if method not in known:
            expand_methods((method,), list(known))  # raises with close matches
        if args.methods and method not in methods:
            raise ValueError(f"--method-args names {method}.{arg}, but {method} is not among the methods run")
        allowed = known[method]["args"]
        if arg not in allowed:
            listed = ", ".join(allowed) or "none besides the budget"
            raise ValueError(f"--method-args {method}.{arg}: {method} has no argument {arg!r} (its arguments: "
                             f"{listed}); `run_bench.py --list` shows them with their defaults")
    config = Path(args.model) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"--model {args.model} is not a checkpoint folder (no config.json)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"--model {args.model}: config.json is not a JSON object ({e})") from None
    if model_type not in MODEL_TYPES:
        raise ValueError(f"--model {args.model} is a {model_type!r} checkpoint; run_bench.py runs "
                         f"{known_families()} folders (e.g. llava-hf/llava-1.5-7b-hf, Qwen/Qwen2.5-VL-7B-Instruct)")


def list_everything() -> None:
    from tabulate import tabulate

    rows = []
    for name, m in catalogue().items():
        args = [f"{a}={v}" for a, v in m["args"].items()]
        if m["learned"]:
            args = ["checkpoint=MODEL/controllers/<name>"]
        rows.append([name, m["site"], "yes" if m["question"] else "-", " ".join(args) or "-", m["summary"]])
    print(wrap("methods (`--method-args METHOD.ARG=VALUE` sets an argument; budgets come from --budgets; question: it "
               "reads the question, `--methods question_aware` runs those, `question_blind` the others):", rest="  "))
    print(tabulate(rows, headers=["name", "site", "question", "arguments (defaults)", "what it keeps"],
                   tablefmt="simple", maxcolwidths=[None, None, None, 36, 43]))
    print("\ntasks of this project: synth_vqa (synthetic VQA, 1,000 questions; per-type metrics acc_color, "
          "acc_shape,\n  acc_count, acc_exists, acc_position); synth_scenes (40-48 objects per scene, 1,000 questions; "
          "acc_shape,\n  acc_color, acc_position, acc_exists, acc_count, acc_background; the Qwen2.5-VL smoke model "
          "is not trained on it);\n  synth_scenes_followup (1,000 two-question conversations on synth_scenes-like "
          "images; exact_match_turn1,\n  exact_match_turn2; --conversation picks how the second is answered)\n"
          "any lmms-eval task name also works, e.g. gqa pope mme textvqa_val scienceqa_img mmbench_en_dev_static;\n"
          "  offline, point each at a local copy of its dataset with --task-data TASK=PATH (docs/standard_tasks.md)")


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    go_offline()
    try:
        return _main(args)
    except KeyboardInterrupt:
        print("interrupted: finished cells are kept; rerun the same command to continue", file=sys.stderr)
        return 130
    except Exception as e:
        store = sys.modules.get("benchmarks.store")  # imported only past the torch-free checks
        expected = (ValueError, KeyError, OSError, NotImplementedError, *((store.OutputBusyError,) if store else ()))
        if args.debug or not isinstance(e, expected):
            raise
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)  # KeyError's str quotes
        if isinstance(e, OSError) and e.errno is not None and e.strerror:  # not "[Errno 28] ..."
            message = e.strerror + (f": {e.filename}" if e.filename else "")
        print(f"error: {message.strip().splitlines()[0] if message.strip() else type(e).__name__}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    if args.list:
        list_everything()
        return 0
    check_arguments(args)
    if not args.verbose:
        _quiet_lmms_eval()
    from benchmarks.console import plan_table, results_table
    from benchmarks.distributed import is_main_process
    from benchmarks.plan import RunSpec, make_plan, plan_costs
    from benchmarks.runner import load_model, run
    from benchmarks.store import ResultStore
    from benchmarks.tasks.manager import task_manager
    from benchmarks.tasks.standard import parse_task_data

    spec = RunSpec(model=args.model, methods=tuple(args.methods), budgets=tuple(args.budgets),
                   tasks=tuple(args.tasks or ()), limit=args.limit, seed=args.seed, batch_size=args.batch_size,
                   output=args.output or default_output(args.model), include_paths=tuple(args.include_path),
                   device=args.device, dtype=args.dtype,
                   method_kwargs=tuple(args.method_args), conversations=tuple(dict.fromkeys(args.conversation)),
                   config=getattr(args, "config_record", None), shard=args.shard,
                   task_data=tuple(parse_task_data(t) for t in args.task_data))
    plan = make_plan(spec)  # every cell's reducer built and checked against the model's layout
    tm = task_manager(spec.tasks, spec.include_paths)  # unknown tasks, with close matches
    if is_main_process():
        ResultStore(spec.output, shared=spec.shard is not None).check_writable()  # and not in use by another sweep
    say = print if is_main_process() else (lambda *_: None)  # several processes: rank 0 speaks
    methods = sorted({c.method for c in plan.cells})
    tokens = f"{plan.num_patches} patches" if plan.num_patches else "visual tokens per image vary"
    say(wrap(f"plan: {len(plan.cells)} cells ({len(spec.tasks)} task{'s' * (len(spec.tasks) > 1)} x {len(methods)} "
             f"methods x their budgets) on {_rel(Path(spec.model))} ({plan.family.name}, {tokens}) -> "
             f"{_rel(Path(spec.output))}", rest="  "))
    for note in plan.notes:  # continuation lines indented under the note
        say(wrap(note, first="  note: ", rest=" " * 8))
    if args.dry_run:
        costs = plan_costs(plan, spec, PLANNED_TEXT_TOKENS)
        print(plan_table(costs))
        total = [c["gflops_per_sample"] * c["samples"] for c in costs if c["gflops_per_sample"] and c["samples"]]
        print(wrap(f"estimated prefill cost: {sum(total):.4g} GFLOPs in all (FLOPs counter, assuming "
                   f"{PLANNED_TEXT_TOKENS} text tokens per prompt; decoding adds a few percent for short answers; a "
                   "conversation's later turns are not priced here)"))
        return 0
    import torch

    torch.manual_seed(spec.seed)
    lm = load_model(spec, args.verbose)  # a model that cannot be loaded fails before the output folder is touched
    rows = run(spec, plan, tm, lm, verbose=args.verbose, force=args.force, retime=args.retime)
    if not is_main_process():
        return 0  # rank 0 has written the results
    print()
    print(results_table(rows, ResultStore(spec.output).comparisons()))
    print(f"\nwrote {_rel(spec.output / 'summary.csv')} (every metric) and the per-sample records in "
          f"{_rel(spec.output / 'cells')}/*.parquet (results/README.md)")
    if spec.shard is not None:  # the folder's comparisons and figures need every part
        print(wrap(f"shard {spec.shard[0]}/{spec.shard[1]} done. When every part has finished, the same command "
                   "without --shard (on the same --output) computes nothing stored and builds the paired comparisons, "
                   "tables and figures of the whole sweep"))
        return 0
    from plots.data import ResultsError
    from plots.make import make_all

    try:
        figures = make_all([spec.output])
        print(f"wrote {len(figures)} figures and tables (python -m plots {_rel(spec.output)} redraws them), e.g. "
              f"{_rel(Path(figures[0])) if figures else '-'}")
    except (ResultsError, OSError, ValueError) as e:  # the results are safe; only the drawing failed
        print(f"warning: results written, but the plots failed: {e}; retry with `python -m plots {spec.output}`",
              file=sys.stderr)
    return 0


def _quiet_lmms_eval() -> None:
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


if __name__ == "__main__":
    sys.exit(main())
