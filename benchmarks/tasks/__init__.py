"""What the harness evaluates on, in one place: the task catalogue (names, sizes, which record relevant patches, the
defaults per model), read without torch or lmms-eval; the task manager and the synthetic tasks' data in
`benchmarks.tasks.manager`; the standard lmms-eval tasks from local copies in `benchmarks.tasks.standard`; our
synthetic tasks (generators and lmms-eval YAMLs) in `benchmarks.tasks.synthetic`.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.defaults import is_smoke_model

SYNTH_TASKS = Path(__file__).resolve().parent / "synthetic" / "tasks"  # our task YAMLs (an lmms-eval include path)
SMOKE_TASKS = ("synth_vqa", "synth_scenes")  # the LLaVA smoke model's tasks (trained on both), its sweep's default
OTHER_TASKS = ("synth_vqa",)  # any other model's default (the Qwen2.5-VL smoke model knows this task only)
# documents in each synthetic task's test split (a conversation task's document is one conversation)
SYNTH_TASK_DOCS = {"synth_vqa": 1000, "synth_scenes": 1000, "synth_scenes_followup": 1000}
CONVERSATION_TASKS = ("synth_scenes_followup",)  # multi-round: each doc a conversation of several questions
SYNTH_IMAGE_SIZE = 96  # side of the synthetic tasks' square images, in pixels
RELEVANT_PATCH_TASKS = tuple(SYNTH_TASK_DOCS)  # tasks whose docs record each question's relevant_patches (`oracle`)


def default_tasks(model: Path) -> tuple[str, ...]:
    """The tasks a sweep on `model` runs when none are named: the LLaVA smoke model's (`SMOKE_TASKS`), `synth_vqa` on
    any other (the Qwen2.5-VL smoke model's one task; a real model is given its tasks with --tasks)."""
    return SMOKE_TASKS if is_smoke_model(model) else OTHER_TASKS


def reference_image(tasks: tuple[str, ...]) -> tuple[int, int]:
    """(width, height) in pixels of the image a dry run prices when images differ in size: the synthetic tasks'
    when the sweep runs only those, else 448 x 448."""
    if all(t in SYNTH_TASK_DOCS for t in tasks):
        return SYNTH_IMAGE_SIZE, SYNTH_IMAGE_SIZE
    return 448, 448
