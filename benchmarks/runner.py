"""The sweep: every (task, method, budget) cell evaluated through lmms-eval, results written cell by cell.

Output directory layout (documented for users in results/README.md):

* `cells/<task>__<method>__<budget>__<fingerprint>.json`: one finished cell (its summary rows and sample records),
  written atomically (temporary file + rename). A sweep killed part-way keeps every finished cell; the same command
  afterwards skips cells whose file exists with the same fingerprint (model, method arguments, limit, seed).
* `summary.csv`: one flat row per (task, method, budget, metric), rebuilt from `cells/` after every cell.
* `samples.jsonl`: one record per (task, method, budget, sample), rebuilt the same way.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import difflib
import errno
import hashlib
import inspect
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.console import cell_line
from benchmarks.defaults import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BUDGET_FRACTIONS,
    DEFAULT_OUTPUT,
    REPO,
    SMOKE_MODEL,
    SMOKE_TASKS,
    SYNTH_TASK_DOCS,
    SYNTH_TASKS,
)
from benchmarks.standard_tasks import TASKS as STANDARD_TASKS
from benchmarks.standard_tasks import check_task_data, load_error, package_dirs, submission_args, task_config
from methods import TokenReducer, create_reducer, get_reducer_class, list_reducers
from methods.base import AUTO, first_line
from methods.llava import LlavaLayout, check_reducer

PROGRESS_LINE = re.compile(r"\d+%\||\[A$|it/s\]|s/it\]|examples/s\]")  # a tqdm bar's refresh
SUMMARY_COLUMNS = [
    "task", "method", "budget", "metric", "value", "primary", "n", "visual_tokens_mean", "visual_tokens_max",
    "llm_prefill_tokens_mean", "generated_tokens_mean", "prefill_tflops_mean", "llm_prefill_tflops_mean",
    "reducer_tflops_mean", "total_tflops_mean", "relevant_precision_mean", "relevant_recall_mean",
    "prefill_ms_median", "decode_ms_per_token_median", "reducer_ms_median", "timed_batches", "peak_memory_mb",
    "wall_s", "samples_per_s", "model", "method_args", "cell_id",
    "limit", "seed", "batch_size", "device", "dtype", "git_sha", "torch_version", "transformers_version",
    "lmms_eval_version", "time_utc",
]


@dataclass(frozen=True)
class Cell:
    """One unit of work and of storage."""

    task: str
    method: str
    budget: int | str  # visual tokens, or "auto" for methods that choose their own count

    @property
    def name(self) -> str:
        return f"{self.task}__{self.method}__{self.budget}"


@dataclass(frozen=True)
class RunSpec:
    """A sweep, validated on construction. `budgets` empty means the default fractions of the patch count."""

    model: Path = SMOKE_MODEL
    methods: tuple[str, ...] = ()
    budgets: tuple[int | str, ...] = ()
    tasks: tuple[str, ...] = SMOKE_TASKS
    limit: int | None = None
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    output: Path = DEFAULT_OUTPUT
    include_paths: tuple[Path, ...] = ()
    device: str = "cpu"
    dtype: str = "auto"
    method_kwargs: tuple[tuple[str, str, object], ...] = ()  # (method, argument, value), from --method-args
    task_data: tuple[tuple[str, Path], ...] = ()  # (task, local dataset copy), from --task-data

    methods_given: bool = dataclasses.field(init=False, default=False)  # False: the default set (every method)

    def __post_init__(self) -> None:
        # default: every registered method that can run on this model (learned ones need a trained controller)
        default = tuple(m for m in list_reducers() if not needs_checkpoint(m) or self.controller(m).is_dir())
        object.__setattr__(self, "methods_given", bool(self.methods))
        object.__setattr__(self, "methods", expand_methods(self.methods or default))
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        for b in self.budgets:
            if b != AUTO and (not isinstance(b, int) or b < 1):
                raise ValueError(f"budgets are numbers of visual tokens >= 1 or {AUTO!r}, got {b!r}")
        if not self.tasks:
            raise ValueError("give at least one task")
        for method, arg, _ in self.method_kwargs:
            if method not in self.methods:
                raise ValueError(f"--method-args names {method}.{arg}, but {method} is not among the methods run")
        check_task_data(self.tasks, self.task_data, self.limit)

    def data_path(self, task: str) -> Path | None:
        """The local dataset copy given for `task` with --task-data, or None (lmms-eval's own loading)."""
        return next((Path(p) for t, p in self.task_data if t == task), None)

    def kwargs_for(self, method: str) -> dict:
        """Constructor arguments for `method`: the command line's, the model's trained controller if any, and
        --seed for methods that draw at random (a `seed` argument), unless --method-args sets it."""
        kwargs = {arg: value for m, arg, value in self.method_kwargs if m == method}
        if needs_checkpoint(method) and "checkpoint" not in kwargs and self.controller(method).is_dir():
            kwargs["checkpoint"] = str(self.controller(method))
        if "seed" in inspect.signature(get_reducer_class(method).__init__).parameters:
            kwargs.setdefault("seed", self.seed)
        return kwargs

    def controller(self, method: str) -> Path:
        """Where a learned method's controller for this model lives by default: MODEL/controllers/METHOD."""
        return Path(self.model) / "controllers" / method

    def cells(self, num_patches: int) -> tuple[list[Cell], list[str]]:
        """Expand methods x budgets x tasks. Returns the cells and notes for the printed plan.

        `full` and budgets >= the patch count mean no pruning: they become one `full` cell per task.
        """
        numeric = sorted({b for b in self.budgets if b != AUTO})
        if not self.budgets:
            numeric = sorted({max(1, round(num_patches * f)) for f in DEFAULT_BUDGET_FRACTIONS})
        notes = []
        repeated = sorted({b for b in self.budgets if self.budgets.count(b) > 1}, key=str)
        if repeated:
            notes.append(f"budget{'s' * (len(repeated) > 1)} {', '.join(map(str, repeated))} given more than once: "
                         "each runs once")
        over = [b for b in numeric if b >= num_patches]
        if over:
            notes.append(f"budgets {over} >= the {num_patches} patches mean no pruning: run once, as `full`")
        budgets: list[int | str] = [b for b in numeric if b < num_patches] + ([AUTO] if AUTO in self.budgets else [])
        pairs: list[tuple[str, int | str]] = []
        for m in self.methods:
            cls = get_reducer_class(m)
            label = cls.budget_label(self.kwargs_for(m))  # e.g. fastv.ratio=0.5: one cell, "R=0.5"
            if label is not None:
                pairs.append((m, label))
                continue
            if not cls.uses_budget:
                pairs.append((m, num_patches))
                continue
            pairs += [(m, b) for b in budgets if b != AUTO or cls.supports_auto]
            if AUTO in budgets and not cls.supports_auto:
                notes.append(f"{m} has no {AUTO!r} budget: runs at the numeric budgets only")
        if over or "full" in self.methods:
            pairs.append(("full", num_patches))
        pairs = list(dict.fromkeys(pairs))
        return [Cell(t, m, b) for t in self.tasks for m, b in pairs], notes


def needs_checkpoint(method: str) -> bool:
    """True for learned methods, which run from a trained controller."""
    return getattr(get_reducer_class(method), "needs_checkpoint", False)


def expand_methods(names: tuple[str, ...]) -> tuple[str, ...]:
    """Registered names stay; a family prefix (`adaptive` -> `adaptive_a`, `adaptive_b`) expands; others raise."""
    out: list[str] = []
    for name in names:
        family = list_reducers(f"{name}_*")
        if name in list_reducers():
            out.append(name)
        elif family:
            out += family
        else:
            get_reducer_class(name)  # raises with close matches and the list of names
    return tuple(dict.fromkeys(out))


@dataclass
class Plan:
    """A sweep's cells, computed once and checked before any work: each cell's reducer is built and checked
    against the model's layout, so a bad method argument fails before the output folder is touched."""

    config: object  # the checkpoint's LlavaConfig
    layout: LlavaLayout
    cells: list[Cell]
    reducers: list[TokenReducer]  # one per cell, in eval mode
    notes: list[str]


def read_config(model: Path):
    """The checkpoint's config, or a one-line error saying what is wrong with the folder."""
    from transformers import AutoConfig

    if not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"--model {model} is not a llava-hf checkpoint folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(model, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises several kinds for a bad or foreign config
        raise ValueError(f"--model {model}: config.json cannot be read as a model config ({first_line(e)})") from None
    if config.model_type != "llava":
        raise ValueError(f"--model {model} is a {config.model_type!r} checkpoint; run_bench.py needs a llava-hf one "
                         "(LlavaForConditionalGeneration, e.g. llava-hf/llava-1.5-7b-hf)")
    return config


def check_device(device: str) -> None:
    """Raise ValueError unless `device` names a device this machine has."""
    import torch

    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise ValueError(f"--device {device}: use cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no usable CUDA device (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda}); use --device cpu")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")


def make_plan(spec: RunSpec) -> Plan:
    """Expand and check the sweep: every cell's reducer is built and checked against the model (no weights load)."""
    from flops.shapes import check_shapes

    check_device(spec.device)
    config = read_config(spec.model)
    check_shapes(config, Path(spec.model) / "config.json")
    layout = LlavaLayout.from_config(config)
    cells, notes = spec.cells(layout.num_patches)
    kept, reducers, skipped = [], [], {}
    for cell in cells:
        if cell.method in skipped:
            continue
        try:
            reducer = make_reducer(cell, spec)
            check_reducer(reducer, layout)
        except (ValueError, NotImplementedError) as e:
            if spec.methods_given:
                raise
            skipped[cell.method] = first_line(e)  # the default set runs what fits the model, and says what not
            continue
        kept.append(cell)
        reducers.append(reducer)
    notes += [f"{m} skipped: {why}" for m, why in skipped.items()]
    if not kept:
        raise ValueError("the plan is empty: give methods and budgets that apply to each other")
    return Plan(config, layout, kept, reducers, notes)


def task_docs(task: str, limit: int | None) -> int | None:
    """Samples a cell of `task` evaluates, where known without loading the data."""
    known = SYNTH_TASK_DOCS.get(task) or (STANDARD_TASKS[task].docs if task in STANDARD_TASKS else None)
    if known is None:
        return limit
    return known if limit is None else min(limit, known)


def plan_costs(plan: Plan, spec: RunSpec, text_tokens: int) -> list[dict]:
    """Estimated cost of each cell from the FLOPs counter, on a prompt of `text_tokens` tokens besides the image."""
    from flops.analytic import ModelShape, count
    from flops.shapes import shape_record

    shape = ModelShape.from_config(plan.config)
    out = []
    for cell, reducer in zip(plan.cells, plan.reducers, strict=True):
        per = None
        if not getattr(reducer, "auto", False):  # an 'auto' count depends on the image
            per = 2 * count(shape_record(plan.config, reducer, text_tokens), shape).prefill / 1e9
        out.append({"task": cell.task, "method": cell.method, "budget": cell.budget,
                    "samples": task_docs(cell.task, spec.limit), "gflops_per_sample": per})
    return out


# ---------------------------------------------------------------------------------------------- storage


class DiskFullError(OSError):
    """A results file could not be written for lack of space (or quota); the message says which and what to do."""


@contextlib.contextmanager
def _temporary(path: Path):
    """A temporary name beside `path`, renamed over it when the block succeeds and removed when it fails, so no
    partial file is ever left; a full disk becomes a DiskFullError naming the file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(e.errno, f"no space left on the device to write {path}; free some space or pass "
                                "another --output, then rerun the same command (finished cells are kept)") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_write(path: Path, text: str) -> None:
    with _temporary(path) as tmp:
        tmp.write_text(text)


class OutputBusyError(RuntimeError):
    """Another run is writing to the same output directory."""


class ResultStore:
    """Finished cells on disk, and the combined files rebuilt from them. One writer at a time: `prepare` takes an
    exclusive lock on OUTPUT/.lock (released when the process ends, however it ends), and a second run refuses."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.cells_dir = self.root / "cells"
        self.pictures_dir = self.root / "pictures"
        self._lock = None

    def check_writable(self) -> None:
        """Raise PermissionError unless the output directory exists and is writable, or could be created."""
        existing = self.root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write to output directory {self.root}: {existing} is not a writable "
                                  "directory; pass --output DIR")
        if self.root.is_dir() and any(self.root.iterdir()) and not self.cells_dir.is_dir():
            held = ", ".join(sorted(p.name for p in self.root.iterdir())[:4])
            raise PermissionError(f"--output {self.root} holds files run_bench.py did not write ({held}, ...) and is "
                                  "not one of its results folders (no cells/); pass a new or empty --output")
        if (self.root / ".lock").is_file():  # another run holds it: say so now, not after loading the model
            self._take_lock()
            self.release()

    def prepare(self) -> None:
        """Create the folder, check that a file can be written there (one byte: a full disk fails here, before any
        work) and take the lock. On failure nothing is left that was not there before."""
        created = not self.cells_dir.is_dir()
        try:
            self.cells_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.cells_dir / ".write-test", "x")
            (self.cells_dir / ".write-test").unlink()
            self._take_lock()
        except OSError as e:
            if created and self.cells_dir.is_dir() and not any(self.cells_dir.iterdir()):
                self.cells_dir.rmdir()
            if isinstance(e, DiskFullError) or e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(errno.ENOSPC, f"no space left on the device to write {self.root}; free some "
                                    "space or pass another --output") from None
            raise PermissionError(
                f"cannot write to output directory {self.root}: {e.strerror}; pass --output DIR") from e

    def _take_lock(self) -> None:
        import fcntl

        f = open(self.root / ".lock", "a+")  # noqa: SIM115 - held open until release() or the process ends
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise OutputBusyError(f"{self.root} is in use by another run_bench.py ({holder}); wait for it to "
                                  "finish or pass another --output") from None
        self._lock = f  # the file stays; only the lock on it says whether a run is writing
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {platform.node()}")
        try:
            f.flush()
        except OSError:
            self.release()
            raise

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def path(self, cell: Cell, fingerprint: str) -> Path:
        return self.cells_dir / f"{cell.name}__{fingerprint}.json"

    def done(self, cell: Cell, fingerprint: str) -> bool:
        """True when the cell's file is there and readable (an unreadable one is set aside by `load_all`)."""
        return self.path(cell, fingerprint).is_file() and self._read(self.path(cell, fingerprint))[0] is not None

    def save(self, cell: Cell, fingerprint: str, model: Path, rows: list[dict], samples: list[dict]) -> None:
        """Write the cell atomically; files of the same cell under other conditions move to cells/superseded/."""
        record = {"cell": cell.name, "fingerprint": fingerprint, "model": str(Path(model).resolve()), "rows": rows,
                  "samples": samples}
        _atomic_write(self.path(cell, fingerprint), json.dumps(record))
        for old in self.cells_dir.glob(f"{cell.name}__*.json"):
            if old.name != self.path(cell, fingerprint).name:
                self._move(old, "superseded")

    def _move(self, f: Path, why: str) -> Path:
        """Set a file aside (never delete what may be the user's): cells/<why>/<name>."""
        (self.cells_dir / why).mkdir(exist_ok=True)
        target = self.cells_dir / why / f.name
        os.replace(f, target)
        return target

    def _read(self, f: Path) -> tuple[dict | None, str]:
        """A cell file's content, or None and why it is not one (truncated, foreign, renamed, older format)."""
        try:
            data = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return None, f"not readable ({type(e).__name__})"
        name, _, fp = f.stem.rpartition("__")
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            return None, "not a cell file of run_bench.py"
        if "fingerprint" not in data:
            return None, "a cell file of an older version of run_bench.py"
        if data.get("cell") != name or data.get("fingerprint") != fp or not isinstance(data.get("samples"), list):
            return None, "a cell file whose name does not match its content"
        return data, ""

    def load_all(self, model: Path | None = None) -> tuple[list[dict], list[dict], list[str]]:
        """Every readable cell's rows and samples, and notes. A file that is not a readable cell, or a cell of
        another model than `model`, is moved to cells/set_aside/ and named in the notes (its cell is recomputed)."""
        rows, samples, notes = [], [], []
        here = None if model is None else str(Path(model).resolve())
        for f in sorted(self.cells_dir.glob("*.json")):
            data, why = self._read(f)
            if data is not None and here is not None and data.get("model") != here:
                data, why = None, f"a cell of another model ({data.get('model')})"
            if data is None:
                notes.append(f"{f.name} is {why}: moved to {self._move(f, 'set_aside')}")
                continue
            rows += data["rows"]
            samples += data["samples"]
        return rows, samples, notes

    def rebuild(self, model: Path | None = None) -> tuple[list[dict], list[str]]:
        """Rewrite summary.csv and samples.jsonl from every finished cell; return the summary rows and the notes of
        `load_all` (files set aside)."""
        rows, samples, notes = self.load_all(model)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        _atomic_write(self.root / "summary.csv", buf.getvalue())
        _atomic_write(self.root / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
        return rows, notes

    def save_pictures(self, pictures: dict[tuple[str, int], dict]) -> None:
        """Write each captured model-input image once: pictures/<task>__<doc_id>.png and .json (question, grid)."""
        from PIL import Image

        for (task, doc_id), pic in pictures.items():
            stem = self.pictures_dir / f"{task}__{doc_id}"
            if stem.with_suffix(".json").is_file():
                continue
            self.pictures_dir.mkdir(parents=True, exist_ok=True)
            with _temporary(stem.with_suffix(".png")) as tmp:
                Image.fromarray(pic["image"].numpy()).save(tmp, format="PNG")
            meta = {"task": task, "doc_id": doc_id, "question": pic["question"], "grid": pic["grid"]}
            _atomic_write(stem.with_suffix(".json"), json.dumps(meta))  # last: marks the picture complete


# ---------------------------------------------------------------------------------------------- provenance


def provenance(spec: RunSpec, device: str) -> dict:
    import lmms_eval
    import torch
    import transformers

    from benchmarks.distributed import launched_world_size
    from benchmarks.lmms_model import resolve_dtype

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


def file_identity(path: str | Path) -> list:
    """[name, size, mtime_ns] of a checkpoint's weight and config files (a folder's, or one file's)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in {".safetensors", ".bin", ".json"})
    else:
        files = [p] if p.is_file() else []
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


HASHED_BYTES = 64 * 2**20  # files up to this size are identified by their content, larger ones by size and mtime
DATA_FILE = re.compile(r"[\w./~-]+\.(?:parquet|jsonl|json|csv|tsv|arrow)\b")


def content_identity(path: Path) -> list:
    """[relative name, size, sha1 or mtime_ns] of a file, or of every file under a folder."""
    path = Path(path)
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path] if path.is_file() else []
    out = []
    for f in files:
        size = f.stat().st_size
        ident = hashlib.sha1(f.read_bytes()).hexdigest() if size <= HASHED_BYTES else f.stat().st_mtime_ns
        out.append([str(f.relative_to(path)) if path.is_dir() else f.name, size, ident])
    return out


def task_identity(tm, spec: RunSpec, task: str) -> list:
    """What a task's numbers depend on besides the model and method: the YAML and Python files of its folder (config,
    prompts, scoring), the local data files its YAML names (`data_files`), and its `--task-data` copy."""
    where = tm.task_index.get(task, {}).get("yaml_path")
    code, data = [task], []
    if isinstance(where, str) and Path(where).is_file():
        yaml = Path(where)
        code += [[f.name, hashlib.sha1(f.read_bytes()).hexdigest()] for f in sorted(yaml.parent.glob("*.yaml"))
                 + sorted(yaml.parent.glob("*.py"))]
        named = {(yaml.parent / m).resolve() for m in DATA_FILE.findall(yaml.read_text())}
        data = [content_identity(f) for f in sorted(named) if f.is_file()]
    local = spec.data_path(task)
    if local is not None:
        data.append([str(local.expanduser().resolve()), content_identity(local.expanduser())])
    return [code, data]


def fingerprint(spec: RunSpec, method_args: dict, task: list) -> str:
    """A cell's identity: the model (path and its files, so a checkpoint rewritten in place is not reused), dtype
    and device type, the method's arguments (and a controller checkpoint's files), --limit, --seed and the task
    (`task_identity`). The code version is not part of it: cells of another version are reported (`run`)."""
    from benchmarks.lmms_model import resolve_dtype

    dtype = str(resolve_dtype(spec.dtype, spec.device)).removeprefix("torch.")
    parts = [str(Path(spec.model).resolve()), file_identity(spec.model), dtype, spec.device.split(":")[0],
             method_args, spec.limit, spec.seed, task]
    if method_args.get("checkpoint"):
        parts.append(file_identity(method_args["checkpoint"]))
    key = json.dumps(parts, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------- tasks


def task_manager(spec: RunSpec):
    """A TaskManager that knows our tasks and the user's include paths; lmms-eval's defaults only if needed."""
    from lmms_eval.tasks import TaskManager

    paths = [str(SYNTH_TASKS)] + [str(p) for p in spec.include_paths] + package_dirs(spec.tasks)
    for p in spec.include_paths:
        if not Path(p).is_dir():
            raise FileNotFoundError(f"--include-path {p} is not a directory of lmms-eval task YAMLs")
    tm = TaskManager(include_defaults=False, include_path=paths)
    if not all(t in tm.all_tasks for t in spec.tasks):
        tm = TaskManager(include_path=paths)
    unknown = [t for t in spec.tasks if t not in tm.all_tasks]
    if unknown:
        hints = {t: difflib.get_close_matches(t, tm.all_tasks, n=3) for t in unknown}
        msg = "; ".join(f"{t!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for t, h in hints.items())
        raise KeyError(f"unknown task {msg}. Our tasks: {', '.join(SMOKE_TASKS)}; `run_bench.py --list` lists them")
    return tm


def ensure_task_data(tasks: tuple[str, ...]) -> None:
    """Our synthetic benchmark is generated on first use (deterministic, seeded)."""
    if any(t.startswith("synth_") for t in tasks):
        from benchmarks.synthetic.generate import DATA_DIR, ensure_test_data

        if not (DATA_DIR / "test.parquet").is_file():
            print(f"writing the synthetic task's 1,000 questions to {DATA_DIR} (first use, a few seconds)")
        ensure_test_data()


# ---------------------------------------------------------------------------------------------- running


def make_reducer(cell: Cell, spec: RunSpec) -> TokenReducer:
    """The cell's reducer, in eval mode: the method's defaults, overridden by --method-args."""
    cls, kwargs = get_reducer_class(cell.method), spec.kwargs_for(cell.method)
    budget = cell.budget if cls.uses_budget and cls.budget_label(kwargs) is None else None
    try:
        return create_reducer(cell.method, budget, **kwargs).eval()
    except TypeError as e:  # an argument the constructor does not take
        raise ValueError(f"{cell.method}: {e}; see the method's docstring for its arguments") from None


def evaluate_cell(lm, cell: Cell, reducer: TokenReducer, spec: RunSpec, tm, prov: dict,
                  verbose: bool = False) -> tuple[list[dict], list[dict]]:
    """Run one cell through lmms-eval; return its summary rows and sample records. Unless `verbose`, lmms-eval's
    and datasets' progress bars are held back (`quiet_progress`)."""
    import torch
    from lmms_eval.evaluator import simple_evaluate

    from benchmarks.distributed import gather_model_state

    lm.set_reducer(reducer)
    lm.records.clear()
    lm.batch_times.clear()
    cuda = lm.model.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(lm.model.device)
    from tenacity import RetryError

    t0 = time.perf_counter()
    try:
        with quiet_progress(enabled=not verbose):
            res = simple_evaluate(
                model=lm, tasks=[task_config(cell.task, spec.data_path(cell.task))], limit=spec.limit,
                log_samples=True, bootstrap_iters=0, task_manager=tm, cli_args=submission_args(spec.output),
                random_seed=spec.seed, numpy_random_seed=spec.seed, torch_random_seed=spec.seed,
                fewshot_random_seed=spec.seed, datetime_str=time.strftime("%Y%m%d_%H%M%S"), verbosity="WARNING",
            )
    except RetryError as e:  # lmms-eval's retried dataset load failed
        raise load_error(cell.task, spec.data_path(cell.task), e) from e
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(lm.model.device) if cuda else _peak_rss()
    peak = gather_model_state(lm, peak)  # several processes: rank 0 gets every shard's token traces and times
    if lm.rank != 0:
        return [], []  # lmms-eval returns results on rank 0 only, and rank 0 writes them
    if res is None:
        raise RuntimeError(f"lmms-eval returned no results for {cell.name}")
    samples = sample_records(res, cell, lm)
    times = cell_times(lm.batch_times)
    times["peak_memory_mb"] = round(peak / 2**20, 1)
    return summary_rows(res, cell, samples, reducer, wall, {**times, **prov}), samples


