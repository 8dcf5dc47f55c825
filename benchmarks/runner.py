"""The sweep: every planned (task, method, budget) cell evaluated through lmms-eval and stored cell by cell.

`run` orchestrates and does nothing else: it loads the model once, evaluates the cells of the plan
(`benchmarks.plan`) that the output folder does not already hold under the same conditions, and stores each as it
finishes (`benchmarks.store`), its rows made from lmms-eval's results and the model's `Recorder`
(`benchmarks.records`).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from lmms_eval.evaluator import simple_evaluate
from tenacity import RetryError
from tqdm import tqdm

from benchmarks.console import cell_line
from benchmarks.distributed import current_world
from benchmarks.lmms_model import DocumentError, ReducedLMM
from benchmarks.plan import Cell, Plan, RunSpec, identify, task_data_files
from benchmarks.records import Recorder, cell_records, machine_load, peak_rss, provenance
from benchmarks.store import ResultStore
from benchmarks.tasks.manager import ensure_task_data
from benchmarks.tasks.standard import load_error, submission_args, task_config
from methods.cli import first_line

PROGRESS_LINE = re.compile(r"\d+%\||\[A$|it/s\]|s/it\]|examples/s\]")  # a tqdm bar's refresh


@dataclass(frozen=True)
class Evaluated:
    """One cell as lmms-eval returned it: its results (rank 0; None on the other ranks), its wall-clock time and this
    process's peak memory."""

    results: dict | None
    wall_s: float
    peak_bytes: int  # CUDA's peak allocated memory, or on CPU the process's peak resident set so far
    load: dict | None = None  # how busy the machine was besides this process (`records.machine_load`)


