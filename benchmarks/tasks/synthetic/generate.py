"""Procedurally generated VQA benchmark ("synth") for measuring visual-token reduction.

Design (fixed before any reduction method was tuned on it):

* **Geometry.** 96x96 RGB images. The models use 8 px patches, so an image is a 12x12 grid of 144 patches;
  a patch index is ``row * 12 + col`` (row-major, row 0 at the top).
* **Background.** A muted (low-saturation) base colour with a soft linear gradient and per-pixel Gaussian noise,
  plus clutter: 4-8 thin 1 px lines and 12-24 dots of 1-2 px, all in muted colours near the background's.
* **Objects.** 3-5 non-overlapping shapes (bounding boxes at least 2 px apart), each a ``circle``, ``square``,
  ``triangle`` or ``cross`` with a bounding half-size (radius) of 5-6 px, in one of six saturated colours
  (``red``, ``green``, ``blue``, ``yellow``, ``purple``, ``cyan``; each channel jittered by up to 12).
  An object covers 4-9 patches, so one object is at most ~6 % of the image.
* **Question types** (``qtype``; exactly one phrasing each; sample ``i`` has type ``QTYPES[i % 5]``):

  ========== =================================================== ==================================
  qtype      question                                            answer / scene constraint
  ========== =================================================== ==================================
  color      "What color is the {shape}?"                        colour word; the shape is unique
  shape      "What shape is the {color} object?"                 shape word; the colour is unique
  count      "How many {color} objects are there?"               "1", "2" or "3"; objects of that colour
  exists     "Is there a {color} {shape}?"                       "yes"/"no"; a "no" scene always holds
                                                                 the colour or the shape (hard negative)
  position   "Is the {color} object on the left or the right?"   "left"/"right"; the colour is unique and
                                                                 the object's centre is at x <= 30 or
                                                                 x >= 66 (well away from the midline 48)
  ========== =================================================== ==================================

  Answers are balanced within each type by cycling (colour answers over the 6 colours, shape answers over the
  4 shapes, count over {1,2,3}, exists yes/no, position left/right). Answer vocabulary (17 words):
  the 6 colours, the 4 shapes, ``1 2 3``, ``yes no``, ``left right``.
* **relevant_patches** (the oracle for selection quality): the sorted indices of the patches that contain at
  least one pixel of an object the question is about: the named shape (color), the named colour (shape), every
  object of the counted colour (count), every object matching the colour *and* shape for a "yes"
  (exists), every object sharing the colour *or* the shape for a "no" (exists; never empty, see above), and
  the object of the named colour (position). Clutter never counts.
* **Determinism and splits.** Sample ``i`` of a split is drawn from ``numpy.random.default_rng([seed, i])``
  alone, so the same seed gives byte-identical records and a split of n samples is a prefix of a larger one.
  Default seeds: train ``SPLIT_SEEDS["train"]`` (20 000 samples in the training recipe), val
  ``SPLIT_SEEDS["val"]``, test ``SPLIT_SEEDS["test"]`` (1000 questions, 200 per type). Held-out splits use
  seeds that differ from the training seed.

Usage::

    python -m benchmarks.tasks.synthetic.generate                      # default test split -> <data_dir()>/test.parquet
    python -m benchmarks.tasks.synthetic.generate --split train --n 5000 --out /tmp/train.parquet
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from benchmarks.tasks import SYNTH_IMAGE_SIZE

IMAGE_SIZE = SYNTH_IMAGE_SIZE  # 96
PATCH_SIZE = 8
GRID = IMAGE_SIZE // PATCH_SIZE  # 12
NUM_PATCHES = GRID * GRID  # 144
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 170, 55),
    "blue": (40, 75, 230),
    "yellow": (235, 215, 35),
    "purple": (150, 55, 205),
    "cyan": (40, 205, 215),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
QTYPES: tuple[str, ...] = ("color", "shape", "count", "exists", "position")
ANSWERS: tuple[str, ...] = (*COLOR_NAMES, *SHAPES, "1", "2", "3", "yes", "no", "left", "right")
SPLIT_SEEDS: dict[str, int] = {"train": 1, "val": 2, "test": 3}
DEFAULT_TEST_N = 1000
CACHE_ENV = "TOKEN_REDUCTION_BENCH_CACHE"
RADIUS_RANGE = (5.0, 6.0)
LEFT_MAX_X, RIGHT_MIN_X = 30.0, 66.0  # position questions: object centre x bounds (midline at 48)


@dataclass(frozen=True)
class Obj:
    """One shape in a scene. Coordinates are in pixels; (0, 0) is the top-left pixel's corner."""

    shape: str
    color: str
    x: float  # centre x
    y: float  # centre y
    r: float  # bounding half-size


