"""lmms-eval hooks for the ``synth_vqa`` task, and the one prompt function shared with training.

`doc_to_text` is the single source of the question prompt: the smoke model is trained on exactly the string it
returns (wrapped by the LLaVA-1.5 chat template), so evaluation and training cannot drift apart.

Metrics per doc: ``exact_match`` (normalised string equality) and ``acc_<qtype>`` for the doc's own question
type; the other ``acc_*`` keys are None and `mean_ignore_none` skips them.

The task finds or makes its own data, in a cache folder (`generate.data_dir`): the YAML's ``data_files`` names this
file's `test_file`, and lmms-eval executes this file (as a module named ``utils``) while it parses the YAML, before it
loads the dataset, so `test_file` is written then when it is missing. A plain
``import benchmarks.tasks.synthetic.tasks.utils`` (training, tests) writes nothing.
"""

from __future__ import annotations

import re
import string
from typing import Any

from benchmarks.tasks.synthetic.generate import QTYPES, SYNTH_VQA, task_data_file

PRE_PROMPT = ""
POST_PROMPT = "\nAnswer the question using a single word or phrase."
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
def doc_to_visual(doc: dict) -> list:
    """The doc's image as a one-element list of RGB PIL images."""
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """Question text: ``pre_prompt + question + post_prompt`` (LLaVA-1.5 short-answer convention).

    Args:
        doc: A record with a ``question`` field.
        lmms_eval_specific_kwargs: Optional ``pre_prompt``/``post_prompt`` overrides (lmms-eval passes the YAML's).

    Returns:
        The user text that goes after the image in the chat template.
    """
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', PRE_PROMPT)}{doc['question']}{kw.get('post_prompt', POST_PROMPT)}"


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def process_results(doc: dict, results: list[str]) -> dict[str, Any]:
    """Score one doc.

    Args:
        doc: The record (needs ``answer`` and ``qtype``).
        results: Model outputs; the first one is scored.

    Returns:
        ``exact_match`` as 0/1 and every ``acc_<qtype>`` key: 0/1 for the doc's type, None for the others.
    """
    pred = results[0] if results else ""
    hit = float(normalize_answer(str(pred)) == normalize_answer(doc["answer"]))
    out: dict[str, Any] = {"exact_match": hit}
    out.update({f"acc_{q}": (hit if doc["qtype"] == q else None) for q in QTYPES})
    return out


def mean_ignore_none(values: list[float | None]) -> float:
    """Mean over the non-None values (NaN when there are none, e.g. a run restricted to other types)."""
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else float("nan")


# the YAML's data file; written when missing if lmms-eval's YAML loader runs this file
test_file = task_data_file(SYNTH_VQA, "synth_vqa", write=__name__ != "benchmarks.tasks.synthetic.tasks.utils")
