"""A second synthetic VQA task ("synth_scenes") on which token-selection methods separate.

**Version 2 (issue 33), fixed and committed before any method or model ran on it.** Version 1 (issue 16) asked
counts to 6 and relations between two named objects; a from-scratch 8-layer smoke LLaVA did not learn either within
60 CPU-minutes (held-out, 1,000 questions: count 0.18, left/right 0.55, above/below 0.49, i.e. chance; a pilot on
relation questions alone, fed only the relevant tiles plus distractors, stayed at 0.50 / 0.45 after 3,000 steps),
while its single-object lookup (shape, 0.91) and the background question (1.00) were learned. A number measured on
a question the model cannot answer with every token says nothing about a reduction method, so version 2 keeps only
questions that are one lookup: an attribute of a uniquely named object, the existence of a named (colour, shape)
pair, a count of at most 3 (what the first smoke model learned on `synth_vqa`), and the background. The phrasings
are `synth_vqa`'s. What made the task separate methods stays: more objects than a 1/9 or a 1/4 budget can keep, and
questions about one named object among them, so which patches matter depends on the question.

* **Geometry.** As `synth_vqa`: 96x96 RGB images, 8 px patches, a 12x12 grid of 144 patches, patch index
  ``row * 12 + col`` (row 0 at the top). 1/9 of the patches is 16, 1/4 is 36.
* **Background.** One of four muted tints, named ``gray``, ``brown``, ``pink`` and ``olive`` (a per-image
  brightness jitter, a soft linear gradient and per-pixel noise; no clutter).
* **Objects ("tiles").** 40-48 per scene, each filling one whole patch cell of its own (cells drawn at random): the
  cell is painted near-black and holds a ``circle``, ``square``, ``triangle`` or ``cross`` of 6 px in one of the
  six saturated colours of `synth_vqa` (``red``, ``green``, ``blue``, ``yellow``, ``purple``, ``cyan``). A tile's
  patch shows no background, and 40-48 tiles are more than the 36 patches of a 1/4 budget: no selection at 16 or
  36 patches keeps every object.
* **Question types** (``qtype``; `synth_vqa`'s phrasings; sample ``i`` has type ``QTYPES[i % len(QTYPES)]``;
  answers balanced within each type by cycling):

  ========== ================================================== ==============================================
  qtype      question                                           answer / scene constraint
  ========== ================================================== ==============================================
  shape      "What shape is the {color} object?"                a shape word; exactly one tile of the colour
  color      "What color is the {shape}?"                       a colour word; exactly one tile of the shape
  position   "Is the {color} object on the left or the right?"  "left"/"right"; exactly one tile of the colour,
                                                                in columns 0-4 (left) or 7-11 (right): at least
                                                                one cell from the midline
  exists     "Is there a {color} {shape}?"                      "yes": exactly one tile of the pair; "no": none,
                                                                while tiles of the colour and of the shape are
                                                                both present (a hard negative)
  count      "How many {color} objects are there?"              "1", "2" or "3": exactly that many tiles of the
                                                                colour
  background "What color is the background?"                    ``gray``/``brown``/``pink``/``olive``
  ========== ================================================== ==============================================

  Answer vocabulary: the 6 colours, the 4 shapes, ``left right yes no 1 2 3``, the 4 background names.
* **relevant_patches** (the oracle for selection quality, as in `synth_vqa`): the tiles the question is about (the
  named colour's or shape's one tile; the pair's tile for "yes"; for "no", every tile sharing the colour or the
  shape, any of which shows that the pair is absent; the counted colour's tiles), and for ``background`` every
  patch without a tile (96-104 patches, any of which shows the background).
* **Determinism and splits.** Sample ``i`` of a split comes from ``numpy.random.default_rng([seed, i])`` alone.
  Seeds: train ``SPLIT_SEEDS["train"]`` = 21, val 22, test 23 (version 1 used 11-13; none shared with
  `synth_vqa`); the test split has 1,000 questions.

The final list of question types is decided by a learnability pilot on the train and validation splits, with every
token, before any reduction method runs (recorded in the smoke model's card): a type the smoke model does not learn
leaves `QTYPES`, with its measured accuracy in this docstring. **Decided: all six stay.** The 8-layer smoke model
trained by the committed recipe (commit de49baa), on 300 validation questions per task with every token, after
stage 3 / stage 4: shape 1.00 / 1.00, color 1.00 / 1.00, position 1.00 / 1.00, exists 0.74 / 0.72, count 0.66 /
0.76 (chance 0.33), background 1.00 / 1.00; its training accuracy rose with them (0.68 to 0.78 over stage 3).
Counting to 3 and the hard-negative existence question are learned, if less well than the lookups. The 12-layer
model that replaced it (`benchmarks/smoke_model/checkpoint`, its card) learns them better: exists 0.86 / 0.78,
count 0.74 / 0.82, the rest 1.00.

What the design expects (to be measured, not assumed; the smoke model's card reports it): at 16 patches a uniform
random selection keeps the named tile with probability 1/9, so the lookups fall towards guessing while the
background question stays easy; a selection that keeps only salient tiles keeps about a third of the objects and no
background patch; keeping the question's relevant patches answers every type. Calibration targets (issue 33):
``full`` >= 85 %; ``random`` at 16 patches at least 30 points below ``full``; the oracle selection at 16 within 5
points of ``full``. The gap between the best registered method at 16 and the oracle is reported, not tuned. A
target that is missed is reported as missed, with the reason; the task is not tuned to a method.
"""

