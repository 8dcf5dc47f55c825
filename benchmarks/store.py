"""Finished cells on disk and the combined files built from them (documented for users in results/README.md).

* `cells/<task>__<method>__<budget>__<fingerprint>.parquet`: one finished cell, written atomically (temporary file +
  rename): its sample records as columns (`samples_table`), its identity, conditions and summary rows in the file's
  metadata. A sweep killed part-way keeps every finished cell; the same command afterwards keeps cells whose file
  exists with the same fingerprint. Files of a cell recomputed under other conditions move to `cells/superseded/`;
  files that are not readable cells, or cells of another model, move to `cells/set_aside/`. Nothing is deleted.
  Cell files of earlier versions (`.json`) are converted once, their originals kept in `cells/converted/`.
* `summary.csv`: one flat row per (task, method, budget, metric), from the cells' metadata after every cell (it reads
  no sample); `comparisons.csv`, the paired comparisons, at the end of a run, reading only the columns they need, one
  cell at a time. Finishing a cell costs what that cell costs, however large the folder.
* `read_samples` reads a folder's sample records back; `write_samples_jsonl` writes them as one JSON-lines file
  (what earlier versions kept as `samples.jsonl`).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import platform
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from benchmarks.distributed import World
from benchmarks.plan import Cell
from benchmarks.records import budget_tokens
from benchmarks.stats import comparisons
from methods.budget import Budget

SUMMARY_COLUMNS = [
    "task", "method", "budget", "budget_tokens", "controller_seed", "conversation", "metric", "value", "ci95_low",
    "ci95_high", "primary", "n",
    "visual_tokens_mean", "visual_tokens_max", "visual_tokens_layer_mean",
    "llm_prefill_tokens_mean", "generated_tokens_mean", "kv_cache_mb_mean", "prefill_gflops_mean",
    "llm_prefill_gflops_mean", "reducer_gflops_mean", "total_gflops_mean", "relevant_precision_mean",
    "relevant_recall_mean", "follow_up_prefill_gflops_mean", "follow_up_gflops_mean", "relevant_recall_turn2_mean",
    "prefill_ms_median", "prefill_ms_iqr", "decode_ms_per_token_median", "decode_ms_per_token_iqr",
    "reducer_ms_median", "reducer_ms_iqr", "follow_up_prefill_ms_median", "follow_up_prefill_ms_iqr",
    "timed_batches", "machine_load_other", "cpu_cores", "timing_reliable", "peak_memory_mb", "wall_s",
    "samples_per_s", "model", "method_args", "cell_id",
    "limit", "seed", "batch_size", "device", "dtype", "config", "git_sha", "torch_version", "transformers_version",
    "lmms_eval_version", "time_utc", "ci_method",
]
COMPARISON_COLUMNS = ["task", "conversation", "budget", "method", "reference", "reference_kind", "reference_budget",
                      "n_paired", "difference_pts", "difference_ci95_low_pts", "difference_ci95_high_pts", "mcnemar_p",
                      "significant", "p_adjusted_bh", "significant_bh"]


# FLOPs columns of cells written before one unit (GFLOPs) everywhere: old name -> (new name, factor)
OLD_FLOPS_COLUMNS = {
    **{f"{k}_tflops_mean": (f"{k}_gflops_mean", 1e3) for k in
       ("prefill", "llm_prefill", "reducer", "total", "follow_up_prefill", "follow_up")},
    **{f"{k}_gmacs": (f"{k}_gflops", 2.0) for k in
       ("prefill", "llm_prefill", "reducer", "total", "follow_up_prefill", "follow_up")},
}


META_KEY = b"run_bench.cell"  # a cell file's Parquet metadata: cell, fingerprint, model, conditions, rows, json_columns
COMPARED = ("task", "conversation", "method", "budget", "doc_id", "correct", "prefill_gflops")  # what stats reads


def samples_table(samples: list[dict], meta: dict) -> pa.Table:
    """A cell's sample records as one Arrow table, with `meta` (cell, fingerprint, model, conditions, summary rows) in
    its schema's metadata. One column per key in first-seen order (null in a record without the key); per-layer
    counts, kept indices and a conversation's turns are list columns. A column whose values Arrow cannot type as one
    (a `target` that is a string in one record and a list in another) is stored as JSON text and named in the
    metadata's `json_columns`, so that every value reads back as it was written."""
    keys = list(dict.fromkeys(k for s in samples for k in s))
    columns, as_json = {}, []
    for k in keys:
        values = [s.get(k) for s in samples]
        try:
            columns[k] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            columns[k] = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
            as_json.append(k)
    return pa.table(columns).replace_schema_metadata({META_KEY: json.dumps({**meta, "json_columns": as_json})})


