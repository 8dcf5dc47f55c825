"""Results folders for tests that read them without running a sweep."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from benchmarks.plan import Cell
from benchmarks.store import ResultStore


def write_cells(folder: Path, samples: list[dict], rows: list[dict] = ()) -> Path:
    """A results folder holding `samples` as run_bench.py stores them: one cell file per (task, method, budget,
    controller_seed, conversation), with the `rows` of that cell (matched on task, method and budget) as its summary."""
    store = ResultStore(folder)
    store.cells_dir.mkdir(parents=True, exist_ok=True)
    cells = defaultdict(list)
    for s in samples:
        cells[s["task"], s["method"], str(s["budget"]), s.get("controller_seed"), s.get("conversation")].append(s)
    for i, ((task, method, budget, seed, mode), group) in enumerate(cells.items()):
        mine = [r for r in rows if (r["task"], r["method"], str(r["budget"])) == (task, method, budget)]
        store.save(Cell(task, method, budget, seed, mode), f"fp{i}", folder, {}, mine, group)
    return folder
