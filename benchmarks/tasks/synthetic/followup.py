"""A two-turn variant of `synth_scenes` ("synth_scenes_followup", issue 38): two questions about the same image, each
about another named tile, asked one after the other in one conversation.

Token reduction is sold for chat, where the image stays in the conversation while the questions change. A method
that selects by the first question may have dropped what the second one needs; this task measures it.

* **Scenes.** As `synth_scenes` (`scenes.py`): 96x96 images, a 12x12 grid of 144 patches, one of four tinted
  backgrounds, 40-48 near-black tiles each holding one coloured shape, rendered by the same function.
* **Turns.** Each conversation asks about two different tiles A (turn 1) and B (turn 2). Each turn is one of the
  three lookups the smoke model answers with every token at 1.00 on `synth_scenes` (its card): ``shape`` ("What
  shape is the {color} object?", the colour unique in the scene), ``color`` ("What color is the {shape}?", the
  shape unique) and ``position`` ("Is the {color} object on the left or the right?", the colour unique, the tile in
  columns 0-4 or 7-11). Conversation ``i`` asks turn types ``LOOKUPS[i % 3]`` then ``LOOKUPS[(i // 3) % 3]`` (all
  nine pairs, in turn); answers cycle within each type.
* **Uniqueness.** A tile named by its colour is the only tile of that colour, one named by its shape the only one of
  that shape, the other target included; every other tile avoids both named attributes.
* **relevant_patches.** Per turn, the one cell of the tile it asks about: ``relevant_patches`` for turn 1 and
  ``follow_ups[0]["relevant_patches"]`` for turn 2, never the same cell.
* **Determinism.** Conversation ``i`` of a split comes from ``numpy.random.default_rng([seed, i])`` alone; seeds
  train 31, val 32, test 33 (none shared with the other tasks); the test split has 1,000 conversations.

The smoke model was trained on single questions only (`synth_vqa`, `synth_scenes`); it has never seen a second turn.
`full` on the second turn is therefore the reference every method is compared with, paired, not the first turn.
"""

from __future__ import annotations

import numpy as np

from benchmarks.tasks.synthetic.generate import COLOR_NAMES, GRID, NUM_PATCHES, SHAPES, Generator, Obj, Sample
from benchmarks.tasks.synthetic.scenes import (
    BACKGROUNDS,
    LEFT_COLS,
    RIGHT_COLS,
    SHAPE_HALF,
    TILES,
    cell_centre,
    render_scene,
)

LOOKUPS: tuple[str, ...] = ("shape", "color", "position")
SPLIT_SEEDS: dict[str, int] = {"train": 31, "val": 32, "test": 33}


def _question(kind: str, shape: str, color: str) -> str:
    return {"shape": f"What shape is the {color} object?", "color": f"What color is the {shape}?",
            "position": f"Is the {color} object on the left or the right?"}[kind]


def generate_followup(seed: int, index: int) -> Sample:
    """Conversation `index` of the split with seed `seed` (a pure function of both): turn 1 in the `Sample`'s own
    fields, turn 2 in `follow_ups`."""
    rng = np.random.default_rng([seed, index])
    kinds = (LOOKUPS[index % 3], LOOKUPS[(index // 3) % 3])
    j = index // 9  # answers cycle per conversation type
    pick = lambda seq: seq[int(rng.integers(0, len(seq)))]  # noqa: E731
    targets: list[tuple[str, str, str]] = []  # (shape, colour, side or "") of A, then B
    for turn, kind in enumerate(kinds):
        cycle = j + turn * 5  # the two turns' answers do not move in step
        shapes, colors = list(SHAPES), list(COLOR_NAMES)
        if targets:  # the other target must not share a named attribute (either way round)
            s0, c0, _ = targets[0]
            if kind in ("shape", "position") or kinds[0] in ("shape", "position"):
                colors.remove(c0)
            if kind == "color" or kinds[0] == "color":
                shapes.remove(s0)
        if kind == "shape":
            targets.append((shapes[cycle % len(shapes)], pick(colors), ""))
        elif kind == "color":
            targets.append((pick(shapes), colors[cycle % len(colors)], ""))
        else:
            targets.append((pick(shapes), pick(colors), ("left", "right")[cycle % 2]))
    named_colors = {c for (s, c, _), k in zip(targets, kinds, strict=True) if k != "color"}
    named_shapes = {s for (s, c, _), k in zip(targets, kinds, strict=True) if k == "color"}
    others = [(s, c) for s in SHAPES for c in COLOR_NAMES if s not in named_shapes and c not in named_colors]
    n = int(rng.integers(TILES[0], TILES[1] + 1))
    background = list(BACKGROUNDS)[int(rng.integers(0, len(BACKGROUNDS)))]
    cells = rng.permutation(NUM_PATCHES).tolist()
    placed = []
    for _, _, side in targets:  # a position target in its side's columns; every target in a cell of its own
        cols = LEFT_COLS if side == "left" else RIGHT_COLS if side == "right" else range(GRID)
        cell = next(c for c in cells if c % GRID in cols and c not in placed)
        placed.append(cell)
    rest = [c for c in cells if c not in placed]
    fill = [others[int(i)] for i in rng.integers(0, len(others), size=n - len(targets))]
    specs = [(s, c) for s, c, _ in targets] + fill
    objects = [Obj(s, c, *cell_centre(cell), SHAPE_HALF) for (s, c), cell in zip(specs, placed + rest, strict=False)]
    image = render_scene(objects, background, rng)
    turns = []
    for (shape, color, side), kind, cell in zip(targets, kinds, placed, strict=True):
        answer = {"shape": shape, "color": color, "position": side}[kind]
        turns.append({"question": _question(kind, shape, color), "answer": answer, "qtype": kind,
                      "relevant_patches": [cell]})
    order = rng.permutation(len(objects))  # the record lists objects in no telling order
    first = turns[0]
    return Sample(image, [objects[int(k)] for k in order], first["question"], first["answer"], first["qtype"],
                  first["relevant_patches"], follow_ups=turns[1:])


SYNTH_SCENES_FOLLOWUP = Generator("followup", generate_followup, SPLIT_SEEDS, "followup_test.parquet")
