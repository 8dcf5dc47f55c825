"""python -m plots RESULTS_DIR [MORE_DIRS...]: redraw every figure and table from stored results (no model, no torch).

Writes into the first directory (or --out): accuracy_vs_flops_<task>.png, accuracy_vs_latency_<task>.png,
relative_to_full.png, table.md / table.csv / table.tex, selection_<task>_doc<i>.png, where methods that see the
question and methods that do not both ran, accuracy_vs_flops_by_question_<task>.png, and, for methods that act
inside the LLM, tokens_per_layer_<task>.png. Several directories are combined (the newest row wins), and their
summary rows written to combined_summary.csv.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from plots.data import OneLineParser, ResultsError
from plots.make import make_all


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m plots", description=__doc__.splitlines()[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("results", type=Path, nargs="+", help="results directories written by run_bench.py --output")
    p.add_argument("--out", type=Path, default=None, help="where to write (default: the first results directory)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        written = make_all(args.results, args.out)
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: some figures may be missing; rerun the same command", file=sys.stderr)
        return 130
    except OSError as e:  # an --out that cannot be written, a full disk
        print(f"error: cannot write the figures: {e.strerror or e}{f': {e.filename}' if e.filename else ''}; pass "
              "another --out", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    print(f"{len(written)} files in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
