"""python -m plots.speed SPEED_JSON [SPEED_JSON ...] [--out PNG] [--budget 64]: the batch sweep's figure, from the
files that `python -m benchmarks.tools.speed speedup --output SPEED_JSON` (or `gpu --output`) writes (no model, no
torch).
Several files join into one figure (e.g. batch 1 and batch 8 measured in separate runs); each batch size must come
from one file, with its own `full`, so every speed-up is measured within one run.

Two panels, prefill and decode: each method's measured speed-up over `full` (full's time / its time, per batch) at
one budget against the batch size, solid, and the speed-up its FLOPs predict, as hollow markers of the same colour;
the roofline's prediction for `full` against the measured time is in the title.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from plots.curves import REFERENCE, colours, save  # noqa: E402
from plots.data import OneLineParser  # noqa: E402

PHASES = (("prefill", "prefill_ms", "prefill_gflops"), ("decode", "decode_ms_per_token", "decode_gflops_per_token"))


def read_sweeps(paths: list[Path]) -> tuple[list[dict], str]:
    """The rows of the sweep files in `paths` and the machine(s) they name; ValueError when two files hold the same
    batch size (their speed-ups over `full` would mix runs)."""
    rows, machines, owner = [], [], {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except ValueError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        if not (isinstance(data, dict) and isinstance(data.get("rows"), list)
                and all(isinstance(r, dict) for r in data["rows"])):
            raise ValueError(f"{path}: not a sweep file (no list of rows); give a file that `benchmarks.tools.speed "
                             "--output` wrote")
        sizes = {r["batch_size"] for r in data["rows"]}
        clash = sorted(sizes & owner.keys())
        if clash:
            raise ValueError(f"{owner[clash[0]]} and {path} both hold batch {clash[0]}; give each batch size in one "
                             "file")
        owner.update(dict.fromkeys(sizes, path))
        rows += data["rows"]
        machines.append(data.get("machine", "unknown machine"))
    return rows, "; ".join(dict.fromkeys(machines))


def speed_figure(paths: list[Path], out: Path, budget: int | None = None) -> Path:
    """Draw the sweeps in `paths` at `budget` (default: the smallest count in them) into `out`."""
    rows, machine = read_sweeps(paths)
    counts = sorted({r["budget"] for r in rows if r["method"] != REFERENCE and isinstance(r["budget"], int)})
    if not counts:
        raise ValueError(f"{' '.join(map(str, paths))}: no method at a count budget")
    budget = budget if budget is not None else counts[0]
    if budget not in counts:
        raise ValueError(f"{' '.join(map(str, paths))}: no rows at budget {budget}; they have "
                         f"{', '.join(map(str, counts))}")
    full = {r["batch_size"]: r for r in rows if r["method"] == REFERENCE}
    picked = [r for r in rows if r["budget"] == budget and r["method"] != REFERENCE and r["batch_size"] in full]
    methods = sorted({r["method"] for r in picked})
    colour = colours([*methods, REFERENCE])
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), sharey=False)
    for ax, (phase, time_key, flops_key) in zip(axes, PHASES, strict=True):
        for m in methods:
            mine = sorted((r for r in picked if r["method"] == m), key=lambda r: r["batch_size"])
            b = [r["batch_size"] for r in mine]
            measured = [full[r["batch_size"]][time_key] / r[time_key] for r in mine]
            predicted = [full[r["batch_size"]][flops_key] / r[flops_key] for r in mine]
            ax.plot(b, measured, "-o", color=colour[m], label=m, markersize=4)
            ax.plot(b, predicted, "o", color=colour[m], markerfacecolor="none", markersize=7, alpha=0.6)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(full), [str(b) for b in sorted(full)])
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"{phase} speed-up over full (x)")
        roof = "roofline_prefill_ms" if phase == "prefill" else "roofline_decode_ms"
        ratios = ", ".join(f"b={b}: {full[b][time_key] / full[b][roof]:.2f}" for b in sorted(full))
        ax.set_title(f"{phase}: measured (lines), FLOPs-predicted (rings)\nfull measured / roofline: {ratios}",
                     fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, ncol=min(len(methods), 7), loc="lower center", frameon=False)
    fig.suptitle(f"Speed-up at {budget} visual tokens, {machine}", fontsize=10)
    fig.tight_layout(rect=(0, 0.1 if len(methods) > 7 else 0.06, 1, 1))
    return save(fig, out)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m plots.speed", description=__doc__.splitlines()[0])
    p.add_argument("speed_json", type=Path, nargs="+", help="one or more files of `benchmarks.tools.speed --output`")
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default: beside the first JSON, .png)")
    p.add_argument("--budget", type=int, default=None, help="the budget to draw (default: the smallest)")
    args = p.parse_args(argv)
    try:
        written = speed_figure(args.speed_json, args.out or args.speed_json[0].with_suffix(".png"), args.budget)
    except OSError as e:  # a file to read, or the figure to write
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"error: {' '.join(map(str, args.speed_json))}: a row lacks the field {e}; give files "
              "`benchmarks.tools.speed --output` wrote", file=sys.stderr)
        return 2
    except ValueError as e:  # not JSON, two files with one batch size, or not the rows asked for
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