@contextlib.contextmanager
def quiet_progress(enabled: bool = True):
    """Hold back the progress bars that lmms-eval and datasets draw on stderr (several per cell, and one line per
    refresh in a log file); whatever else they write there is passed on when the block ends."""
    if not enabled:
        yield
        return
    import datasets

    was_on = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    finally:
        if was_on:
            datasets.enable_progress_bars()
        for line in held.getvalue().replace("\r", "\n").splitlines():
            if line.strip() and not PROGRESS_LINE.search(line):
                print(line, file=sys.stderr)


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


def _peak_rss() -> int:
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
        "method_args": json.dumps(reducer.method_args(), sort_keys=True),
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


def run(spec: RunSpec, plan: Plan | None = None, tm=None, progress: bool = True, verbose: bool = False,
        force: bool = False, lm=None) -> list[dict]:
    """Evaluate every cell of `spec` (planned by `make_plan` unless given) that is not already in the output folder
    under the same conditions (all of them with `force`); return the summary rows of this plan's cells (the folder's
    summary.csv also keeps its other cells). Prints one line per finished cell; `progress` draws a bar over the cells
    on a terminal; `verbose` lets lmms-eval's own progress bars and messages through."""
    from tqdm import tqdm

    from benchmarks.distributed import current_world
    from benchmarks.lmms_model import ReducedLlavaLMM

    plan = plan or make_plan(spec)
    world = current_world(spec.device)  # several processes: each evaluates a shard, rank 0 writes
    store = ResultStore(spec.output)
    if world.is_main:
        store.check_writable()  # fail before the model loads, without creating anything
    tm = tm or task_manager(spec)
    if lm is None:  # a model that cannot be loaded fails here, before the output directory is touched
        with quiet_progress(enabled=not verbose):  # transformers' weight-loading bar
            lm = ReducedLlavaLMM(pretrained=str(spec.model), method="full", batch_size=spec.batch_size,
                                 device=spec.device, dtype=spec.dtype)
    if world.is_main:
        store.prepare()
        with quiet_progress(enabled=not verbose):
            ensure_task_data(spec.tasks)
        for note in store.rebuild(spec.model)[1]:  # unreadable or foreign cell files set aside, named
            print(f"note: {note}")
    world.barrier()
    prov = provenance(spec, spec.device)
    tasks = {t: task_identity(tm, spec, t) for t in spec.tasks}
    planned = [(cell, reducer, fingerprint(spec, {"method": cell.method, **reducer.method_args()}, tasks[cell.task]))
               for cell, reducer in zip(plan.cells, plan.reducers, strict=True)]
    done = world.broadcast([not force and store.done(cell, fp) for cell, _, fp in planned])  # rank 0's files decide
    todo = [p for p, d in zip(planned, done, strict=True) if not d]
    if world.is_main and len(todo) < len(planned):
        kept = [store.path(c, fp) for (c, _, fp), d in zip(planned, done, strict=True) if d]
        shas = {r.get("git_sha") for f in kept for r in store._read(f)[0]["rows"]} - {prov["git_sha"]}
        print(f"{len(kept)} of {len(planned)} cells already in {spec.output} under the same conditions: kept "
              "(--force recomputes them)" + (f"; computed by another code version ({', '.join(sorted(map(str, shas)))})"
                                             if shas else ""))
    bar = tqdm(total=len(todo), desc="sweep", unit="cell", file=sys.stderr,
               disable=None if progress and world.is_main else True)  # None: only on a terminal
    for i, (cell, reducer, fp) in enumerate(todo, 1):
        bar.set_postfix_str(f"{cell.task} {cell.method} {cell.budget}")
        lm.progress = lambda done, total, c=cell: bar.set_postfix_str(f"{c.task} {c.method} {c.budget}: "
                                                                       f"{done}/{total} samples")
        rows, samples = evaluate_cell(lm, cell, reducer, spec, tm, prov, verbose)
        if world.is_main:
            for r in rows + samples:
                r["cell_id"] = fp
            store.save(cell, fp, spec.model, rows, samples)
            store.save_pictures(lm.pictures)
            store.rebuild()
            bar.write(cell_line(i, len(todo), rows), file=sys.stdout)
        bar.update()
    bar.close()
    lm.progress = None
    rows = store.rebuild()[0] if world.is_main else []
    store.release()
    world.barrier()  # the other processes end when rank 0 has written everything
    ids = {fp for _, _, fp in planned}
    return [r for r in rows if r.get("cell_id") in ids]  # this plan's cells only, not others kept in the folder


def dataclass_dict(spec: RunSpec) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(spec).items()}
