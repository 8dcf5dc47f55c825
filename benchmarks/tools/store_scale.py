"""How the results store scales with the folder (a benchmark that prints figures, not a test): the cost of finishing
one cell, and of the end-of-run build, as a sweep's folder grows to a paper's size.

    python -m benchmarks.tools.store_scale                       # 1, 100, 500 and 1,000 cells of 5,000 samples
    python -m benchmarks.tools.store_scale --cells 1 20 40 --samples 5000 --compare-at 40

Cells are synthetic, with the record shape of LLaVA-1.5-7B's (5,000 questions, 64 of 576 patches kept, 32 LLM
layers, 24 vision layers) and the methods of the registry: per task `full` and 13 methods at 4 budgets, tasks added
as the folder grows. A cell is finished as the runner finishes one: `ResultStore.save`, then `rebuild` (summary.csv).
At each size of `--cells` it times the finishing of `--repeat` cells and prints the median, with the folder's size
on disk; at `--compare-at` cells it times the end-of-run build (`rebuild(compare=True)`: summary.csv and the paired
comparisons). It ends with the process's peak memory above its baseline (after imports, before the first cell).
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.plan import Cell
from benchmarks.store import ResultStore
from methods.budget import Budget
from methods.cli import OneLineParser, at_least

METHODS = ("random", "fastv", "pdrop", "sparsevlm", "dart", "divprune", "visionzip", "prumerge", "prumerge_plus",
           "fastervlm", "vispruner", "cdpruner", "adaptive_b")
BUDGETS = (64, 128, 192, 288)
LAYERS, VISION_LAYERS, PATCHES, KEPT, TEXT = 32, 24, 576, 64, 64


def plan(n: int) -> list[Cell]:
    """The first `n` cells of a paper-like sweep: per task `full`, then every method at every budget."""
    cells, task = [], 0
    while len(cells) < n:
        name = f"task{task:02d}"
        cells += [Cell(name, "full", Budget.every(PATCHES))] + [Cell(name, m, b) for m in METHODS for b in BUDGETS]
        task += 1
    return cells[:n]


def records(cell: Cell, samples: int, rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    """A cell's summary rows and sample records, shaped as LLaVA-1.5-7B's."""
    full = cell.method == "full"
    visual = PATCHES if full else KEPT
    p = 0.8 if full else 0.5 + 0.3 * rng.random()
    correct = rng.random(samples) < p
    kept = None if full else [sorted(rng.choice(PATCHES, KEPT, replace=False).tolist()) for _ in range(samples)]
    gflops = 2 * (4.25e3 * (visual + TEXT) / (PATCHES + TEXT) + 0.35e3)
    out = []
    for i in range(samples):
        out.append({
            "task": cell.task, "method": cell.method, "budget": cell.budget.record, "controller_seed": None,
            "conversation": None, "doc_id": i, "prediction": "yes" if correct[i] else "no", "target": "yes",
            "correct": float(correct[i]), "visual_tokens": visual, "visual_tokens_per_layer": [visual] * LAYERS,
            "llm_tokens_per_layer": [visual + TEXT] * LAYERS, "vision_tokens_per_layer": [PATCHES + 1] * VISION_LAYERS,
            "projector_tokens": visual, "generated_tokens": 1, "kept_indices": None if full else kept[i],
            "prefill_ms": 120.5 + i % 7, "decode_ms_per_token": 22.1, "reducer_ms": 0.4,
            "prefill_gflops": gflops, "llm_prefill_gflops": gflops - 700.0, "reducer_gflops": 0.1,
            "total_gflops": gflops + 14.0, "kv_cache_mb": 0.5 * (visual + TEXT)})
    value = float(correct.mean())
    common = {"task": cell.task, "method": cell.method, "budget": cell.budget.record, "budget_tokens": visual,
              "n": samples, "visual_tokens_mean": float(visual), "prefill_gflops_mean": gflops, "git_sha": "bench"}
    rows = [{**common, "metric": "exact_match", "value": value, "primary": True},
            {**common, "metric": "other", "value": value / 2, "primary": False}]
    return rows, out


def peak_mb() -> float:
    """The process's peak resident memory so far (MB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def folder_mb(root: Path) -> float:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 1e6


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m benchmarks.tools.store_scale", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--cells", nargs="+", type=at_least(1), default=[1, 100, 500, 1000],
                   help="folder sizes (cells) at which to time the finishing of a cell (default 1 100 500 1000)")
    p.add_argument("--samples", type=at_least(1), default=5000, help="sample records per cell (default 5000)")
    p.add_argument("--repeat", type=at_least(1), default=3, help="cells timed at each size (default 3; the median)")
    p.add_argument("--compare-at", type=at_least(1), default=500,
                   help="folder size at which to time the end-of-run build with comparisons (default 500)")
    p.add_argument("--folder", type=Path, default=None, help="where to build the folder (default a temporary one)")
    args = p.parse_args(argv)
    sizes = sorted(set(args.cells))
    total = max(sizes[-1] + args.repeat - 1, args.compare_at)
    rng = np.random.default_rng(0)
    base = peak_mb()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.folder or Path(tmp) / "run"
        store = ResultStore(root)
        store.prepare()
        cells, times, disk, build = plan(total), {}, {}, None
        print(f"{platform.node()}, Python {platform.python_version()}: {total} cells of {args.samples} samples "
              f"into {root}", file=sys.stderr)
        for k, cell in enumerate(cells, 1):
            rows, samples = records(cell, args.samples, rng)
            start = time.perf_counter()
            store.save(cell, f"fp{k:05d}", root, {"run": "bench"}, rows, samples)
            store.rebuild()
            spent = time.perf_counter() - start
            size = next((s for s in sizes if s <= k < s + args.repeat), None)
            if size is not None:
                times.setdefault(size, []).append(spent)
            if k == args.compare_at:
                start = time.perf_counter()
                store.rebuild(compare=True)
                build = (time.perf_counter() - start, len(store.comparisons()))
            if k in sizes:
                disk[k] = folder_mb(root)
                print(f"  {k} cells, {disk[k]:.1f} MB", file=sys.stderr)
        store.release()
        print(f"\n| cells in the folder | finishing a cell (save + summary.csv), median of {args.repeat} | folder on "
              "disk |\n|---|---|---|")
        for s in sizes:
            print(f"| {s} | {1e3 * statistics.median(times[s]):.0f} ms | {disk[s]:.1f} MB |")
        if build is not None:
            print(f"\nend-of-run build at {args.compare_at} cells (summary.csv and {build[1]} paired comparisons): "
                  f"{build[0]:.1f} s")
        print(f"peak memory above the baseline after imports ({base:.0f} MB): {peak_mb() - base:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
