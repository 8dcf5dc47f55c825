"""A results folder's sample records in other formats, read from its cell files one cell at a time.

Memory stays that of one cell (`cells/*.parquet`), however large the folder.

    python -m benchmarks.tools.export results/runs/smoke --samples-jsonl   # -> results/runs/smoke/samples.jsonl

`--samples-jsonl [FILE]` writes every sample record as one JSON line (default `DIR/samples.jsonl`), the file earlier
versions rewrote after every cell; columns are documented in results/README.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.store import write_samples_jsonl
from methods.cli import OneLineParser


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m benchmarks.tools.export", description=__doc__.splitlines()[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("folder", type=Path, help="a results folder run_bench.py wrote (its --output)")
    p.add_argument("--samples-jsonl", nargs="?", const="", default=None, metavar="FILE",
                   help="write the sample records as JSON lines to FILE (default FOLDER/samples.jsonl)")
    args = p.parse_args(argv)
    if not sorted((args.folder / "cells").glob("*.parquet")):
        p.error(f"{args.folder} holds no cells/*.parquet; give a folder run_bench.py wrote (its --output)")
    if args.samples_jsonl is None:
        p.error("say what to write, e.g. --samples-jsonl")
    out = Path(args.samples_jsonl) if args.samples_jsonl else args.folder / "samples.jsonl"
    n = write_samples_jsonl(args.folder, out)
    print(f"wrote {n} sample records to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
