"""The tasks at run time: lmms-eval's task manager over our tasks and the user's, and the synthetic tasks' test data,
written on first use."""

from __future__ import annotations

import difflib
from pathlib import Path

from lmms_eval.tasks import TaskManager

from benchmarks.tasks import SYNTH_TASK_DOCS, SYNTH_TASKS
from benchmarks.tasks.standard import package_dirs
from benchmarks.tasks.synthetic.followup import SYNTH_SCENES_FOLLOWUP
from benchmarks.tasks.synthetic.generate import SYNTH_VQA, ensure_test_data
from benchmarks.tasks.synthetic.scenes import SYNTH_SCENES
from methods.cli import first_line


def task_manager(tasks: tuple[str, ...], include_paths: tuple[Path, ...] = ()) -> TaskManager:
    """A TaskManager that knows our tasks and the user's include paths (--include-path); lmms-eval's defaults only if
    `tasks` need them. An unknown task is a one-line KeyError with close matches."""
    paths = [str(SYNTH_TASKS)] + [str(p) for p in include_paths] + package_dirs(tasks)
    for p in include_paths:
        if not Path(p).is_dir():
            raise FileNotFoundError(f"--include-path {p} is not a directory of lmms-eval task YAMLs")
    try:
        tm = TaskManager(include_defaults=False, include_path=paths)
        if not all(t in tm.all_tasks for t in tasks):
            tm = TaskManager(include_path=paths)
    except Exception as e:  # noqa: BLE001 - yaml's and lmms-eval's own errors for a malformed task file
        mark = getattr(e, "problem_mark", None)  # yaml's position of the error
        where = f" ({mark.name}, line {mark.line + 1})" if mark else ""
        raise ValueError(f"a task YAML cannot be read{where} ({type(e).__name__}: {first_line(e)}); fix or move it "
                         "out of the --include-path folders") from None
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        hints = {t: difflib.get_close_matches(t, tm.all_tasks, n=3) for t in unknown}
        msg = "; ".join(f"{t!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for t, h in hints.items())
        raise KeyError(f"unknown task {msg}. Our tasks: {', '.join(SYNTH_TASK_DOCS)}; `run_bench.py --list` lists them")
    return tm


SYNTH_GENERATORS = {"synth_vqa": SYNTH_VQA, "synth_scenes": SYNTH_SCENES,
                    "synth_scenes_followup": SYNTH_SCENES_FOLLOWUP}


def ensure_task_data(tasks: tuple[str, ...]) -> None:
    """Our synthetic tasks' test splits are generated on first use (deterministic, seeded), and rewritten when a
    stored file is not what the generator makes now."""
    for task in tasks:
        gen = SYNTH_GENERATORS.get(task)
        if gen is None:
            continue
        if not gen.test_file.is_file():
            print(f"writing {task}'s 1,000 questions to {gen.test_file} (first use, a few seconds)")
        ensure_test_data(gen=gen)