def evaluate_cell(lm, cell: Cell, spec: RunSpec, tm, verbose: bool = False) -> Evaluated:
    """Run one cell through lmms-eval with the model's current reducer. Unless `verbose`, lmms-eval's and datasets'
    progress bars are held back (`quiet_progress`)."""
    cuda = lm.model.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(lm.model.device)
    t0, cpu0 = time.perf_counter(), time.process_time()
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
    except DocumentError as e:  # one document: name the data it came from
        files = ", ".join(str(f) for f in task_data_files(tm, spec, cell.task)) or "the task's dataset"
        raise ValueError(f"{e}; in {files}; fix or remove that document") from e
    except (AttributeError, ImportError, OSError, KeyError, TypeError) as e:  # the task's functions or data
        where, data = tm.task_index.get(cell.task, {}).get("yaml_path"), task_data_files(tm, spec, cell.task)
        bad = unreadable_image(data) if isinstance(e, OSError) else None
        if bad is not None:  # lmms-eval decoded the images itself: find the row at fault
            raise ValueError(f"{cell.task} doc {bad[1]}: its image cannot be read ({type(e).__name__}: "
                             f"{first_line(e)}); row {bad[1]} of {bad[0]}: fix or remove it") from e
        files = ", ".join(str(f) for f in data) or "its dataset"
        raise ValueError(f"{cell.task}: lmms-eval cannot evaluate this task ({type(e).__name__}: {first_line(e)}); "
                         f"check the task's YAML ({where}) and data ({files}); --debug shows where it failed") from e
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    load = machine_load(wall, cpu, os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    peak = torch.cuda.max_memory_allocated(lm.model.device) if cuda else peak_rss()
    if lm.rank == 0 and res is None:
        raise RuntimeError(f"lmms-eval returned no results for {cell.name}")
    return Evaluated(res, wall, peak, load)


def unreadable_image(files: list[Path]) -> tuple[Path, int] | None:
    """The first (parquet file, row) whose image bytes PIL cannot open, among a task's local parquet files (rows in
    order: a split's doc ids), or None. Only on the error path: it reads every image."""
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    for f in files:
        if f.suffix != ".parquet" or not f.is_file():
            continue
        table = pq.read_table(f)
        columns = [c for c in table.column_names if isinstance(t := table.schema.field(c).type, pa.StructType)
                   and "bytes" in [x.name for x in t]]  # Hugging Face's image feature: {bytes, path}
        for c in columns:
            for row, cell in enumerate(table.column(c).to_pylist()):
                if not cell or cell.get("bytes") is None:
                    continue
                try:
                    Image.open(io.BytesIO(cell["bytes"])).load()
                except Exception:  # noqa: BLE001 - PIL raises several types for bad bytes
                    return f, row
    return None


@contextlib.contextmanager
def quiet_progress(enabled: bool = True):
    """Hold back the progress bars that lmms-eval and datasets draw on stderr (several per cell, and one line per
    refresh in a log file); whatever else they write there is passed on when the block ends. datasets' bars go by its
    own switch; lmms-eval 0.7.3 has none and passes `disable=` explicitly to its bars (`Postprocessing`, the request
    building), which overrides tqdm's `TQDM_DISABLE`, so those are filtered out of the held stderr by their shape."""
    if not enabled:
        yield
        return
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


def check_retimed(stored: dict[int, object], samples: list[dict], cell: Cell) -> None:
    """`--retime`'s guarantee: the cell measured again answered every question as the stored cell did."""
    new = {s["doc_id"]: s.get("prediction") for s in samples}
    differ = sorted(d for d in stored.keys() | new.keys() if stored.get(d) != new.get(d))
    if differ:
        raise ValueError(f"--retime: {cell.name} now answers {len(differ)} of {len(stored)} questions differently from "
                         f"its stored cell (first doc {differ[0]}): the code, the environment or the device changed "
                         "the numbers; --force recomputes it")


def load_model(spec: RunSpec, verbose: bool = False) -> ReducedLMM:
    """The checkpoint as the lmms-eval model every cell of the sweep reuses (its reducer is set per cell); a model
    that cannot be loaded fails here, before the output folder is touched. Unless `verbose`, transformers'
    weight-loading bar is held back."""
    with quiet_progress(enabled=not verbose):
        return ReducedLMM(pretrained=str(spec.model), method="full", batch_size=spec.batch_size, device=spec.device,
                          dtype=spec.dtype)


def run(spec: RunSpec, plan: Plan, tm, lm: ReducedLMM, progress: bool = True, verbose: bool = False,
        force: bool = False, retime: bool = False) -> list[dict]:
    """Evaluate every cell of `plan` (`make_plan(spec)`) that is not already in the output folder under the same
    conditions (all of them with `force`), with task manager `tm` (`benchmarks.tasks.manager.task_manager`) and model
    `lm` (`load_model(spec)`); return the summary rows of this plan's cells (the folder's summary.csv also keeps its
    other cells). Prints one line per finished cell; `progress` draws a bar over the cells on a terminal; `verbose`
    lets lmms-eval's own progress bars and messages through. `retime` evaluates the stored cells again for their
    timings and keeps the new ones only when every prediction is the stored one (else a ValueError says which cell
    differs; `force` recomputes it).

    Phases: the synthetic tasks' data; every cell's identity (`identify`); the folder held for the run
    (`ResultStore.session`); the cells it lacks, each evaluated, recorded and stored as it finishes; the paired
    comparisons."""
    world = current_world(spec.device)  # several processes: each evaluates a shard, rank 0 writes
    if world.is_main:
        with quiet_progress(enabled=not verbose):
            ensure_task_data(spec.tasks)
    world.barrier()  # the data exist before anyone hashes them
    ident = identify(plan, spec, tm)
    prov = provenance(ident.conditions, spec.device, spec.config)
    # several parts of one sweep (--shard) may share the folder; the model writes each sample's trace to `recorder`
    store, recorder = ResultStore(spec.output, shared=spec.shard is not None), Recorder()
    wanted = [] if force else [(p.cell, p.fingerprint) for p in ident.cells]  # taken back if set aside earlier
    with store.session(world, spec.model, ident.conditions.key, ident.tasks, wanted) as notes:
        for note in notes:
            print(f"note: {note}")
        done = world.broadcast([not force and store.done(p.cell, p.fingerprint) for p in ident.cells])  # rank 0's
        again = {p.fingerprint for p, d in zip(ident.cells, done, strict=True) if d and retime}  # timed again
        todo = [p for p, d in zip(ident.cells, done, strict=True) if not d or p.fingerprint in again]
        if world.is_main and any(done) and not retime:
            kept = [(p.cell, p.fingerprint) for p, d in zip(ident.cells, done, strict=True) if d]
            shas = store.code_versions(kept) - {prov["git_sha"]}
            other = f"; computed by another code version ({', '.join(sorted(shas))})" if shas else ""
            print(f"{len(kept)} of {len(ident.cells)} cells already in {spec.output} under the same conditions: "
                  f"kept (--force recomputes them){other}")
        bar = tqdm(total=len(todo), desc="sweep", unit="cell", file=sys.stderr,
                   disable=None if progress and todo and world.is_main else True)  # None: only on a terminal
        with bar:
            for i, p in enumerate(todo, 1):
                cell = p.cell
                bar.set_postfix_str(f"{cell.task} {cell.method} {cell.budget}")

                def samples_done(n: int, total: int, c: Cell = cell) -> None:
                    bar.set_postfix_str(f"{c.task} {c.method} {c.budget}: {n}/{total} samples")

                with lm.cell(p.reducer, recorder, samples_done, cell.conversation):
                    evaluated = evaluate_cell(lm, cell, spec, tm, verbose)
                recorder.peak_bytes = evaluated.peak_bytes
                records = recorder.take(world)  # every process's records, on rank 0
                if world.is_main:
                    rows, samples = cell_records(evaluated, cell, p.reducer, records, lm.model.config, prov)
                    if p.fingerprint in again:
                        check_retimed(store.predictions(cell, p.fingerprint), samples, cell)
                    store.save(cell, p.fingerprint, spec.model, p.conditions, rows, samples)
                    store.save_pictures(records.pictures)
                    store.rebuild()
                    bar.write(cell_line(i, len(todo), rows), file=sys.stdout)
                bar.update()
        # the paired comparisons, once per run (a part of a sharded sweep leaves them to the whole command)
        rows = store.rebuild(compare=spec.shard is None)[0] if world.is_main else []
    world.barrier()  # the other processes end when rank 0 has written everything
    mine = {p.fingerprint for p in ident.cells}
    return [r for r in rows if r.get("cell_id") in mine]  # this plan's cells only, not others kept in the folder