@dataclass
class Sample:
    """One generated question with its scene."""

    image: np.ndarray  # (96, 96, 3) uint8
    objects: list[Obj]
    question: str
    answer: str
    qtype: str
    relevant_patches: list[int]
    follow_ups: list[dict] | None = None  # later turns on the same image: {question, answer, qtype, relevant_patches}


@dataclass(frozen=True)
class Generator:
    """One synthetic task's generator, as the split writers below use it.

    Attributes:
        name: record id prefix (``{name}-{split}-{i:06d}``).
        sample: (seed, index) -> `Sample`, a pure function of both.
        seeds: default seed of each split.
        test_name: file name of its test split in `data_dir()`, where the task's YAML reads it.
    """

    name: str
    sample: Callable[[int, int], Sample]
    seeds: dict[str, int]
    test_name: str

    @property
    def test_file(self) -> Path:
        """The test split the task reads: ``data_dir() / test_name``."""
        return data_dir() / self.test_name


def data_dir() -> Path:
    """Where the synthetic tasks' generated data lives: a cache folder, by the XDG convention Hugging Face's `HF_HOME`
    follows too. ``$TOKEN_REDUCTION_BENCH_CACHE/synthetic`` when that is set, else
    ``$XDG_CACHE_HOME/token-reduction-bench/synthetic`` (default ``~/.cache/token-reduction-bench/synthetic``). Read at
    each call, so a change of the environment takes effect at once. The files are deterministic and rewritten when
    stale, so deleting the folder costs a few seconds."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "token-reduction-bench"
    return Path(root).expanduser() / "synthetic"


def object_mask(obj: Obj, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean pixel mask of one object.

    Args:
        obj: The object.
        size: Image side in pixels.

    Returns:
        (size, size) bool array, True where the object is drawn (pixel centres are tested).
    """
    centres = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    dx, dy, r = centres[None, :] - obj.x, centres[:, None] - obj.y, obj.r  # (1, size), (size, 1): broadcast
    if obj.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if obj.shape == "square":
        return np.broadcast_to(np.abs(dx) <= 0.82 * r, (size, size)) & (np.abs(dy) <= 0.82 * r)
    if obj.shape == "triangle":  # apex up at y - r, base at y + 0.8 r, base width 2 r
        t = (dy + r) / (1.8 * r)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    if obj.shape == "cross":
        arm = 0.32 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def patches_of(mask: np.ndarray) -> list[int]:
    """Sorted row-major indices of the 8 px patches that contain at least one True pixel.

    Args:
        mask: (96, 96) bool pixel mask.

    Returns:
        Sorted patch indices ``row * 12 + col``.
    """
    per_patch = mask.reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE).any(axis=(1, 3))  # (12, 12)
    return [int(i) for i in np.flatnonzero(per_patch)]


def relevant_patches(objects: list[Obj]) -> list[int]:
    """Union of the patches covered by the given objects, sorted (empty list for no objects)."""
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for obj in objects:
        mask |= object_mask(obj)
    return patches_of(mask)


