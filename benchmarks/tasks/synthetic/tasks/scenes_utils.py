"""lmms-eval hooks for the ``synth_scenes`` task (`benchmarks/tasks/synthetic/scenes.py`); the prompt, the scoring and
the aggregation are `synth_vqa`'s (`utils.py`), with this task's question types.

As `utils.py` does for its task, this file writes the task's data (``../data/scenes_test.parquet``) when lmms-eval
executes it while parsing the YAML, before the dataset loads; a plain import writes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from benchmarks.tasks.synthetic.generate import ensure_test_data
from benchmarks.tasks.synthetic.scenes import QTYPES, SYNTH_SCENES
from benchmarks.tasks.synthetic.tasks.utils import doc_to_text, doc_to_visual, mean_ignore_none, normalize_answer

__all__ = ["doc_to_text", "doc_to_visual", "mean_ignore_none", "process_results"]
# the YAML's `../data/scenes_test.parquet`, resolved the way the OS opens it
DATA_FILE = Path(__file__).parent.resolve().parent / "data" / SYNTH_SCENES.test_file.name


def process_results(doc: dict, results: list[str]) -> dict[str, Any]:
    """``exact_match`` as 0/1 and every ``acc_<qtype>`` key: 0/1 for the doc's type, None for the others."""
    pred = results[0] if results else ""
    hit = float(normalize_answer(str(pred)) == normalize_answer(doc["answer"]))
    return {"exact_match": hit} | {f"acc_{q}": (hit if doc["qtype"] == q else None) for q in QTYPES}


if __name__ != "benchmarks.tasks.synthetic.tasks.scenes_utils" and not DATA_FILE.exists():  # run by lmms-eval's loader
    print(f"synth_scenes: writing the task's data to {DATA_FILE} (first use; deterministic, a few seconds)",
          file=sys.stderr)
    ensure_test_data(DATA_FILE, gen=SYNTH_SCENES)
