"""Paths and defaults shared by the CLI and the runner. Imports nothing heavy: `run_bench.py --help`, `--list` and
argument errors answer without loading torch."""

from __future__ import annotations

import os
from pathlib import Path

from methods._registry import read_catalogue as catalogue  # the registry as data, read without torch

REPO = Path(__file__).resolve().parent.parent
SMOKE_MODEL = REPO / "benchmarks" / "smoke_model" / "checkpoint"
QWEN_SMOKE_MODEL = REPO / "benchmarks" / "smoke_model" / "qwen_checkpoint"  # `--model` it for the Qwen2.5-VL family
# the LLaVA smoke model's results, under the directory the command runs in (the repository's results/ when run from
# its root, as the README does; never inside an installed package); another model gets its own
DEFAULT_OUTPUT = Path("results") / "runs" / "smoke"
DEFAULT_BATCH_SIZE = 32  # results do not depend on it (batch invariance is tested); 32 is the fastest on 2 cores
# The LLaVA smoke model's default questions per task: the whole default sweep (2 tasks, 148 cells) in about 12
# minutes on 2 CPU cores (4b7ead9); `--limit 1000` runs every question of the test splits
SMOKE_LIMIT = 500
DEFAULT_BUDGET_FRACTIONS = (1 / 9, 1 / 4, 1 / 3)  # LLaVA-1.5's 64 / 144 / 192 of 576, in spirit
# how a conversation task's later turns are answered: on the cache the previous turn left (the image reduced once), or
# the whole conversation prefilled again from the full image (reduced again); a sweep runs both by default
CONVERSATIONS = ("prune-once", "re-prune")
PLANNED_TEXT_TOKENS = 64  # prompt tokens besides the image that cost estimates assume (dry run, shards, flops CLI)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def default_output(model: Path) -> Path:
    """Where a sweep on `model` writes by default, under the working directory: results/runs/smoke for the LLaVA smoke
    model, results/runs/smoke_qwen for the Qwen2.5-VL one, results/runs/<folder name> for any other (so that no two
    models share one)."""
    named = {SMOKE_MODEL.resolve(): DEFAULT_OUTPUT, QWEN_SMOKE_MODEL.resolve(): DEFAULT_OUTPUT.with_name("smoke_qwen")}
    model = Path(model).resolve()
    return named.get(model, DEFAULT_OUTPUT.with_name(model.name))


def is_smoke_model(model: Path) -> bool:
    """Whether `model` is the committed LLaVA smoke model (the folder, however the path is written)."""
    return Path(model).resolve() == SMOKE_MODEL.resolve()


def default_limit(model: Path) -> int | None:
    """Questions per task when --limit is not given: `SMOKE_LIMIT` on the LLaVA smoke model, all on any other."""
    return SMOKE_LIMIT if is_smoke_model(model) else None


def reference_rows() -> frozenset[str]:
    """Registered names that are reference rows, not methods (`oracle`: it reads the task's relevant patches), from
    the catalogue (no torch): tables and figures mark them, and no method is compared against them as "best other"."""
    return frozenset(name for name, m in catalogue().items() if m.get("reference"))


def go_offline() -> None:
    """Hugging Face libraries read local files only (nothing is fetched from a hub), unless the user's environment
    says otherwise; call before they are imported."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def controllers(model: Path, method: str) -> dict[int | None, Path]:
    """A learned method's trained controllers for a checkpoint, by training seed: MODEL/controllers/METHOD/seed<N>/
    (what `python -m benchmarks.tools.train_adaptive --seed N` writes), or MODEL/controllers/METHOD/ itself when it
    holds one controller (seed unknown: key None). A folder counts when it holds a controller.json."""
    root = Path(model) / "controllers" / method
    if (root / "controller.json").is_file():
        return {None: root}
    found = {}
    for d in sorted(root.glob("seed*")) if root.is_dir() else []:
        if d.name[4:].isdigit() and (d / "controller.json").is_file():
            found[int(d.name[4:])] = d
    return dict(sorted(found.items()))


def controller_dir(model: Path, method: str, seed: int) -> Path:
    """Where the trainer writes the controller of training seed `seed` by default."""
    return Path(model) / "controllers" / method / f"seed{seed}"