def _muted(rng: np.random.Generator, base: np.ndarray, spread: float) -> tuple[int, int, int]:
    """A colour near `base`: a shared brightness shift plus a small per-channel tint."""
    c = base + rng.uniform(-spread, spread) + rng.uniform(-12, 12, size=3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def render(objects: list[Obj], rng: np.random.Generator) -> np.ndarray:
    """Draw the noisy cluttered background, then the objects on top.

    Args:
        objects: Shapes to draw.
        rng: Source of all randomness of the background, clutter and colour jitter.

    Returns:
        (96, 96, 3) uint8 image.
    """
    s = IMAGE_SIZE
    base = rng.uniform(85, 165) + rng.uniform(-18, 18, size=3)  # muted: small chroma around a grey level
    ramp = np.linspace(-1.0, 1.0, s, dtype=np.float32)
    gx, gy = rng.uniform(-14, 14, size=2)
    img = base[None, None, :] + (gx * ramp[None, :] + gy * ramp[:, None])[..., None]  # (96, 96, 3)
    img = img + rng.normal(0.0, 9.0, size=(s, s, 3))
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(4, 9))):  # thin random lines
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, s, size=4))
        draw.line([(x0, y0), (x1, y1)], fill=_muted(rng, base, 45), width=1)
    for _ in range(int(rng.integers(12, 25))):  # small dots
        x, y = (int(v) for v in rng.integers(0, s - 2, size=2))
        d = int(rng.integers(1, 3))
        draw.rectangle([x, y, x + d - 1, y + d - 1], fill=_muted(rng, base, 45))
    out = np.asarray(canvas).copy()
    for obj in objects:
        rgb = np.clip(np.array(COLORS[obj.color]) + rng.integers(-12, 13, size=3), 0, 255)
        out[object_mask(obj)] = rgb.astype(np.uint8)
    return out


def _place(
    rng: np.random.Generator, specs: list[tuple[str, str]], x_range: tuple[float, float] | None = None
) -> list[Obj]:
    """Place objects without overlap; the first spec may be confined to an x range (its centre).

    Args:
        rng: Random source.
        specs: (shape, color) per object, in placement order.
        x_range: Optional (min, max) for the first object's centre x.

    Returns:
        Placed objects, same order as `specs`.
    """
    for _ in range(200):  # restart the whole layout if one object cannot be placed
        placed: list[Obj] = []
        for k, (shape, color) in enumerate(specs):
            r = float(rng.uniform(*RADIUS_RANGE))
            lo, hi = r + 1.0, IMAGE_SIZE - r - 1.0
            xlo, xhi = (max(lo, x_range[0]), min(hi, x_range[1])) if (k == 0 and x_range) else (lo, hi)
            for _ in range(100):
                x, y = float(rng.uniform(xlo, xhi)), float(rng.uniform(lo, hi))
                if all(max(abs(x - o.x), abs(y - o.y)) >= r + o.r + 2.0 for o in placed):
                    placed.append(Obj(shape, color, round(x, 2), round(y, 2), round(r, 2)))
                    break
            else:
                break
        if len(placed) == len(specs):
            return placed
    raise RuntimeError("could not place objects without overlap; lower the object count or radius")


def _fill(
    rng: np.random.Generator, n: int, ok: Callable[[str, str], bool]
) -> list[tuple[str, str]]:
    """Draw `n` random (shape, color) pairs that satisfy `ok`."""
    pairs = [(s, c) for s in SHAPES for c in COLOR_NAMES if ok(s, c)]
    return [pairs[int(i)] for i in rng.integers(0, len(pairs), size=n)]


