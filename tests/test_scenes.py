"""synth_scenes (benchmarks/tasks/synthetic/scenes.py): every design rule of its docstring holds on generated scenes,
and the lmms-eval task scores per type."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from lmms_eval import evaluator
from lmms_eval.tasks import TaskManager

from benchmarks.tasks.synthetic import generate as g
from benchmarks.tasks.synthetic import scenes as sc
from tests.test_synthetic import TASKS_DIR, _dummy_lmms

SCENES = [sc.generate_scene(sc.SPLIT_SEEDS["test"], i) for i in range(150)]


def test_deterministic_and_a_split_is_a_prefix():
    a = g.make_samples("test", 6, gen=sc.SYNTH_SCENES)
    assert a == g.make_samples("test", 6, gen=sc.SYNTH_SCENES)
    assert g.make_samples("test", 3, gen=sc.SYNTH_SCENES) == a[:3]
    assert a[0]["id"] == "scenes-test-000000"
    other = g.make_samples("test", 6, seed=99, gen=sc.SYNTH_SCENES)
    assert [r["image"]["bytes"] for r in a] != [r["image"]["bytes"] for r in other]


def test_scenes_hold_more_objects_than_a_quarter_of_the_patches():
    for s in SCENES:
        cells = [sc.cell_of(o) for o in s.objects]
        assert sc.TILES[0] <= len(cells) <= sc.TILES[1] and len(set(cells)) == len(cells)
        assert len(cells) > g.NUM_PATCHES // 4 > round(g.NUM_PATCHES / 9)  # 36 (and 16) patches cannot keep them all


def _named(s, word_index: int, attr: str) -> list:
    """The scene's objects whose `attr` is the question's word at `word_index`."""
    word = s.question.rstrip("?").split()[word_index]
    return [o for o in s.objects if getattr(o, attr) == word]


def test_every_question_is_one_lookup_whose_answer_follows_from_the_scene():
    for s in SCENES:
        objs, cell = s.objects, sc.cell_of
        if s.qtype == "shape":  # "What shape is the {color} object?": the colour is unique
            (obj,) = _named(s, 4, "color")
            assert s.answer == obj.shape and s.relevant_patches == [cell(obj)]
        elif s.qtype == "color":  # "What color is the {shape}?": the shape is unique
            (obj,) = _named(s, 4, "shape")
            assert s.answer == obj.color and s.relevant_patches == [cell(obj)]
        elif s.qtype == "position":  # "Is the {color} object on the left or the right?"
            (obj,) = _named(s, 2, "color")
            col = cell(obj) % g.GRID
            assert s.answer == ("left" if col in sc.LEFT_COLS else "right") and col not in (5, 6)
            assert s.relevant_patches == [cell(obj)]
        elif s.qtype == "exists":  # "Is there a {color} {shape}?"
            color, shape = s.question.rstrip("?").split()[3:5]
            pair = [o for o in objs if (o.color, o.shape) == (color, shape)]
            assert s.answer == ("yes" if pair else "no") and len(pair) <= 1
            if pair:
                assert s.relevant_patches == [cell(pair[0])]
            else:  # a hard negative: both halves of the pair are there, apart
                assert any(o.color == color for o in objs) and any(o.shape == shape for o in objs)
                assert s.relevant_patches == sorted(cell(o) for o in objs if o.color == color or o.shape == shape)
        elif s.qtype == "count":
            tiles = _named(s, 2, "color")
            assert s.answer == str(len(tiles)) and 1 <= len(tiles) <= sc.MAX_COUNT
            assert s.relevant_patches == sorted(cell(o) for o in tiles)
        else:
            assert s.qtype == "background"
            tiles = {cell(o) for o in objs}
            assert s.relevant_patches == sorted(set(range(g.NUM_PATCHES)) - tiles)
            free = s.image.reshape(g.GRID, 8, g.GRID, 8, 3).transpose(0, 2, 1, 3, 4).reshape(g.NUM_PATCHES, 64, 3)
            mean = free[s.relevant_patches].reshape(-1, 3).mean(0)  # the background's colour, from its patches
            nearest = min(sc.BACKGROUNDS, key=lambda k: np.abs(mean - np.array(sc.BACKGROUNDS[k])).sum())
            assert s.answer == nearest


def test_most_questions_name_one_object_and_one_is_about_the_whole_scene():
    """Which patches matter depends on the question: a type that names an object has few relevant patches (fewer
    than 16, so a budget of 16 can hold them), and one type is about the background, which no object shows."""
    per_type = {q: [len(s.relevant_patches) for s in SCENES if s.qtype == q] for q in sc.QTYPES}
    named = [q for q in sc.QTYPES if q != "background"]
    assert len(named) > len(sc.QTYPES) / 2 and "background" in sc.QTYPES
    for q in named:
        assert np.median(per_type[q]) <= 3, q
    assert min(per_type["background"]) >= g.NUM_PATCHES - sc.TILES[1]
    assert set(sc.QTYPES) <= {"shape", "color", "position", "exists", "count", "background"}  # one lookup each


def test_a_tile_shows_no_background_and_answers_are_balanced():
    s = next(x for x in SCENES if x.qtype == "background")
    patches = s.image.reshape(g.GRID, 8, g.GRID, 8, 3).transpose(0, 2, 1, 3, 4).reshape(g.NUM_PATCHES, 64, 3)
    bg = np.array(sc.BACKGROUNDS[s.answer])
    for o in s.objects:  # every pixel of a tile is the dark tile or the shape's saturated colour
        px = patches[sc.cell_of(o)].astype(int)
        assert (np.abs(px - bg).sum(1) > 60).all()
    counts = Counter((s.qtype, s.answer) for s in SCENES)
    assert {q for q, _ in counts} == set(sc.QTYPES)
    for q in sc.QTYPES:
        per = [n for (t, _), n in counts.items() if t == q]
        assert max(per) - min(per) <= 1, (q, per)
    assert {a for _, a in counts} <= set(sc.ANSWERS)


def test_lmms_eval_task_scores_per_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = g.ensure_test_data(gen=sc.SYNTH_SCENES)
    limit, seen = 25, []
    tm = TaskManager(include_defaults=False, include_path=[str(TASKS_DIR)])
    res = evaluator.simple_evaluate(model=_dummy_lmms(seen), tasks=["synth_scenes"], task_manager=tm, limit=limit,
                                    bootstrap_iters=0, datetime_str=f"test-{os.getpid()}")
    docs = pd.read_parquet(data).head(limit)
    good = (docs["qtype"] == "color") | (docs["doc_id"] % 3 == 0)  # the dummy's rule
    got = res["results"]["synth_scenes"]
    assert got["exact_match,none"] == pytest.approx(good.mean())
    for q in sc.QTYPES:
        assert got[f"acc_{q},none"] == pytest.approx(good[docs["qtype"] == q].mean()), q
    assert len(seen) == limit and seen[0][1][0].size == (96, 96)
