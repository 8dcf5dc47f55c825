"""Every figure and table of a results directory, from its stored files alone (`python -m plots` and the end of
`run_bench.py` call this)."""

from __future__ import annotations

from pathlib import Path

from plots.curves import accuracy_curves, question_families, relative_average, tokens_per_layer
from plots.data import load
from plots.pictures import selection_pictures
from plots.tables import write_tables


def make_all(dirs: list[Path], out: Path | None = None) -> list[Path]:
    """Every figure and table for the results in `dirs` (several: also their rows in one `combined_summary.csv`, e.g.
    the parts of a sharded sweep written to separate folders); returns the written paths."""
    res = load(dirs)
    out = Path(out or dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if len(dirs) > 1:
        path = out / "combined_summary.csv"
        tmp = path.with_name(f".{path.name}.tmp")
        res.combined.to_csv(tmp, index=False)
        tmp.replace(path)
        written.append(path)
    written += accuracy_curves(res, out) + question_families(res, out)
    rel = relative_average(res, out)
    written += ([rel] if rel else []) + write_tables(res, out) + selection_pictures(res, out)
    return written + tokens_per_layer(res, out)