def generate_sample(seed: int, index: int) -> Sample:
    """Generate sample `index` of the split with seed `seed` (a pure function of both).

    Args:
        seed: Split seed.
        index: Sample index; sets the question type (``QTYPES[index % 5]``) and the balanced answer.

    Returns:
        The sample, with its image as a uint8 array.
    """
    rng = np.random.default_rng([seed, index])
    qtype, j = QTYPES[index % len(QTYPES)], index // len(QTYPES)
    n_obj = int(rng.integers(3, 6))
    pick = lambda seq: seq[int(rng.integers(0, len(seq)))]  # noqa: E731
    x_range = None
    if qtype == "color":
        color, shape = COLOR_NAMES[j % len(COLOR_NAMES)], pick(SHAPES)
        specs = [(shape, color)] + _fill(rng, n_obj - 1, lambda s, c: s != shape)
        question, answer, about = f"What color is the {shape}?", color, lambda o: o.shape == shape
    elif qtype == "shape":
        shape, color = SHAPES[j % len(SHAPES)], pick(COLOR_NAMES)
        specs = [(shape, color)] + _fill(rng, n_obj - 1, lambda s, c: c != color)
        question, answer, about = f"What shape is the {color} object?", shape, lambda o: o.color == color
    elif qtype == "count":
        count, color = 1 + j % 3, pick(COLOR_NAMES)
        n_obj = max(n_obj, count)
        specs = _fill(rng, count, lambda s, c: c == color) + _fill(rng, n_obj - count, lambda s, c: c != color)
        question, answer, about = f"How many {color} objects are there?", str(count), lambda o: o.color == color
    elif qtype == "exists":
        shape, color = pick(SHAPES), pick(COLOR_NAMES)
        if j % 2 == 0:
            answer, about = "yes", lambda o: o.shape == shape and o.color == color
            specs = [(shape, color)] + _fill(rng, n_obj - 1, lambda s, c: True)
        else:  # hard negative: the colour, the shape, or both are present, never together
            answer, about = "no", lambda o: o.shape == shape or o.color == color
            mode = int(rng.integers(0, 3))
            lure = [] if mode == 1 else _fill(rng, 1, lambda s, c: c == color and s != shape)
            lure += [] if mode == 0 else _fill(rng, 1, lambda s, c: s == shape and c != color)
            specs = lure + _fill(rng, n_obj - len(lure), lambda s, c: not (s == shape and c == color))
        question = f"Is there a {color} {shape}?"
    elif qtype == "position":
        color = pick(COLOR_NAMES)
        answer = "left" if j % 2 == 0 else "right"
        x_range = (0.0, LEFT_MAX_X) if answer == "left" else (RIGHT_MIN_X, float(IMAGE_SIZE))
        specs = [(pick(SHAPES), color)] + _fill(rng, n_obj - 1, lambda s, c: c != color)
        question, about = f"Is the {color} object on the left or the right?", lambda o: o.color == color
    else:  # pragma: no cover - QTYPES is exhaustive
        raise ValueError(qtype)
    order = rng.permutation(len(specs)) if x_range is None else np.arange(len(specs))
    objects = _place(rng, [specs[int(k)] for k in order], x_range)
    image = render(objects, rng)
    return Sample(image, objects, question, answer, qtype, relevant_patches([o for o in objects if about(o)]))


SYNTH_VQA = Generator("synth", generate_sample, SPLIT_SEEDS, "test.parquet")


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a (H, W, 3) uint8 array as PNG (deterministic bytes)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def make_samples(split: str, n: int, seed: int | None = None, gen: Generator | None = None) -> list[dict]:
    """Generate `n` records of a split.

    Args:
        split: Split name, used in the record ids (``synth-{split}-{i:06d}``).
        n: Number of questions.
        seed: Split seed; defaults to ``SPLIT_SEEDS[split]`` (the generator's `seeds`).
        gen: The task's generator; default `SYNTH_VQA` (this module's).

    Returns:
        Records with ``doc_id``, ``id``, ``image`` (``{"bytes": PNG, "path": None}``), ``question``, ``answer``,
        ``qtype``, ``relevant_patches`` and ``objects`` (JSON list of {shape, color, x, y, r}); a conversation
        task's (`Sample.follow_ups`) also ``follow_ups``.
    """
    gen = gen or SYNTH_VQA
    if seed is None:
        if split not in gen.seeds:
            raise ValueError(f"no default seed for split {split!r}; pass seed= or use one of {sorted(gen.seeds)}")
        seed = gen.seeds[split]
    records = []
    for i in range(n):
        s = gen.sample(seed, i)
        records.append({
            "doc_id": i,
            "id": f"{gen.name}-{split}-{i:06d}",
            "image": {"bytes": png_bytes(s.image), "path": None},
            "question": s.question,
            "answer": s.answer,
            "qtype": s.qtype,
            "relevant_patches": s.relevant_patches,
            "objects": json.dumps([asdict(o) for o in s.objects]),
        } | ({} if s.follow_ups is None else {"follow_ups": s.follow_ups}))
    return records


