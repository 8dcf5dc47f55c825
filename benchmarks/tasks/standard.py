"""lmms-eval's own standard task definitions, pointed at local copies of their datasets (fully offline).

`run_bench.py --tasks pope gqa --task-data pope=/data/POPE gqa=/data/GQA` runs lmms-eval's unchanged task
definitions (prompts, metrics, aggregations) on local data: the runner passes lmms-eval a dict override
`{"task": "pope", "dataset_path": <local>, ...}` instead of the bare name, which lmms-eval merges over the
built-in YAML. See docs/standard_tasks.md for how to prepare the copies.

Two local formats are understood (`LocalCopy.detect`):

* `save_to_disk`: a folder written by `DatasetDict.save_to_disk` (it holds `dataset_dict.json`). For a Hub
  dataset with configs, the folder may instead hold one such folder per config, named after the config
  (`GQA/testdev_balanced_instructions/`, `GQA/testdev_balanced_images/`); gqa needs that layout.
* `snapshot`: any other folder, read with `datasets.load_dataset(folder, config)`; this is what
  `hf download --repo-type dataset lmms-lab-encoder/POPE --local-dir /data/POPE` writes (README `configs:` plus
  parquet files).

gqa's built-in `process_docs` loads its images from the Hub; here the images come from the local copy's
`testdev_balanced_images` config and are joined on `imageId` when a doc's image is requested (`GqaImages`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import datasets

from methods.cli import first_line

DOCS = "docs/standard_tasks.md"


@dataclass(frozen=True)
class StandardTask:
    """What the runner knows about one of lmms-eval's built-in tasks (0.7.3)."""

    name: str
    hub_repo: str  # where lmms-eval 0.7.3 downloads it from
    config: str | None  # the YAML's dataset_name
    split: str  # the YAML's test_split
    package_dir: str  # folder of the task's YAML under lmms_eval/tasks
    metrics: tuple[str, ...]  # numeric metrics it reports
    docs: int | None = None  # questions in the split (for a dry run's cost estimate)