def cell_meta(path: Path, schema: pa.Schema | None = None) -> dict:
    """A cell file's metadata (`samples_table`), read from its footer alone (or from its `schema`, already read).
    Raises ValueError, OSError or KeyError for a file that is not one."""
    return json.loads((schema or pq.read_schema(path)).metadata[META_KEY])


def write_cell(path: Path, samples: list[dict], meta: dict) -> None:
    """Write a cell file (`samples_table`) atomically: a temporary file beside `path`, renamed over it."""
    with _temporary(path) as tmp:
        pq.write_table(samples_table(samples, meta), tmp)


def cell_files(root: Path) -> list[Path]:
    """The finished cells of the results folder `root`, in file-name order (not the set-aside or superseded ones)."""
    return sorted((Path(root) / "cells").glob("*.parquet"))


def cell_samples(path: Path, columns: Iterable[str] | None = None) -> list[dict]:
    """A cell file's sample records, or only `columns` of them (those it has); JSON-text columns decoded. A file that
    cannot be read as a cell (truncated, foreign) is a ValueError naming it."""
    try:
        schema = pq.read_schema(path)
        table = pq.read_table(path, columns=None if columns is None else [c for c in columns if c in schema.names])
        as_json = cell_meta(path, schema).get("json_columns", ())
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as e:
        raise ValueError(f"{path} is not a readable cell file ({type(e).__name__}: {e})") from None
    records = table.to_pylist()
    for k in set(as_json) & set(table.column_names):
        for r in records:
            if r[k] is not None:
                r[k] = json.loads(r[k])
    return records


def read_summary(root: Path) -> list[dict]:
    """The summary rows of every finished cell of the results folder `root` (what summary.csv holds), from the cell
    files' metadata alone, in file-name order."""
    return [r for f in cell_files(root) for r in cell_meta(f)["rows"]]


def read_samples(root: Path, columns: Iterable[str] | None = None) -> list[dict]:
    """Every sample record of the results folder `root` (its finished cells, in file-name order), or only `columns`
    of them. For a large folder, read cell by cell (`cell_samples` over `cell_files`) or query the Parquet files
    directly (pandas, pyarrow.dataset, DuckDB)."""
    return [r for f in cell_files(root) for r in cell_samples(f, columns)]


def write_samples_jsonl(root: Path, out: Path) -> int:
    """Write every sample record of the results folder `root` to `out` as JSON lines (one record per line, as earlier
    versions kept `samples.jsonl`), one cell at a time; returns how many."""
    n = 0
    with _temporary(Path(out)) as tmp, open(tmp, "w") as f:
        for cell in cell_files(root):
            records = cell_samples(cell)
            f.writelines(json.dumps(r) + "\n" for r in records)
            n += len(records)
    return n


def upgraded(data: dict) -> dict:
    """An earlier version's JSON cell file's content in the current columns, for its conversion (`convert_old`): a
    cell written before `budget_tokens` gets it, and one written before FLOPs had one unit its GFLOPs (summary TFLOPs
    x 1000, samples' GMACs x 2, and no `reducer_macs`). Parquet cells are written in the current columns."""
    for r in data["rows"]:
        if "budget_tokens" not in r:
            r["budget_tokens"] = budget_tokens(Budget.of(r["budget"]), r.get("visual_tokens_mean"))
    for s in data.get("samples", ()):
        s.pop("reducer_macs", None)  # the trace's count, now only as `reducer_gflops`
    for r in [*data["rows"], *data.get("samples", ())]:
        for old in [k for k in r if k in OLD_FLOPS_COLUMNS]:
            new, factor = OLD_FLOPS_COLUMNS[old]
            value = r.pop(old)
            r[new] = None if value is None else round(factor * value, 6)
    return data


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


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """`rows` as CSV with these `columns` (other keys left out), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all (a temporary file beside it, renamed over it)."""
    with _temporary(path) as tmp:
        tmp.write_text(text)