from __future__ import annotations

import numpy as np

from benchmarks.tasks.synthetic.generate import (
    COLOR_NAMES,
    COLORS,
    GRID,
    IMAGE_SIZE,
    NUM_PATCHES,
    PATCH_SIZE,
    SHAPES,
    Generator,
    Obj,
    Sample,
    object_mask,
)

QTYPES: tuple[str, ...] = ("shape", "color", "position", "exists", "count", "background")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "brown": (135, 100, 70),
    "pink": (205, 150, 165),
    "olive": (120, 125, 65),
}
ANSWERS: tuple[str, ...] = (*SHAPES, *COLOR_NAMES, "left", "right", "yes", "no", "1", "2", "3", *BACKGROUNDS)
SPLIT_SEEDS: dict[str, int] = {"train": 21, "val": 22, "test": 23}
TILES = (40, 48)  # tiles per scene, inclusive: more than the 36 patches of a 1/4 budget
MAX_COUNT = 3
LEFT_COLS, RIGHT_COLS = range(0, 5), range(7, GRID)  # position questions: the named tile's column
TILE_RGB = 25  # the near-black tile
SHAPE_HALF = 3.0  # the shape's bounding half-size in px: 6 px inside the 8 px cell


def cell_centre(cell: int) -> tuple[float, float]:
    """(x, y) pixel centre of patch cell `cell` (row-major)."""
    row, col = divmod(cell, GRID)
    return col * PATCH_SIZE + PATCH_SIZE / 2, row * PATCH_SIZE + PATCH_SIZE / 2


