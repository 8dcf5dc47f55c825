"""Read what `run_bench.py` wrote (one or several results directories) into one table, without torch.

A results directory holds `summary.csv` (one row per task, method, budget and metric), `cells/*.parquet` (one file
per cell, one row per sample; `samples.jsonl` in folders of earlier versions) and `pictures/` (the model-input images
of a few fixed samples); `results/README.md` documents them.
Several directories combine: rows for the same (task, method, method arguments, budget, metric) keep the newest.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

REQUIRED = ("task", "method", "budget", "budget_tokens", "metric", "value", "prefill_gflops_mean",
            "visual_tokens_mean")
NUMERIC = ("value", "budget_tokens", "prefill_gflops_mean", "visual_tokens_mean", "ci95_low",
           "ci95_high")  # the CI: when present


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are one line on stderr and exit status 2 (the figures' command lines); an empty path
    is refused (Path("") would be the current folder). A smaller twin of `methods.cli.OneLineParser`, kept on purpose:
    plots read stored files and import nothing from the project's other packages (`tests/test_layers.py`), so that
    `python -m plots` needs neither torch nor the registry."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message}; `{self.prog} --help` lists the options\n")

    def add_argument(self, *args, **kwargs):
        if kwargs.get("type") is Path:
            kwargs["type"] = _path
        return super().add_argument(*args, **kwargs)


def _path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or folder name")
    return Path(text)


class ResultsError(ValueError):
    """A directory that holds no usable results; the message says what to do."""


@dataclass
class Results:
    """Everything the plots need.

    Attributes:
        summary: one row per (task, method, budget, metric), `budget_tokens` numeric for sorting.
        primary: task -> its main metric (the task's first metric in lmms-eval's metric list).
        kept: (task, method, budget, doc_id) -> kept patch indices (None: all), for the picture docs.
        layers: (task, method, budget) -> mean visual tokens per LLM layer.
        pictures: (task, doc_id) -> (png path, meta dict with `question`, `grid`).
        comparisons: the paired comparisons of each directory's comparisons.csv (one row per method, budget and
            reference: `full` or the best other method at that budget), with `budget` as text.
        combined: the directories' summary.csv rows as they are, one per (task, conversation, method, method
            arguments, budget, metric), the newest where several directories hold one (what `combined_summary.csv`
            holds).
    """

    summary: pd.DataFrame
    primary: dict[str, str]
    combined: pd.DataFrame = field(default_factory=pd.DataFrame)
    kept: dict[tuple, list[int] | None] = field(default_factory=dict)
    layers: dict[tuple, list[float]] = field(default_factory=dict)
    pictures: dict[tuple, tuple[Path, dict]] = field(default_factory=dict)
    comparisons: pd.DataFrame = field(default_factory=pd.DataFrame)

    def main_rows(self, task: str | None = None) -> pd.DataFrame:
        """Rows of each task's main metric (or one task's)."""
        df = self.summary[self.summary["metric"] == self.summary["task"].map(self.primary)]
        return df if task is None else df[df["task"] == task]


def shown_task(task: str, conversation: object = None) -> str:
    """A task as tables and figures name it: a conversation task's with its mode, `synth_scenes_followup (re-prune)`
    (as the console shows it)."""
    return f"{task} ({conversation})" if isinstance(conversation, str) and conversation else task


def file_part(task: str) -> str:
    """A shown task as part of a file name: `synth_scenes_followup.re-prune`."""
    return task.replace(" (", ".").replace(")", "")


def load(dirs: list[Path]) -> Results:
    """Read and combine results directories. Raises ResultsError for an empty or foreign directory."""
    frames = []
    for d in dirs:
        path = Path(d) / "summary.csv"
        if not Path(d).is_dir():
            raise ResultsError(f"{d} is not a directory; give a results directory written by run_bench.py --output")
        cells = sorted((Path(d) / "cells").glob("*.parquet"))
        if not path.is_file() and not cells:
            raise ResultsError(f"{d} holds no summary.csv; run `python run_bench.py --output {d}` first")
        try:
            df = pd.read_csv(path) if path.is_file() else _summary_from_cells(cells)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
            raise ResultsError(f"{path} is not a run_bench.py summary ({e}); rerun run_bench.py --output {d}") from None
        missing = [c for c in REQUIRED if c not in df.columns]
        if missing:
            raise ResultsError(f"{path} is not a run_bench.py summary of this version: no column(s) "
                               f"{', '.join(missing)}; if run_bench.py wrote it, rerun the same command with --output "
                               f"{d} (it rebuilds summary.csv from cells/)")
        if df.empty:
            raise ResultsError(f"{path} has no rows yet; let run_bench.py finish at least one cell")
        for col in (c for c in NUMERIC if c in df.columns):
            values = pd.to_numeric(df[col], errors="coerce")
            bad = df.index[values.isna() & df[col].notna()]  # text where a number belongs (empty cells are allowed)
            if len(bad):
                lines = ", ".join(str(i + 2) for i in bad[:5])  # +2: the header, and 1-based lines
                raise ResultsError(f"{path}: column {col} is not a number on line(s) {lines}; rerun the same "
                                   f"run_bench.py command with --output {d} (it rebuilds summary.csv from cells/)")
            df[col] = values
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    for col in ("method_args", "time_utc"):
        if col not in df.columns:
            df[col] = ""
    for col in ("ci95_low", "ci95_high"):  # results written before the intervals existed
        if col not in df.columns:
            df[col] = float("nan")
    df["budget"] = df["budget"].astype(str)
    same = [c for c in ("task", "conversation", "method", "method_args", "budget", "metric") if c in df.columns]
    df = df.sort_values("time_utc", kind="stable").drop_duplicates(same, keep="last")  # the newest of each row
    combined = df.sort_index()  # the rows as the folders hold them
    if "conversation" in df.columns:  # a conversation task's modes are tasks of their own in every figure and table
        df = df.assign(task=[shown_task(t, c) for t, c in zip(df["task"], df["conversation"], strict=True)])
    df = over_seeds(df)
    df = df.sort_values(["task", "method", "budget_tokens"], kind="stable").reset_index(drop=True)
    primary = {}
    for task, rows in df.groupby("task", sort=False):
        flagged = rows[rows["primary"].astype(str) == "True"] if "primary" in rows.columns else rows.iloc[:0]
        primary[task] = flagged["metric"].iloc[0] if len(flagged) else rows["metric"].iloc[0]
    res = Results(summary=df, primary=primary, combined=combined)
    res.comparisons = _read_comparisons(dirs)
    for d in dirs:
        _read_pictures(Path(d) / "pictures", res)
    for d in dirs:  # after every picture: the docs that have one are the docs whose kept patches are drawn
        _read_samples(Path(d), res)
    return res


SAMPLE_COLUMNS = ("task", "conversation", "method", "budget", "doc_id", "visual_tokens_per_layer", "kept_indices")
CELL_META = b"run_bench.cell"  # a cell file's metadata key (benchmarks/store.py); its `json_columns` are JSON text


def _summary_from_cells(cells: list[Path]) -> pd.DataFrame:
    """summary.csv's rows rebuilt from the cell files' metadata (a folder whose summary.csv is missing, e.g. cells
    copied together from the parts of a sharded sweep); a file that cannot be read is skipped with a warning."""
    rows, skipped = [], []
    for f in cells:
        try:
            rows += json.loads(pq.read_schema(f).metadata[CELL_META])["rows"]
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
            skipped.append(f.name)
    if skipped:
        print(f"warning: {len(skipped)} cell file(s) cannot be read ({', '.join(skipped[:5])}): left out",
              file=sys.stderr)
    return pd.DataFrame(rows)


def _sample_records(folder: Path) -> Iterator[tuple[str, int, dict | None]]:
    """(file, number, record) of a results folder's samples, `SAMPLE_COLUMNS` only, one cell file at a time from
    cells/*.parquet; a folder of an earlier version, from its samples.jsonl. A record that cannot be read is None."""
    cells = sorted((folder / "cells").glob("*.parquet"))
    if cells:
        for f in cells:
            try:
                schema = pq.read_schema(f)
                as_json = set(json.loads(schema.metadata[CELL_META]).get("json_columns", ()))
                records = pq.read_table(f, columns=[c for c in SAMPLE_COLUMNS if c in schema.names]).to_pylist()
            except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
                yield f.name, 0, None
                continue
            for number, r in enumerate(records, 1):
                yield f.name, number, {k: json.loads(v) if k in as_json and v is not None else v for k, v in r.items()}
        return
    path = folder / "samples.jsonl"
    if path.is_file():
        with open(path, errors="replace") as f:
            for number, line in enumerate(f, 1):
                try:
                    yield path.name, number, json.loads(line)
                except json.JSONDecodeError:
                    yield path.name, number, None


def _read_samples(folder: Path, res: Results) -> None:
    """Kept patches of the docs that have a picture, and per-layer visual-token means, streamed from the folder's
    sample records (`_sample_records`)."""
    sums: dict[tuple, list[float]] = defaultdict(list)
    counts: dict[tuple, int] = defaultdict(int)
    skipped = []
    for name, number, s in _sample_records(folder):
        try:
            key = (shown_task(s["task"], s.get("conversation")), s["method"], str(s["budget"]))
            per_layer = [float(v) for v in s.get("visual_tokens_per_layer") or []]
            doc_id = s.get("doc_id")
        except (KeyError, TypeError, ValueError, AttributeError):
            skipped.append(f"{name}:{number}" if number else name)
            continue
        if per_layer:
            acc = sums[key]
            if not acc:
                acc.extend([0.0] * len(per_layer))
            if len(acc) == len(per_layer):
                for i, v in enumerate(per_layer):
                    acc[i] += v
                counts[key] += 1
        if (s["task"], doc_id) in res.pictures:  # a conversation's: turn 1's selection, the same in both modes
            picked = (s["task"], *key[1:], doc_id)
            if s.get("conversation") == "re-prune":
                res.kept.setdefault(picked, s.get("kept_indices"))
            else:
                res.kept[picked] = s.get("kept_indices")
    res.layers.update({k: [v / counts[k] for v in acc] for k, acc in sums.items() if counts[k]})
    if skipped:
        print(f"warning: {folder}: {len(skipped)} sample record(s) or cell file(s) cannot be read "
              f"({', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}): skipped; the pictures and per-layer "
              "plots lack them", file=sys.stderr)


def over_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, method, budget, metric): a learned method's rows of several controllers (training seeds,
    `controller_seed`) become their mean, with `seeds` (how many), `seed_min` and `seed_max` (the spread of the
    value over seeds); the question-level interval of a mean over seeds is not a row's, so `ci95_*` are left empty
    there. Rows of one controller keep their values (`seeds` = 1)."""
    if "controller_seed" not in df.columns:
        df["controller_seed"] = float("nan")
    key = ["task", "method", "budget", "metric"]
    seeded = df["controller_seed"].notna() & df.duplicated(key, keep=False)
    plain = df[~seeded].assign(seeds=1, seed_min=df["value"], seed_max=df["value"])
    if not seeded.any():
        return plain
    groups = df[seeded].groupby(key, sort=False)
    mean = groups.first().reset_index()  # the other columns (model, device, ...) from the first seed
    numeric = [c for c in df.columns if c == "value" or c.endswith(("_mean", "_median", "_max", "_mb", "_s"))]
    mean[numeric] = groups[numeric].mean().reset_index(drop=True)
    mean["seeds"] = groups["value"].count().to_numpy()
    mean["seed_min"], mean["seed_max"] = groups["value"].min().to_numpy(), groups["value"].max().to_numpy()
    mean[["ci95_low", "ci95_high", "controller_seed"]] = float("nan")
    return pd.concat([plain, mean], ignore_index=True)


def _read_comparisons(dirs: list[Path]) -> pd.DataFrame:
    """Every directory's comparisons.csv (a directory is one set of run conditions, so only its own cells pair)."""
    frames = []
    for d in dirs:
        path = Path(d) / "comparisons.csv"
        try:
            frames.append(pd.read_csv(path, dtype={"budget": str, "reference_budget": str}) if path.is_file() else None)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
            print(f"warning: {path} is not a comparisons table: skipped; rerun run_bench.py --output {d}",
                  file=sys.stderr)
    frames = [f for f in frames if f is not None and not f.empty]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if "conversation" in df.columns:  # as the summary's tasks (`load`)
        df["task"] = [shown_task(t, c) for t, c in zip(df["task"], df["conversation"], strict=True)]
    return df


def _read_pictures(folder: Path, res: Results) -> None:
    for meta_path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            meta = json.loads(meta_path.read_text())
            meta["task"], meta["doc_id"]  # noqa: B018 - the keys the pictures need
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            print(f"warning: {meta_path} is not a picture record: skipped", file=sys.stderr)
            continue
        png = meta_path.with_suffix(".png")
        if png.is_file():
            res.pictures[(meta["task"], meta["doc_id"])] = (png, meta)
