"""synth_scenes (benchmarks/synthetic/scenes.py): every design rule of its docstring holds on generated scenes, and
the lmms-eval task scores per type."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from lmms_eval import evaluator
from lmms_eval.tasks import TaskManager

from benchmarks.synthetic import generate as g
from benchmarks.synthetic import scenes as sc
from tests.test_synthetic import TASKS_DIR, _dummy_lmms

SCENES = [sc.generate_scene(sc.SPLIT_SEEDS["test"], i) for i in range(150)]


def test_deterministic_and_a_split_is_a_prefix():
    a = g.make_samples("test", 6, gen=sc.SYNTH_SCENES)
    assert a == g.make_samples("test", 6, gen=sc.SYNTH_SCENES)
    assert g.make_samples("test", 3, gen=sc.SYNTH_SCENES) == a[:3]
    assert a[0]["id"] == "scenes-test-000000"
    other = g.make_samples("test", 6, seed=99, gen=sc.SYNTH_SCENES)
    assert [r["image"]["bytes"] for r in a] != [r["image"]["bytes"] for r in other]


def test_scenes_hold_more_objects_than_a_ninth_of_the_patches():
    for s in SCENES:
        cells = [sc.cell_of(o) for o in s.objects]
        assert sc.TILES[0] <= len(cells) <= sc.TILES[1] and len(set(cells)) == len(cells)
        assert len(cells) > round(g.NUM_PATCHES / 9)  # 16 patches cannot keep every object


def test_answers_follow_from_the_scene():
    for s in SCENES:
        objs = s.objects
        if s.qtype == "count":
            color = s.question.split()[2]
            assert int(s.answer) == sum(o.color == color for o in objs) and 1 <= int(s.answer) <= sc.MAX_COUNT
            assert s.relevant_patches == sorted(sc.cell_of(o) for o in objs if o.color == color)
        elif s.qtype == "shape":
            color = s.question.split()[4]
            (obj,) = [o for o in objs if o.color == color]  # the colour is unique
            assert s.answer == obj.shape and s.relevant_patches == [sc.cell_of(obj)]
        elif s.qtype in ("left_right", "above_below"):
            words = s.question.rstrip("?").split()
            first, second = (words[2], words[3]), (words[-2], words[-1])
            (a,) = [o for o in objs if (o.color, o.shape) == first]  # both pairs unique
            (b,) = [o for o in objs if (o.color, o.shape) == second]
            axis = 1 if s.qtype == "left_right" else 0
            pa, pb = divmod(sc.cell_of(a), g.GRID)[axis], divmod(sc.cell_of(b), g.GRID)[axis]
            assert abs(pa - pb) >= sc.MIN_APART
            assert s.answer == (("left" if pa < pb else "right") if axis else ("above" if pa < pb else "below"))
            assert s.relevant_patches == sorted([sc.cell_of(a), sc.cell_of(b)])
        else:
            tiles = {sc.cell_of(o) for o in objs}
            assert s.relevant_patches == sorted(set(range(g.NUM_PATCHES)) - tiles)
            free = s.image.reshape(g.GRID, 8, g.GRID, 8, 3).transpose(0, 2, 1, 3, 4).reshape(g.NUM_PATCHES, 64, 3)
            mean = free[s.relevant_patches].reshape(-1, 3).mean(0)  # the background's colour, from its patches
            nearest = min(sc.BACKGROUNDS, key=lambda k: np.abs(mean - np.array(sc.BACKGROUNDS[k])).sum())
            assert s.answer == nearest


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
    good = (docs["qtype"] == "color") | (docs["doc_id"] % 3 == 0)  # the dummy's rule (no "color" type here)
    got = res["results"]["synth_scenes"]
    assert got["exact_match,none"] == pytest.approx(good.mean())
    for q in sc.QTYPES:
        assert got[f"acc_{q},none"] == pytest.approx(good[docs["qtype"] == q].mean()), q
    assert len(seen) == limit and seen[0][1][0].size == (96, 96)