def cell_of(obj: Obj) -> int:
    return int(obj.y // PATCH_SIZE) * GRID + int(obj.x // PATCH_SIZE)


def render_scene(objects: list[Obj], background: str, rng: np.random.Generator) -> np.ndarray:
    """The tinted background, then each tile (its whole cell near-black) with its shape in its colour."""
    s = IMAGE_SIZE
    base = np.array(BACKGROUNDS[background], dtype=np.float32) + rng.uniform(-10, 10)
    ramp = np.linspace(-1.0, 1.0, s, dtype=np.float32)
    gx, gy = rng.uniform(-10, 10, size=2)
    img = base[None, None, :] + (gx * ramp[None, :] + gy * ramp[:, None])[..., None]  # (96, 96, 3)
    img = img + rng.normal(0.0, 6.0, size=(s, s, 3))
    for obj in objects:
        row, col = divmod(cell_of(obj), GRID)
        tile = (slice(row * PATCH_SIZE, (row + 1) * PATCH_SIZE), slice(col * PATCH_SIZE, (col + 1) * PATCH_SIZE))
        img[tile] = TILE_RGB + rng.normal(0.0, 4.0, size=(PATCH_SIZE, PATCH_SIZE, 3))
        img[object_mask(obj)] = np.array(COLORS[obj.color]) + rng.integers(-12, 13, size=3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _pairs(ok) -> list[tuple[str, str]]:
    """Every (shape, colour) pair that satisfies `ok(shape, colour)`."""
    return [(s, c) for s in SHAPES for c in COLOR_NAMES if ok(s, c)]


def _draw(rng: np.random.Generator, pairs: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    return [pairs[int(i)] for i in rng.integers(0, len(pairs), size=n)]


def generate_scene(seed: int, index: int) -> Sample:
    """Sample `index` of the split with seed `seed` (a pure function of both)."""
    rng = np.random.default_rng([seed, index])
    qtype, j = QTYPES[index % len(QTYPES)], index // len(QTYPES)
    n = int(rng.integers(TILES[0], TILES[1] + 1))
    background = list(BACKGROUNDS)[int(rng.integers(0, len(BACKGROUNDS)))]
    pick = lambda seq: seq[int(rng.integers(0, len(seq)))]  # noqa: E731
    cells = rng.permutation(NUM_PATCHES).tolist()
    about = lambda s, c: False  # noqa: E731  (shape, colour) of the tiles the question is about
    if qtype == "shape":
        shape, color = SHAPES[j % len(SHAPES)], pick(COLOR_NAMES)
        fixed, others = [(shape, color)], _pairs(lambda s, c: c != color)
        question, answer, about = f"What shape is the {color} object?", shape, lambda s, c: c == color
    elif qtype == "color":
        color, shape = COLOR_NAMES[j % len(COLOR_NAMES)], pick(SHAPES)
        fixed, others = [(shape, color)], _pairs(lambda s, c: s != shape)
        question, answer, about = f"What color is the {shape}?", color, lambda s, c: s == shape
    elif qtype == "position":
        color, answer = pick(COLOR_NAMES), ("left", "right")[j % 2]
        fixed, others = [(pick(SHAPES), color)], _pairs(lambda s, c: c != color)
        cols = LEFT_COLS if answer == "left" else RIGHT_COLS
        first = next(c for c in cells if c % GRID in cols)
        cells = [first] + [c for c in cells if c != first]
        question, about = f"Is the {color} object on the left or the right?", lambda s, c: c == color
    elif qtype == "exists":
        shape, color = pick(SHAPES), pick(COLOR_NAMES)
        others = _pairs(lambda s, c: (s, c) != (shape, color))
        if j % 2 == 0:
            answer, fixed, about = "yes", [(shape, color)], lambda s, c: (s, c) == (shape, color)
        else:  # hard negative: the colour and the shape are both there, never together
            answer, about = "no", lambda s, c: s == shape or c == color
            fixed = [pick([p for p in others if p[1] == color]), pick([p for p in others if p[0] == shape])]
        question = f"Is there a {color} {shape}?"
    elif qtype == "count":
        count, color = 1 + j % MAX_COUNT, pick(COLOR_NAMES)
        fixed, others = _draw(rng, _pairs(lambda s, c: c == color), count), _pairs(lambda s, c: c != color)
        question, answer, about = f"How many {color} objects are there?", str(count), lambda s, c: c == color
    else:  # background
        background = list(BACKGROUNDS)[j % len(BACKGROUNDS)]
        fixed, others = [], _pairs(lambda s, c: True)
        question, answer = "What color is the background?", background
    specs = fixed + _draw(rng, others, n - len(fixed))
    objects = [Obj(s, c, *cell_centre(cell), SHAPE_HALF) for (s, c), cell in zip(specs, cells, strict=False)]
    image = render_scene(objects, background, rng)
    if qtype == "background":
        relevant = sorted(set(range(NUM_PATCHES)) - {cell_of(o) for o in objects})
    else:
        relevant = sorted(cell_of(o) for o in objects if about(o.shape, o.color))
    order = rng.permutation(len(objects))  # the record lists objects in no telling order
    return Sample(image, [objects[int(k)] for k in order], question, answer, qtype, relevant)


SYNTH_SCENES = Generator("scenes", generate_scene, SPLIT_SEEDS, "scenes_test.parquet")
