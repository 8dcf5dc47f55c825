"""The plan of a sweep: its cells (task, method, budget), each cell's reducer, and each cell's identity.

`make_plan` expands and checks a `RunSpec` once, before any work: every cell's reducer is built and checked against
the model's layout, so a bad method argument fails before the output folder is touched. `fingerprint` is a cell's
identity: everything that changes its numbers (results/README.md lists it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from lmms_eval.utils import load_yaml_config
from transformers import AutoConfig

from benchmarks.defaults import (
    CONVERSATIONS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_BUDGET_FRACTIONS,
    DEFAULT_OUTPUT,
    PLANNED_TEXT_TOKENS,
    SMOKE_MODEL,
    controllers,
    default_limit,
)
from benchmarks.tasks import CONVERSATION_TASKS, RELEVANT_PATCH_TASKS, SYNTH_TASK_DOCS, default_tasks, reference_image
from benchmarks.tasks.standard import TASKS as STANDARD_TASKS
from benchmarks.tasks.standard import check_task_data
from flops.analytic import count, model_shape
from flops.shapes import check_shapes, processor_grid, shape_record
from methods import TokenReducer, create_reducer, expand_methods, get_reducer_class, list_reducers, method_budgets
from methods.budget import Budget
from methods.cli import check_device, first_line, known_families
from methods.families import Family, family_of
from methods.loading import check_processor_files, resolve_dtype


@dataclass(frozen=True)
class Cell:
    """One unit of work and of storage."""

    task: str
    method: str
    budget: Budget  # visual tokens, a fraction of each image's, `auto`, every token (`full`) or the method's own
    seed: int | None = None  # a learned method's controller, by training seed: one cell per trained controller
    conversation: str | None = None  # a conversation task's: "prune-once" or "re-prune" (`CONVERSATIONS`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", Budget.of(self.budget))  # a count, a fraction, "auto" read as budgets

    @property
    def name(self) -> str:
        base = f"{self.task}__{self.method}__{self.budget}"
        base = base if self.seed is None else f"{base}__seed{self.seed}"
        return base if self.conversation is None else f"{base}__{self.conversation}"


@dataclass(frozen=True)
class RunSpec:
    """A sweep, validated on construction. `budgets` empty means the default fractions of each image's tokens (as
    counts of the patches when every image has the same number)."""

    model: Path = SMOKE_MODEL
    methods: tuple[str, ...] = ()
    budgets: tuple[Budget, ...] = ()  # parsed at the edge (`Budget.parse`, `Budget.of`)
    tasks: tuple[str, ...] = ()  # none: the model's default tasks (`benchmarks.tasks.default_tasks`)
    limit: int | None = None  # none: the model's default (`benchmarks.defaults.default_limit`)
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    output: Path = DEFAULT_OUTPUT
    include_paths: tuple[Path, ...] = ()
    device: str = "cpu"
    dtype: str = "auto"
    method_kwargs: tuple[tuple[str, str, object], ...] = ()  # (method, argument, value), from --method-args
    task_data: tuple[tuple[str, Path], ...] = ()  # (task, local dataset copy), from --task-data
    conversations: tuple[str, ...] = CONVERSATIONS  # the modes a conversation task runs in, one cell each
    config: str | None = None  # the sweep config file it came from (`--config`), as "path (sha1 ...)"; recorded only
    shard: tuple[int, int] | None = None  # (I, N): run the I-th of N parts of the plan (`shard`); not in any identity

    methods_given: bool = dataclasses.field(init=False, default=False)  # False: the default set (every method)

    def __post_init__(self) -> None:
        # default: every registered method that can run on this model (learned ones need a trained controller)
        default = tuple(m for m in list_reducers()
                        if not get_reducer_class(m).needs_checkpoint or controllers(self.model, m))
        object.__setattr__(self, "methods_given", bool(self.methods))
        object.__setattr__(self, "methods", expand_methods(self.methods or default))
        object.__setattr__(self, "tasks", tuple(self.tasks) or default_tasks(self.model))
        object.__setattr__(self, "limit", default_limit(self.model) if self.limit is None else self.limit)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        try:
            budgets = tuple(Budget.of(b) for b in self.budgets)
        except ValueError:
            budgets = None
        if budgets is None or any(b.kind in ("all", "method") for b in budgets):
            raise ValueError(f"budgets are numbers of visual tokens >= 1, fractions in (0, 1) or 'auto', got "
                             f"{list(self.budgets)}")
        object.__setattr__(self, "budgets", budgets)
        if not self.tasks:
            raise ValueError("give at least one task")
        for method, arg, _ in self.method_kwargs:
            if method not in self.methods:
                raise ValueError(f"--method-args names {method}.{arg}, but {method} is not among the methods run")
        check_task_data(self.tasks, self.task_data, self.limit)
        if self.shard is not None and not 1 <= self.shard[0] <= self.shard[1]:
            raise ValueError(f"--shard {self.shard[0]}/{self.shard[1]}: write I/N with 1 <= I <= N")
        bad = [c for c in self.conversations if c not in CONVERSATIONS]
        if bad or not self.conversations:
            raise ValueError(f"--conversation takes {' and/or '.join(CONVERSATIONS)}, got {list(self.conversations)}")

    def data_path(self, task: str) -> Path | None:
        """The local dataset copy given for `task` with --task-data, or None (lmms-eval's own loading)."""
        return next((Path(p) for t, p in self.task_data if t == task), None)

    def kwargs_for(self, method: str, seed: int | None = None) -> dict:
        """Constructor arguments for `method`: the command line's, the model's trained controller of training seed
        `seed` (`benchmarks.defaults.controllers`; the lowest seed's when None) unless --method-args names a
        checkpoint, and --seed for methods that draw at random (`seeded`), unless --method-args sets it."""
        cls, kwargs = get_reducer_class(method), {arg: value for m, arg, value in self.method_kwargs if m == method}
        found = controllers(self.model, method) if cls.needs_checkpoint and "checkpoint" not in kwargs else {}
        if seed in found or (seed is None and found):  # no seed named: the lowest one's
            kwargs["checkpoint"] = str(found.get(seed) or next(iter(found.values())))
        if cls.seeded:
            kwargs.setdefault("seed", self.seed)
        return kwargs

    def controller_seeds(self, method: str) -> list[int | None]:
        """The controllers a learned method runs with: every trained seed of the model's (one cell each), or one
        cell when --method-args names a checkpoint or the method is not learned."""
        given = any(m == method and arg == "checkpoint" for m, arg, _ in self.method_kwargs)
        if not get_reducer_class(method).needs_checkpoint or given:
            return [None]
        return list(controllers(self.model, method)) or [None]

    def cells(self, num_patches: int | None) -> tuple[list[Cell], list[str]]:
        """Expand methods x budgets x tasks (x `conversations` on a conversation task) by the plan rule
        (`methods.method_budgets`); `num_patches` is every image's visual tokens, None when they vary. Returns the
        cells and notes for the printed plan. The default budgets are the same shares on every family
        (`Budget.tokens`: 16, 36 and 48 of 144 tokens), as counts where every image has `num_patches`."""
        default = [Budget.fraction(f, digits=3).at(num_patches) for f in DEFAULT_BUDGET_FRACTIONS]
        budgets = list(self.budgets) or default
        pairs, notes = method_budgets(self.methods, budgets, num_patches, self.kwargs_for)
        return [Cell(t, m, b, s, c) for t in self.tasks for m, b in pairs for s in self.controller_seeds(m)
                for c in (self.conversations if t in CONVERSATION_TASKS else (None,))], notes


@dataclass
class Plan:
    """A sweep's cells, computed once and checked before any work: each cell's reducer is built and checked
    against the model's layout, so a bad method argument fails before the output folder is touched."""

    config: object  # the checkpoint's config (LlavaConfig, Qwen2_5_VLConfig)
    family: Family
    layout: object  # the family's layout (methods.trace.LlavaLayout, QwenLayout)
    reference_grid: tuple[int, int, int] | None  # images differ in size: the (t, h, w) patch grid checks and costs use
    cells: list[Cell]
    reducers: list[TokenReducer]  # one per cell, in eval mode
    notes: list[str]

    @property
    def num_patches(self) -> int | None:
        """Every image's visual tokens, or None when they vary per image."""
        return self.layout.num_patches if self.family.fixed_tokens else None


def read_config(model: Path):
    """The checkpoint's config, or a one-line error saying what is wrong with the folder."""
    if not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"--model {model} is not a checkpoint folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(model, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises several kinds for a bad or foreign config
        raise ValueError(f"--model {model}: config.json cannot be read as a model config ({first_line(e)})") from None
    try:
        family_of(config)
    except ValueError:
        raise ValueError(f"--model {model} is a {config.model_type!r} checkpoint; run_bench.py runs "
                         f"{known_families()} folders (e.g. llava-hf/llava-1.5-7b-hf, "
                         "Qwen/Qwen2.5-VL-7B-Instruct)") from None
    return config


def make_plan(spec: RunSpec) -> Plan:
    """Expand and check the sweep: every cell's reducer is built and checked against the model (no weights load)."""
    check_device(spec.device)
    config = read_config(spec.model)
    check_processor_files(Path(spec.model))
    check_shapes(config, Path(spec.model) / "config.json")
    family = family_of(config)
    layout = family.layout(config)
    tokens = layout.num_patches if family.fixed_tokens else None  # every image's visual tokens, when fixed
    cells, notes = spec.cells(tokens)
    grid = None if family.fixed_tokens else processor_grid(config, spec.model, *reference_image(spec.tasks))
    if grid is None:
        check = family.check_reducer
    else:  # images differ in size: checked on the reference image (exactly, for the synthetic tasks), and per batch
        check = partial(family.check_reducer, image_tokens=int(layout.tokens(torch.tensor(grid))))

    kept, reducers = [], []
    skipped: dict[tuple[str, str], list] = {}  # (method, reason) -> the budgets it was skipped at
    for cell in cells:
        try:
            family.refuse(cell.method)
            reducer = make_reducer(cell, spec, tokens)
            check(reducer, layout)
            if "relevant" in reducer.needs and cell.task not in RELEVANT_PATCH_TASKS:
                raise ValueError(f"{cell.method} reads each question's relevant_patches, which only "
                                 f"{', '.join(RELEVANT_PATCH_TASKS)} record; {cell.task} does not")
        except (ValueError, NotImplementedError) as e:
            if spec.methods_given:
                raise
            # the default set runs what fits the model, and says what not
            skipped.setdefault((cell.method, first_line(e)), []).append(cell.budget)
            continue
        kept.append(cell)
        reducers.append(reducer)
    if not spec.methods_given:  # the default set leaves out learned methods without a controller: say so
        for m in list_reducers():
            if get_reducer_class(m).needs_checkpoint and m not in spec.methods:
                try:
                    family.refuse(m)
                    why = (f"no trained controller in {spec.model}/controllers/{m}; train one with `python -m "
                           f"benchmarks.tools.train_adaptive --model {spec.model} --method {m}`")
                except (ValueError, NotImplementedError) as e:
                    why = first_line(e)
                skipped.setdefault((m, why), [])
    ran = {c.method for c in kept}
    for (m, why), budgets in skipped.items():
        listed = ", ".join(map(str, dict.fromkeys(budgets)))
        at = f" at budget{'s' * (len(set(budgets)) > 1)} {listed}" if m in ran else ""
        notes.append(f"{m}{at} skipped: {why}")
    if not kept:
        raise ValueError("the plan is empty: give methods and budgets that apply to each other")
    plan = Plan(config, family, layout, grid, kept, reducers, notes)
    return plan if spec.shard is None else shard(plan, spec)


def shard(plan: Plan, spec: RunSpec) -> Plan:
    """Part I of N of `plan` (`spec.shard`): the cells dealt to N parts by their planned cost (prefill FLOPs x
    samples, `plan_costs`; a cell of unknown cost counts as the median known one), the costliest first, each to the
    part with the least so far (ties: the cell's name, then the lower part), so every part of the same command
    computes the same split, the parts are disjoint and together the whole plan. A note says what this part got."""
    index, count = spec.shard
    costs = [None if c["gflops_per_sample"] is None else c["gflops_per_sample"] * (c["samples"] or 1)
             for c in plan_costs(plan, spec, PLANNED_TEXT_TOKENS)]
    known = sorted(c for c in costs if c is not None)
    costs = [known[len(known) // 2] if c is None else c for c in costs] if known else [1.0] * len(costs)
    load, part = [0.0] * count, {}
    for k in sorted(range(len(plan.cells)), key=lambda k: (-costs[k], plan.cells[k].name)):
        j = min(range(count), key=lambda j: (load[j], j))
        part[k] = j
        load[j] += costs[k]
    mine = [k for k in range(len(plan.cells)) if part[k] == index - 1]
    if not mine:
        raise ValueError(f"--shard {index}/{count}: part {index} gets no cell, the plan has {len(plan.cells)}; give "
                         f"at most {len(plan.cells)} parts")
    note = (f"shard {index}/{count}: {len(mine)} of the plan's {len(plan.cells)} cells, "
            f"{100 * load[index - 1] / (sum(load) or 1):.0f} % of its planned prefill FLOPs")
    return dataclasses.replace(plan, cells=[plan.cells[k] for k in mine], reducers=[plan.reducers[k] for k in mine],
                               notes=[*plan.notes, note])


def task_docs(task: str, limit: int | None) -> int | None:
    """Samples a cell of `task` evaluates, where known without loading the data."""
    known = SYNTH_TASK_DOCS.get(task) or (STANDARD_TASKS[task].docs if task in STANDARD_TASKS else None)
    if known is None:
        return limit
    return known if limit is None else min(limit, known)


def plan_costs(plan: Plan, spec: RunSpec, text_tokens: int) -> list[dict]:
    """Estimated cost of each cell from the FLOPs counter, on a prompt of `text_tokens` tokens besides the image
    (a Qwen2.5-VL image at `reference_image`'s size, resized as the checkpoint's processor does)."""
    shape = model_shape(plan.config)
    out = []
    for cell, reducer in zip(plan.cells, plan.reducers, strict=True):
        per = None
        if not getattr(reducer, "auto", False):  # an 'auto' count depends on the image
            rec = shape_record(plan.config, reducer, text_tokens, image_grid=plan.reference_grid)
            per = 2 * count(rec, shape).prefill / 1e9
        out.append({"task": cell.task, "conversation": cell.conversation, "method": cell.method,
                    "budget": cell.budget, "samples": task_docs(cell.task, spec.limit), "gflops_per_sample": per})
    return out


def file_identity(path: str | Path) -> list:
    """[name, size, mtime_ns] of a checkpoint's weight and config files (a folder's, or one file's)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in {".safetensors", ".bin", ".json"})
    else:
        files = [p] if p.is_file() else []
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


HASHED_BYTES = 64 * 2**20  # files up to this size are identified by their content, larger ones by size and mtime


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


def named_data_files(yaml: Path) -> list[Path]:
    """The local data files a task YAML names (`dataset_kwargs.data_files`, read by lmms-eval's own loader: relative to
    the YAML, or a `!function` value such as our synthetic tasks' cache paths) that exist, sorted. A YAML that cannot be
    loaded names none here; building the task reports its error."""
    try:
        config = load_yaml_config(yaml_path=str(yaml))
    except Exception:  # noqa: BLE001 - the task's own build gives the one-line error
        return []
    names, todo = [], [(config.get("dataset_kwargs") or {}).get("data_files")]
    while todo:  # data_files: a path, a list of them, or {split: path or list}
        value = todo.pop()
        if isinstance(value, (str, Path)):
            names.append(value)
        elif isinstance(value, dict):
            todo += value.values()
        elif isinstance(value, (list, tuple)):
            todo += value
    return sorted(f for f in {(yaml.parent / Path(n).expanduser()).resolve() for n in names} if f.is_file())


def task_yaml(tm, task: str) -> Path | None:
    """The task's YAML file, as the task manager indexed it (None for a task without one, e.g. a Python task)."""
    where = tm.task_index.get(task, {}).get("yaml_path")
    return Path(where) if isinstance(where, str) and Path(where).is_file() else None


def task_data_files(tm, spec: RunSpec, task: str, named: list[Path] | None = None) -> list[Path]:
    """The local data a task reads: the files its YAML names that exist (`named`, when already found), and its
    `--task-data` copy."""
    yaml = task_yaml(tm, task)
    files = named if named is not None else named_data_files(yaml) if yaml is not None else []
    local = spec.data_path(task)
    return files + ([local.expanduser().resolve()] if local is not None else [])


def task_identity(tm, spec: RunSpec, task: str) -> list:
    """What a task's numbers depend on besides the model and method: the YAML and Python files of its folder (config,
    prompts, scoring), the local data files its YAML names (`data_files`), and its `--task-data` copy."""
    yaml = task_yaml(tm, task)
    named = named_data_files(yaml) if yaml is not None else []  # loads the YAML (runs its utils files): once
    for f in task_data_files(tm, spec, task, named):
        if f.is_file() and f.stat().st_size == 0:
            raise ValueError(f"{task}: its data file {f} is empty (0 bytes); regenerate or replace it (the synthetic "
                             "tasks rewrite a missing file on first use: delete it)")
    code = [task]
    if yaml is not None:
        code += [[f.name, hashlib.sha1(f.read_bytes()).hexdigest()] for f in sorted(yaml.parent.glob("*.yaml"))
                 + sorted(yaml.parent.glob("*.py"))]
    data = [content_identity(f) for f in named]
    local = spec.data_path(task)
    if local is not None:
        data.append([str(local.expanduser().resolve()), content_identity(local.expanduser())])
    return [code, data]


def short_hash(parts: object) -> str:
    """Ten hex digits of the SHA-1 of `parts` as canonical JSON."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class RunConditions:
    """What a run is, computed once (`run_conditions`): what every cell shares. `key` hashes what the numbers depend
    on (part of every cell's fingerprint); `records.provenance` writes the settings as columns of every row, with
    the code and library versions."""

    model: str  # the checkpoint as given
    model_path: str  # resolved
    model_files: list  # `file_identity`: a checkpoint rewritten in place is not reused
    dtype: str  # as run, not "auto"
    device_type: str  # cpu or cuda
    limit: int | None
    seed: int
    batch_size: int  # recorded, not hashed: it does not change the numbers

    @property
    def key(self) -> str:
        """The run's part of every cell's fingerprint."""
        return short_hash([self.model_path, self.model_files, self.dtype, self.device_type, self.limit, self.seed])


def run_conditions(spec: RunSpec) -> RunConditions:
    """The run's conditions: the model (path and files), the dtype as run, the device type, --limit and --seed."""
    return RunConditions(model=str(spec.model), model_path=str(Path(spec.model).resolve()),
                         model_files=file_identity(spec.model),
                         dtype=str(resolve_dtype(spec.dtype, spec.device)).removeprefix("torch."),
                         device_type=spec.device.split(":")[0], limit=spec.limit, seed=spec.seed,
                         batch_size=spec.batch_size)


def fingerprint(run: str, method_args: dict, task: str) -> str:
    """A cell's identity: the run's `RunConditions.key`, the method's arguments (and a controller checkpoint's files)
    and the task's `short_hash(task_identity(...))`, both computed once per run. The code version is not part of it:
    cells of another version are reported (`run`)."""
    parts = [run, method_args, task]
    if method_args.get("checkpoint"):
        parts.append(file_identity(method_args["checkpoint"]))
    return short_hash(parts)


@dataclass(frozen=True)
class PlannedCell:
    """A cell of the plan with its reducer and identity."""

    cell: Cell
    reducer: TokenReducer
    fingerprint: str
    conditions: dict  # {"run": RunConditions.key, "task": the task's identity hash}, stored with the cell


@dataclass(frozen=True)
class Identity:
    """Who every cell of a plan is (`identify`): the run's conditions, each task's identity hash, and each cell's
    fingerprint."""

    conditions: RunConditions
    tasks: dict[str, str]  # task -> short_hash(task_identity(...))
    cells: list[PlannedCell]


def identify(plan: Plan, spec: RunSpec, tm) -> Identity:
    """Every cell's fingerprint, the run's conditions and each task's identity computed once (hashing the task's
    files and the model's: after the synthetic tasks' data exist, before the output folder is touched)."""
    conditions = run_conditions(spec)
    tasks = {t: short_hash(task_identity(tm, spec, t)) for t in spec.tasks}
    cells = []
    for cell, reducer in zip(plan.cells, plan.reducers, strict=True):
        task = tasks[cell.task]
        mode = {} if cell.conversation is None else {"conversation": cell.conversation}
        fp = fingerprint(conditions.key, {"method": cell.method, **reducer.method_args, **mode}, task)
        cells.append(PlannedCell(cell, reducer, fp, {"run": conditions.key, "task": task}))
    return Identity(conditions, tasks, cells)


def make_reducer(cell: Cell, spec: RunSpec, num_patches: int | None = None) -> TokenReducer:
    """The cell's reducer, in eval mode: the method's defaults, overridden by --method-args. A fraction budget
    becomes a count when every image has `num_patches` tokens; otherwise the adapter applies it per image."""
    kwargs = spec.kwargs_for(cell.method, cell.seed)
    try:
        return create_reducer(cell.method, cell.budget.argument(num_patches), **kwargs).eval()
    except TypeError as e:  # an argument the constructor does not take
        raise ValueError(f"{cell.method}: {e}; see the method's docstring for its arguments") from None