def write_split(path: str | Path, split: str, n: int, seed: int | None = None, gen: Generator | None = None) -> Path:
    """Write a split as parquet with an HF ``datasets.Image`` column (atomically: temp file, then rename).

    Args:
        path: Output parquet file.
        split: Split name (see `make_samples`).
        n: Number of questions.
        seed: Split seed; defaults to ``SPLIT_SEEDS[split]``.
        gen: The task's generator; default `SYNTH_VQA`.

    Returns:
        The written path.
    """
    features = datasets.Features({
        "doc_id": datasets.Value("int32"),
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "qtype": datasets.Value("string"),
        "relevant_patches": datasets.List(datasets.Value("int32")),
        "objects": datasets.Value("string"),
    })
    records = make_samples(split, n, seed, gen)
    if records and "follow_ups" in records[0]:  # a conversation task's later turns
        features["follow_ups"] = datasets.List({"question": datasets.Value("string"),
                                                "answer": datasets.Value("string"), "qtype": datasets.Value("string"),
                                                "relevant_patches": datasets.List(datasets.Value("int32"))})
    columns = {k: [r[k] for r in records] for k in features}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(tmp))
    tmp.replace(path)
    return path


def ensure_test_data(path: str | Path | None = None, n: int | None = None, seed: int | None = None,
                     gen: Generator | None = None) -> Path:
    """Write a task's default test split (`gen`, default `SYNTH_VQA`: ``data_dir() / "test.parquet"``) unless it is
    already there.

    An existing file is kept only if it has `n` rows and its first records match what this generator makes now, so
    data left over from an older benchmark version is rewritten.

    Args:
        path: Output file; defaults to the generator's `test_file` (the file its task reads).
        n: Number of questions (default `DEFAULT_TEST_N`, 1000: 200 per type).
        seed: Split seed (default the generator's test seed).
        gen: The task's generator.

    Returns:
        Path of the parquet file.
    """
    gen, n = gen or SYNTH_VQA, n or DEFAULT_TEST_N
    path = Path(path) if path is not None else gen.test_file
    seed = gen.seeds["test"] if seed is None else seed
    if path.exists():
        keys = ["question", "answer", "relevant_patches"]
        stored = pq.read_table(path, columns=keys).slice(0, 5).to_pylist()
        expected = [{k: r[k] for k in keys} for r in make_samples("test", 5, seed, gen)]
        if pq.read_metadata(path).num_rows == n and stored == expected:
            return path
    return write_split(path, "test", n, seed, gen)


def task_data_file(gen: Generator, task: str, write: bool) -> str:
    """A synthetic task's data file, as its YAML reads it (``data_files: {test: !function <utils>.test_file}``:
    lmms-eval's YAML loader returns whatever attribute the tag names, here this path). With `write` (lmms-eval's loader
    executing the task's utils file, before the dataset loads) a missing file is written first; a stale one is left
    to `run_bench.py`, which refreshes it.

    Args:
        gen: The task's generator.
        task: The task's name, for the message.
        write: Whether to write a missing file.

    Returns:
        The file's path, as a string.
    """
    path = gen.test_file
    if write and not path.exists():
        print(f"{task}: writing the task's data to {path} (first use; deterministic, a few seconds)", file=sys.stderr)
        ensure_test_data(gen=gen)
    return str(path)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: write one split as parquet."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tasks.synthetic.generate",
        description="Generate the synthetic VQA benchmark (96x96 images, 144 patches of 8 px, 5 question types) "
        "as a parquet file that the lmms-eval task 'synth_vqa' can read.",
        epilog="The default writes the held-out test split (1000 questions, seed 3) to "
        "test.parquet in the cache folder the task reads ($TOKEN_REDUCTION_BENCH_CACHE/synthetic, else "
        "$XDG_CACHE_HOME/token-reduction-bench/synthetic, default ~/.cache/...). Same seed -> identical records.",
    )
    parser.add_argument("--split", default="test", help="split name used in record ids (default: test)")
    parser.add_argument("--n", type=int, default=DEFAULT_TEST_N, help="number of questions (default: 1000)")
    parser.add_argument("--seed", type=int, default=None, help="split seed (default: train=1, val=2, test=3)")
    parser.add_argument("--out", type=Path, default=None, help="output parquet (default: <cache>/<split>.parquet)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    args = parser.parse_args(argv)
    out = args.out or data_dir() / f"{args.split}.parquet"
    if out.exists() and not args.force:
        parser.exit(0, f"{out} exists; pass --force to regenerate it\n")
    print(f"wrote {write_split(out, args.split, args.n, args.seed)}")


if __name__ == "__main__":
    main()
