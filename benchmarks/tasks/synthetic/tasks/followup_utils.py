"""lmms-eval hooks for the ``synth_scenes_followup`` task (`benchmarks/tasks/synthetic/followup.py`): two questions
about one image in one conversation, through lmms-eval's multi-round request type (`generate_until_multi_round`).

The protocol is lmms-eval's: the request's context is turn 1's text; after each answer the model calls
``doc_to_text(doc, previous_output=[answers so far], round_idx=r)``, which returns ``(visuals, text, terminal,
round_results, round_info)``: ``visuals`` None (the same image), the text of turn ``r + 1``, and ``terminal`` True once
every turn is answered. The prompt wording and the scoring are `synth_scenes`' (`utils.py`).

As `utils.py` does for its task, this file names the task's data file (`test_file`, in the cache folder) and writes it
when lmms-eval executes the file while parsing the YAML, before the dataset loads; a plain import writes nothing.
"""

from __future__ import annotations

from typing import Any

from benchmarks.tasks.synthetic.followup import SYNTH_SCENES_FOLLOWUP
from benchmarks.tasks.synthetic.generate import task_data_file
from benchmarks.tasks.synthetic.tasks.utils import doc_to_text as question_text
from benchmarks.tasks.synthetic.tasks.utils import doc_to_visual, mean_ignore_none, normalize_answer

__all__ = ["doc_to_text", "doc_to_visual", "mean_ignore_none", "process_results", "turns"]


def turns(doc: dict) -> list[dict]:
    """The conversation's turns in order: {question, answer, qtype, relevant_patches} each."""
    first = {k: doc[k] for k in ("question", "answer", "qtype", "relevant_patches")}
    return [first, *(doc.get("follow_ups") or [])]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None, previous_output: list[str] | None = None,
                round_idx: int | None = None, previous_round_info: Any = None):
    """Turn 1's text (``round_idx`` None, as lmms-eval builds the request), else lmms-eval's multi-round tuple for
    round ``round_idx``: (None, the next turn's text or None, terminal, the answers so far, None)."""
    all_turns = turns(doc)
    if round_idx is None:
        return question_text(all_turns[0], lmms_eval_specific_kwargs)
    answers = list(previous_output or [])
    if round_idx >= len(all_turns):
        return None, None, True, answers, None
    return None, question_text(all_turns[round_idx], lmms_eval_specific_kwargs), False, answers, None


def process_results(doc: dict, results: list) -> dict[str, Any]:
    """``exact_match_turn<k>`` as 0/1 for each turn (None for a turn the model did not answer)."""
    answers = list(results[0]) if results and isinstance(results[0], (list, tuple)) else list(results)
    out = {}
    for k, turn in enumerate(turns(doc), 1):
        pred = answers[k - 1] if k - 1 < len(answers) else None
        out[f"exact_match_turn{k}"] = (None if pred is None else
                                       float(normalize_answer(str(pred)) == normalize_answer(turn["answer"])))
    return out


# the YAML's data file; written when missing if lmms-eval's YAML loader runs this file
test_file = task_data_file(SYNTH_SCENES_FOLLOWUP, "synth_scenes_followup",
                           write=__name__ != "benchmarks.tasks.synthetic.tasks.followup_utils")