TASKS: dict[str, StandardTask] = {t.name: t for t in (
    StandardTask("gqa", "lmms-lab-encoder/GQA", "testdev_balanced_instructions", "testdev", "gqa", ("exact_match",),
                 12578),
    StandardTask("pope", "lmms-lab-encoder/POPE", None, "test", "pope",
                 ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio"), 9000),
    StandardTask("mme", "lmms-lab-encoder/MME", None, "test", "mme", ("mme_perception_score", "mme_cognition_score"),
                 2374),
    StandardTask("textvqa_val", "lmms-lab-encoder/textvqa", None, "validation", "textvqa", ("exact_match",), 5000),
    StandardTask("scienceqa_img", "lmms-lab-encoder/ScienceQA", "ScienceQA-IMG", "test", "scienceqa",
                 ("exact_match",), 2017),
    StandardTask("mmbench_en_dev_static", "lmms-lab-encoder/MMBench", "en", "dev", "mmbench", ("gpt_eval_score",),
                 4329),
    StandardTask("mmbench_en_dev", "lmms-lab-encoder/MMBench", "en", "dev", "mmbench", ("gpt_eval_score",), 4329),
)}
GQA_IMAGES = "testdev_balanced_images"  # the config of lmms-lab-encoder/GQA that holds the images, by `id`


# ---------------------------------------------------------------------------------------------- the option


def parse_task_data(text: str) -> tuple[str, Path]:
    """`TASK=PATH` (the `--task-data` option) -> (task, path)."""
    task, sep, path = text.partition("=")
    if not (sep and task.strip() and path.strip()):
        raise ValueError(f"--task-data {text!r}: write TASK=PATH, e.g. pope=/data/POPE (see {DOCS})")
    return task.strip(), Path(path.strip()).expanduser()


def check_task_data(tasks: tuple[str, ...], task_data: tuple[tuple[str, Path], ...], limit: int | None) -> None:
    """Validate `--task-data` against `--tasks` before anything expensive starts; raise with what to do next."""
    seen: set[str] = set()
    for task, path in task_data:
        if task not in tasks:
            raise ValueError(f"--task-data names {task}, but {task} is not among --tasks ({' '.join(tasks)}); "
                             f"add it to --tasks or drop its --task-data")
        if task in seen:
            raise ValueError(f"--task-data gives {task} twice; give one local copy per task")
        seen.add(task)
        LocalCopy.detect(task, Path(path))  # raises if missing or unusable
    if "mme" in tasks and limit is not None and limit % 2:
        raise ValueError(f"mme scores each image's two questions together: give an even --limit (got {limit})")
    if "mmbench_en_dev" in tasks and not os.environ.get("OPENAI_API_KEY"):
        raise ValueError("mmbench_en_dev matches free-form answers through the OpenAI API (offline it scores them "
                         "with random letters); use --tasks mmbench_en_dev_static, or set OPENAI_API_KEY")


def package_dirs(tasks: tuple[str, ...]) -> list[str]:
    """lmms-eval's YAML folders for the standard tasks among `tasks`: a TaskManager over just these indexes in
    well under a second, against several seconds for lmms-eval's full index of ~2,000 tasks."""
    spec = find_spec("lmms_eval")
    if spec is None or spec.origin is None:
        return []
    root = Path(spec.origin).parent / "tasks"
    dirs = dict.fromkeys(str(root / TASKS[t].package_dir) for t in tasks if t in TASKS)
    return [d for d in dirs if Path(d).is_dir()]


def task_config(task: str, path: Path | None) -> str | dict:
    """What to pass to `simple_evaluate(tasks=[...])`: the bare name, or a dict override reading `path`."""
    if path is None:
        return task
    copy = LocalCopy.detect(task, Path(path))
    override: dict = {"task": task, **copy.dataset_fields()}
    if task == "gqa":
        images = GqaImages(copy)
        override |= {"process_docs": images.process_docs, "doc_to_visual": images.doc_to_visual}
    return override


def load_error(task: str, path: Path | None, err: BaseException) -> ValueError:
    """A one-line error for a dataset that lmms-eval could not load. lmms-eval 0.7.3 retries a task's dataset
    load 5 times (about 8 s) and then raises a bare `tenacity.RetryError`; this names the cause and what to do."""
    cause = err
    attempt = getattr(err, "last_attempt", None)
    if attempt is not None and attempt.exception() is not None:
        cause = attempt.exception()
    text = first_line(cause)
    where = f"its local copy {path}" if path else "its dataset (no --task-data given)"
    hint = "" if path else f"; offline, give --task-data {task}=PATH with a local copy ({DOCS})"
    return ValueError(f"{task}: lmms-eval could not load {where}: {type(cause).__name__}: {text}{hint}")


def submission_args(output: Path):
    """`cli_args` for `simple_evaluate`: textvqa's and mmbench's aggregations write their submission files under
    OUTPUT/submissions/ instead of the current directory. Media stay available to `process_results` (the
    default of the Python API)."""
    return SimpleNamespace(output_path=str(output), process_with_media=True)


# ---------------------------------------------------------------------------------------------- local copies


@dataclass(frozen=True)
class LocalCopy:
    """A task's local dataset: the folder lmms-eval reads, and how."""

    task: str
    root: Path  # the folder given on the command line
    folder: Path  # the folder holding the task's split (root, or root/<config> for a save_to_disk copy)
    kind: str  # "save_to_disk" or "snapshot"

    @classmethod
    def detect(cls, task: str, root: Path) -> LocalCopy:
        """Recognise the layout of `root` for `task`; raise FileNotFoundError/ValueError saying how to fix it."""
        root = Path(root).expanduser().resolve()
        std = TASKS.get(task)
        if not root.exists():
            raise FileNotFoundError(f"--task-data {task}={root}: no such folder; prepare a local copy as in {DOCS}")
        if not root.is_dir():
            raise ValueError(f"--task-data {task}={root} is a file; give the folder of a `save_to_disk` copy or of "
                             f"an `hf download` snapshot (see {DOCS})")
        if std and std.config and _saved(root / std.config):
            copy = cls(task, root, root / std.config, "save_to_disk")
        elif _saved(root):
            copy = cls(task, root, root, "save_to_disk")
        else:
            copy = cls(task, root, root, "snapshot")
        copy.check()
        return copy

    def check(self) -> None:
        """The checks that are cheap before loading: a saved Dataset (not DatasetDict), the split, gqa's images."""
        std = TASKS.get(self.task)
        if (self.folder / "state.json").is_file():
            split = std.split if std else "<split>"
            raise ValueError(f"--task-data {self.task}={self.folder} holds one Dataset; lmms-eval reads a "
                             f"DatasetDict: save it as DatasetDict({{'{split}': ds}}).save_to_disk(...)")
        if std is None or self.kind != "save_to_disk":
            return
        splits = json.loads((self.folder / "dataset_dict.json").read_text()).get("splits", [])
        if std.split not in splits:
            raise ValueError(f"--task-data {self.task}={self.folder} has splits {splits}, but {self.task} reads "
                             f"split {std.split!r} of {std.hub_repo}" + (f" ({std.config})" if std.config else ""))
        if self.task == "gqa" and not _saved(self.root / GQA_IMAGES):
            raise FileNotFoundError(f"--task-data gqa={self.root}: no {GQA_IMAGES}/ folder; gqa's images are a "
                                    f"separate config: load_dataset('{std.hub_repo}', '{GQA_IMAGES}')"
                                    f".save_to_disk('{self.root / GQA_IMAGES}')")

    def dataset_fields(self) -> dict:
        """The task-config fields that make lmms-eval read this copy."""
        if self.kind == "save_to_disk":
            return {"dataset_path": str(self.folder), "dataset_kwargs": {"load_from_disk": True}}
        return {"dataset_path": str(self.folder), "dataset_kwargs": {}}  # dataset_name stays the YAML's config


def _saved(folder: Path) -> bool:
    """True for a folder written by `DatasetDict.save_to_disk` (or `Dataset.save_to_disk`)."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


class GqaImages:
    """gqa's image join, from the local copy: doc["imageId"] -> the `image` of the row with that `id` in the
    `testdev_balanced_images` config. Replaces the built-in `process_docs`, which loads the images from the Hub
    and copies them into every doc; here an image is decoded only when the model asks for it."""

    def __init__(self, copy: LocalCopy) -> None:
        self.copy = copy
        self._images = None
        self._row_of: dict[str, int] = {}

    def _load(self):
        if self._images is None:
            if self.copy.kind == "save_to_disk":
                images = datasets.load_from_disk(str(self.copy.root / GQA_IMAGES))
                if isinstance(images, datasets.DatasetDict):
                    images = images[TASKS["gqa"].split]
            else:
                cache = os.environ.get("LMMS_EVAL_DATASETS_CACHE") or None  # where lmms-eval caches the questions
                images = datasets.load_dataset(str(self.copy.root), GQA_IMAGES, split=TASKS["gqa"].split,
                                               cache_dir=cache)
            self._row_of = {image_id: row for row, image_id in enumerate(images["id"])}
            self._images = images
        return self._images

    def process_docs(self, dataset):
        """Check that every question's image is in the local images set; the docs themselves are unchanged."""
        self._load()
        missing = sorted({i for i in dataset["imageId"] if i not in self._row_of})
        if missing:
            raise ValueError(f"gqa: {len(missing)} imageIds of the questions are not in {self.copy.root / GQA_IMAGES} "
                           f"(e.g. {', '.join(missing[:3])}); copy the images config of the same GQA release")
        return dataset

    def doc_to_visual(self, doc: dict) -> list:
        """The doc's image, as the built-in gqa_doc_to_visual returns it."""
        images = self._load()
        return [images[self._row_of[doc["imageId"]]]["image"].convert("RGB")]