class OutputBusyError(RuntimeError):
    """Another run is writing to the same output directory."""


class ResultStore:
    """Finished cells on disk, and the combined files rebuilt from them. One writer at a time: `prepare` takes an
    exclusive lock on OUTPUT/.lock (released when the process ends, however it ends), and a second run refuses. The
    parts of one sharded sweep (`shared`) take it shared: they write the folder together (each its own cells,
    atomically; the conditions they move cells by are the same for all), and a whole run and a part exclude each
    other."""

    def __init__(self, root: Path, shared: bool = False) -> None:
        self.root = Path(root)
        self.shared = shared
        self.cells_dir = self.root / "cells"
        self.pictures_dir = self.root / "pictures"
        self._lock = None
        self._created: set[str] = set()  # what `prepare` created, for `abandon`
        self._seen: dict[Path, tuple[tuple[int, int], dict | None, str]] = {}  # `_memo`'s record of cell files

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
        self._created = {name for name, p in (("root", self.root), ("cells", self.cells_dir),
                                              (".lock", self.root / ".lock")) if not p.exists()}
        try:
            self.cells_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.cells_dir / ".write-test", "x")
            (self.cells_dir / ".write-test").unlink()
            self._take_lock()
        except OSError as e:
            if "cells" in self._created and self.cells_dir.is_dir() and not any(self.cells_dir.iterdir()):
                self.cells_dir.rmdir()
            if isinstance(e, DiskFullError) or e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(errno.ENOSPC, f"no space left on the device to write {self.root}; free some "
                                    "space or pass another --output") from None
            raise PermissionError(
                f"cannot write to output directory {self.root}: {e.strerror}; pass --output DIR") from e

    @contextlib.contextmanager
    def session(self, world: World, model: Path, run: str, tasks: dict[str, str],
                wanted: list[tuple[Cell, str]] = ()) -> Iterator[list[str]]:
        """A run's hold on the folder, as one block. On entering: create it and take the lock (`prepare`), set aside
        what is not a readable cell of `model` (`set_aside`), move the cells computed under other conditions than
        run `run` and the task identities `tasks` to cells/superseded/ (`supersede`), and take back from there the
        (cell, fingerprint) pairs of `wanted` (`take_back`); yields notes saying what was moved. On leaving: release
        the lock; on an error (Ctrl-C included), `abandon` (a run that finished no cell leaves nothing behind).
        Several processes: rank 0 holds the folder, the others wait for it."""
        notes: list[str] = []
        if world.is_main:
            self.prepare()
        try:
            if world.is_main:
                notes = self.convert_old() + self.set_aside(model)
                moved = self.supersede(run, tasks)
                if moved:
                    notes.append(f"{moved} cells in {self.root} were computed under other conditions (model files, "
                                 "dtype, device, --limit, --seed or the task's files): moved to cells/superseded/, "
                                 f"where a run under their conditions takes them back ({self.superseded_size()})")
                back = self.take_back(list(wanted))
                if back:
                    notes.append(f"{back} cells computed earlier under these conditions taken back from "
                                 "cells/superseded/")
                if notes:
                    self.rebuild()
            world.barrier()
            yield notes
        except BaseException:
            if world.is_main:
                self.abandon()
            raise
        if world.is_main:
            self.release()

    def _take_lock(self) -> None:
        """Hold OUTPUT/.lock (a non-blocking flock, exclusive or, for a part of a sharded sweep, shared) and write who
        holds it there, for a refused run's message (the parts append a line each). Hand-written rather than
        filelock's on purpose: filelock 4.2 (the version lmms-eval allows) keeps in-process bookkeeping per path, and a
        second FileLock on a held path in the same process did not refuse once other tests had run in it, while a
        second flock on its own descriptor always does, as another process's; and filelock has no shared lock."""
        f = open(self.root / ".lock", "a+")  # noqa: SIM115 - held open until release() or the process ends
        try:
            fcntl.flock(f, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = "; ".join(f.read().strip().splitlines()[-3:]) or "another process"
            f.close()
            what = "a run of the whole sweep" if self.shared else "another run_bench.py"
            raise OutputBusyError(f"{self.root} is in use by {what} ({holder}); wait for it to finish or pass another "
                                  "--output") from None
        self._lock = f  # the file stays; only the lock on it says whether a run is writing
        if not self.shared:
            f.seek(0)
            f.truncate()
        f.write(f"{'a part of a sharded sweep, ' if self.shared else ''}pid {os.getpid()} on {platform.node()}\n")
        try:
            f.flush()
        except OSError:
            self.release()
            raise

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def abandon(self) -> None:
        """After a run failed before finishing any cell: remove what `prepare` created (the folder, cells/, the lock
        file), so a failed run leaves nothing behind. A folder with finished cells keeps everything."""
        self.release()
        if self.shared or any(self.cells_dir.rglob("*.parquet")) or any(self.cells_dir.rglob("*.json")):
            return  # a part of a sharded sweep: the other parts may be using the folder
        created = self._created
        if ".lock" in created:
            (self.root / ".lock").unlink(missing_ok=True)
        if "cells" in created and self.cells_dir.is_dir():
            for d in sorted(self.cells_dir.rglob("*"), reverse=True) + [self.cells_dir]:
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
        if "root" in created and self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()

    def path(self, cell: Cell, fingerprint: str) -> Path:
        return self.cells_dir / f"{cell.name}__{fingerprint}.parquet"

    def done(self, cell: Cell, fingerprint: str) -> bool:
        """True when the cell's file is there and readable (an unreadable one is set aside by `set_aside`)."""
        return self.path(cell, fingerprint).is_file() and self._memo(self.path(cell, fingerprint))[0] is not None

    def predictions(self, cell: Cell, fingerprint: str) -> dict[int, object]:
        """{doc_id: prediction} of the stored cell (for `--retime`'s check)."""
        return {r["doc_id"]: r.get("prediction") for r in cell_samples(self.path(cell, fingerprint),
                                                                        ("doc_id", "prediction"))}

    def take_back(self, cells: list[tuple[Cell, str]]) -> int:
        """Move back from cells/superseded/ every (cell, fingerprint) of `cells` stored there and not in cells/ (a
        cell is kept by its identity: a quick `--limit` check, or a dtype changed and changed back, costs no finished
        cell); the cell's file of another fingerprint, if any, takes its place there. Returns how many came back."""
        back = 0
        for cell, fp in cells:
            kept = self.cells_dir / "superseded" / self.path(cell, fp).name
            if self.path(cell, fp).is_file() or not kept.is_file() or self._memo(kept)[0] is None:
                continue
            self._supersede_others(cell, fp)
            os.replace(kept, self.path(cell, fp))
            back += 1
        return back

    def superseded_size(self) -> str:
        """How much cells/superseded/ holds: `it holds 12 cells, 3.4 MB`."""
        files = list((self.cells_dir / "superseded").glob("*.parquet"))
        return f"it holds {len(files)} cells, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB"

    def code_versions(self, cells: list[tuple[Cell, str]]) -> set[str]:
        """The code versions (`git_sha`) that computed these stored (cell, fingerprint) pairs."""
        return set().union(*[(self._memo(self.path(c, fp))[0] or {"git_shas": set()})["git_shas"] for c, fp in cells])

    def save(self, cell: Cell, fingerprint: str, model: Path, conditions: dict, rows: list[dict],
             samples: list[dict]) -> None:
        """Write the cell atomically; files of the same cell under other conditions move to cells/superseded/.
        `conditions` ({"run": ..., "task": ...}) lets `supersede` tell the cells of another run's conditions. Every
        row and sample record gets the fingerprint as its `cell_id`."""
        for r in rows + samples:
            r["cell_id"] = fingerprint
        meta = {"cell": cell.name, "fingerprint": fingerprint, "model": str(Path(model).resolve()),
                "conditions": conditions, "rows": rows}
        write_cell(self.path(cell, fingerprint), samples, meta)
        self._supersede_others(cell, fingerprint)

    def _supersede_others(self, cell: Cell, fingerprint: str) -> None:
        """Move the cell's files of other fingerprints (other conditions) in cells/ to cells/superseded/."""
        for old in self.cells_dir.glob(f"{cell.name}__*.parquet"):
            if old.name != self.path(cell, fingerprint).name and old.stem.rpartition("__")[0] == cell.name:
                self._move(old, "superseded")

    def supersede(self, run: str, tasks: dict[str, str]) -> int:
        """Move to cells/superseded/ every cell computed under other run conditions (model files, dtype, device type,
        --limit, --seed) or, for the tasks in `tasks`, another version of the task; return how many moved. The folder
        then reports one set of conditions, never a stale cell beside a current one."""
        moved = 0
        for f in cell_files(self.root):
            meta, _ = self._memo(f)
            if meta is None:
                continue
            cond = meta["conditions"]
            task = f.stem.split("__")[0]
            if cond.get("run") != run or (task in tasks and cond.get("task") != tasks[task]):
                self._move(f, "superseded")
                moved += 1
        return moved

    def _move(self, f: Path, why: str) -> Path:
        """Set a file aside (never delete what may be the user's): cells/<why>/<name>."""
        (self.cells_dir / why).mkdir(parents=True, exist_ok=True)
        target = self.cells_dir / why / f.name
        with contextlib.suppress(FileNotFoundError):  # another part of a sharded sweep moved it first
            os.replace(f, target)
        return target

    def _memo(self, f: Path) -> tuple[dict | None, str]:
        """A cell file's model, conditions, code versions and summary rows (``{"file", "model", "conditions",
        "git_shas", "rows"}``, from its metadata: no sample is read), or None and why it is not a cell file
        (truncated, foreign, renamed). Parsed once while the file stays as it is (same size and modification time):
        a run's start checks every file several ways, and the summary after every cell then reads only the new
        cell's footer."""
        try:
            st = f.stat()
        except OSError as e:
            return None, f"not readable ({type(e).__name__})"
        seen = self._seen.get(f)
        if seen is None or seen[0] != (st.st_size, st.st_mtime_ns):
            data, why = self._parse(f)
            item = None if data is None else {
                "file": f, "model": data.get("model"), "conditions": data.get("conditions") or {},
                "git_shas": {str(r.get("git_sha")) for r in data["rows"]}, "rows": data["rows"]}
            seen = self._seen[f] = ((st.st_size, st.st_mtime_ns), item, why)
        return seen[1], seen[2]

    @staticmethod
    def _parse(f: Path) -> tuple[dict | None, str]:
        try:
            meta = cell_meta(f)
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as e:
            return None, f"not readable ({type(e).__name__})"
        name, _, fp = f.stem.rpartition("__")
        if not isinstance(meta, dict) or not isinstance(meta.get("rows"), list):
            return None, "not a cell file of run_bench.py"
        if meta.get("cell") != name or meta.get("fingerprint") != fp:
            return None, "a cell file whose name does not match its content"
        return meta, ""

    def convert_old(self) -> list[str]:
        """Convert the cell files of earlier versions (`.json`: rows and sample records) in cells/ and
        cells/superseded/ to this version's Parquet cells, once; the originals move to cells/converted/ (and
        cells/converted/superseded/), and a `samples.jsonl` they left to cells/converted/. A `.json` file that is not
        a readable cell of a version with fingerprints is set aside. Returns the notes saying so."""
        notes, done = [], 0
        for folder, dest in ((self.cells_dir, "converted"), (self.cells_dir / "superseded", "converted/superseded")):
            for f in sorted(folder.glob("*.json")):
                name, _, fp = f.stem.rpartition("__")
                try:
                    data = json.loads(f.read_text())
                    ok = (isinstance(data, dict) and "fingerprint" in data and data.get("cell") == name
                          and data.get("fingerprint") == fp and isinstance(data.get("rows"), list)
                          and isinstance(data.get("samples"), list))
                except FileNotFoundError:  # another part of a sharded sweep converted it first
                    continue
                except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                    ok = False
                if not ok:
                    notes.append(f"{f.name} is not a readable cell file of this or an earlier version: moved to "
                                 f"{self._move(f, 'set_aside')}")
                    continue
                data = upgraded(data)
                meta = {k: v for k, v in data.items() if k != "samples"}
                write_cell(f.with_suffix(".parquet"), data["samples"], meta)
                self._move(f, dest)
                done += 1
        if done:
            old = self.root / "samples.jsonl"
            if old.is_file():
                self._move(old, "converted")
            notes.append(f"converted {done} cell files of an earlier version to Parquet (cells/*.parquet; the "
                         "originals, and the samples.jsonl built from them, are kept in cells/converted/)")
        return notes

    def _scan(self, model: Path | None) -> tuple[list[dict], list[str]]:
        """Every readable cell (`_memo`'s dicts) and notes. A file that is not a readable cell, or a cell of another
        model than `model`, is moved to cells/set_aside/ and named in the notes (its cell is recomputed)."""
        cells, notes = [], []
        here = None if model is None else str(Path(model).resolve())
        for f in cell_files(self.root):
            item, why = self._memo(f)
            if item is not None and here is not None and item["model"] != here:
                item, why = None, f"a cell of another model ({item['model']})"
            if item is None:
                notes.append(f"{f.name} is {why}: moved to {self._move(f, 'set_aside')}")
                continue
            cells.append(item)
        return cells, notes

    def set_aside(self, model: Path | None = None) -> list[str]:
        """Move every file of cells/ that is not a readable cell of `model` to cells/set_aside/; the notes naming
        them (see `_scan`)."""
        return self._scan(model)[1]

    def rebuild(self, model: Path | None = None, compare: bool = False) -> tuple[list[dict], list[str]]:
        """Rewrite summary.csv from every finished cell's metadata (no sample is read); return the summary rows and
        the notes of `_scan` (files set aside). With `compare`, also comparisons.csv (`benchmarks.stats.comparisons`
        over the columns it needs, read one cell at a time; seconds of bootstrap for a large folder: the runner asks
        once, at the end of a run); without, a comparisons.csv left from before is removed, since it no longer
        describes the folder's cells."""
        cells, notes = self._scan(model)
        rows = [r for c in cells for r in c["rows"]]
        if not rows and not (self.root / "summary.csv").exists():
            return rows, notes  # nothing finished yet: no empty files
        _write_csv(self.root / "summary.csv", SUMMARY_COLUMNS, rows)
        if compare:
            samples = (r for c in cells for r in cell_samples(c["file"], COMPARED))
            _write_csv(self.root / "comparisons.csv", COMPARISON_COLUMNS, comparisons(samples))
        else:
            (self.root / "comparisons.csv").unlink(missing_ok=True)
        return rows, notes

    def comparisons(self) -> list[dict]:
        """The rows of comparisons.csv (written by `rebuild`), or none before the first cell."""
        path = self.root / "comparisons.csv"
        return list(csv.DictReader(io.StringIO(path.read_text()))) if path.is_file() else []

    def save_pictures(self, pictures: dict[tuple[str, int], dict]) -> None:
        """Write each captured model-input image once: pictures/<task>__<doc_id>.png and .json (question, grid)."""
        for (task, doc_id), pic in pictures.items():
            stem = self.pictures_dir / f"{task}__{doc_id}"
            if stem.with_suffix(".json").is_file():
                continue
            self.pictures_dir.mkdir(parents=True, exist_ok=True)
            with _temporary(stem.with_suffix(".png")) as tmp:
                Image.fromarray(pic["image"].numpy()).save(tmp, format="PNG")
            meta = {"task": task, "doc_id": doc_id, "question": pic["question"], "grid": pic["grid"]}
            atomic_write(stem.with_suffix(".json"), json.dumps(meta))  # last: marks the picture complete
