"""lmms-eval hooks for the ``synth_scenes`` task (`benchmarks/tasks/synthetic/scenes.py`); the prompt, the scoring and
the aggregation are `synth_vqa`'s (`utils.py`), with this task's question types.

As `utils.py` does for its task, this file names the task's data file (`test_file`, in the cache folder) and writes it
when lmms-eval executes the file while parsing the YAML, before the dataset loads; a plain import writes nothing.
"""

from __future__ import annotations

from typing import Any

from benchmarks.tasks.synthetic.generate import task_data_file
from benchmarks.tasks.synthetic.scenes import QTYPES, SYNTH_SCENES
from benchmarks.tasks.synthetic.tasks.utils import doc_to_text, doc_to_visual, mean_ignore_none, normalize_answer

__all__ = ["doc_to_text", "doc_to_visual", "mean_ignore_none", "process_results"]


def process_results(doc: dict, results: list[str]) -> dict[str, Any]:
    """``exact_match`` as 0/1 and every ``acc_<qtype>`` key: 0/1 for the doc's type, None for the others."""
    pred = results[0] if results else ""
    hit = float(normalize_answer(str(pred)) == normalize_answer(doc["answer"]))
    return {"exact_match": hit} | {f"acc_{q}": (hit if doc["qtype"] == q else None) for q in QTYPES}


# the YAML's data file; written when missing if lmms-eval's YAML loader runs this file
test_file = task_data_file(SYNTH_SCENES, "synth_scenes",
                           write=__name__ != "benchmarks.tasks.synthetic.tasks.scenes_utils")
