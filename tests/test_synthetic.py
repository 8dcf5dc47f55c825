"""Tests for the synthetic VQA benchmark and its lmms-eval task (CPU, no network)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import datasets
import pandas as pd
import pytest
import yaml
from lmms_eval import evaluator
from lmms_eval.api.model import lmms
from lmms_eval.tasks import TaskManager
from lmms_eval.utils import load_yaml_config

from benchmarks.plan import named_data_files
from benchmarks.tasks.synthetic import generate as g
from benchmarks.tasks.synthetic.tasks import utils as task_utils

TASKS_DIR = Path(g.__file__).resolve().parent / "tasks"


def _objects(record: dict) -> list[g.Obj]:
    return [g.Obj(**o) for o in json.loads(record["objects"])]


def _about(record: dict) -> list[g.Obj]:
    """Re-derive, from the question text alone, which objects the documented relevant_patches rule selects."""
    objs, words = _objects(record), record["question"].rstrip("?").split()
    color = next((w for w in words if w in g.COLOR_NAMES), None)
    shape = next((s for s in g.SHAPES if s in words or g.PLURALS[s] in words), None)
    if record["qtype"] == "exists" and record["answer"] == "no":
        return [o for o in objs if o.color == color or o.shape == shape]
    return [o for o in objs if (color is None or o.color == color) and (shape is None or o.shape == shape)]


def test_same_seed_same_records_and_prefix_stable() -> None:
    a, b = g.make_samples("test", 12, seed=5), g.make_samples("test", 12, seed=5)
    assert a == b
    assert g.make_samples("test", 4, seed=5) == a[:4]
    c = g.make_samples("test", 12, seed=6)
    assert [r["image"]["bytes"] for r in a] != [r["image"]["bytes"] for r in c]


def test_train_and_test_are_different_draws() -> None:
    assert g.SPLIT_SEEDS["train"] != g.SPLIT_SEEDS["test"]
    train = {r["image"]["bytes"] for r in g.make_samples("train", 30)}
    test = {r["image"]["bytes"] for r in g.make_samples("test", 30)}
    assert not train & test


def test_relevant_patches_hand_checked() -> None:
    # A square of half-side 0.82 * 5 = 4.1 px centred at (24, 20) covers pixels x 20..27, y 16..23:
    # patch columns 2-3 of patch row 2 -> indices 2 * 12 + 2 and 2 * 12 + 3.
    assert g.relevant_patches([g.Obj("square", "red", 24.0, 20.0, 5.0)]) == [26, 27]
    # A circle of radius 4 at (8, 8) covers pixels 4..11 on both axes: patches (0,0), (0,1), (1,0), (1,1).
    assert g.relevant_patches([g.Obj("circle", "blue", 8.0, 8.0, 4.0)]) == [0, 1, 12, 13]
    # The union is sorted, and an object in the last patch maps to index 143.
    both = g.relevant_patches([g.Obj("cross", "cyan", 92.0, 92.0, 3.0), g.Obj("circle", "blue", 8.0, 8.0, 4.0)])
    assert both == [0, 1, 12, 13, 143]


def test_records_follow_the_documented_rules() -> None:
    records = g.make_samples("test", 200)
    assert Counter(r["qtype"] for r in records) == {q: 40 for q in g.QTYPES}
    for r in records:
        objs, about = _objects(r), _about(r)
        assert 3 <= len(objs) <= 5 and r["answer"] in g.ANSWERS
        assert about, f"{r['id']}: no object is relevant to {r['question']!r}"
        assert r["relevant_patches"] == g.relevant_patches(about), r["id"]
        if r["qtype"] in ("color", "shape", "position"):
            assert len(about) == 1, f"{r['id']}: the named object must be unique"
        if r["qtype"] == "color":
            assert about[0].color == r["answer"]
        elif r["qtype"] == "shape":
            assert about[0].shape == r["answer"]
        elif r["qtype"] == "count":
            assert str(len(about)) == r["answer"]
        elif r["qtype"] == "position":
            x = about[0].x
            assert (x <= g.LEFT_MAX_X and r["answer"] == "left") or (x >= g.RIGHT_MIN_X and r["answer"] == "right")
        elif r["qtype"] == "exists":
            color, shape = r["question"].rstrip("?").split()[-2:]
            present = any(o.color == color and o.shape == shape for o in objs)
            assert present == (r["answer"] == "yes")
    for qtype, answers in {"exists": ("yes", "no"), "position": ("left", "right"), "count": ("1", "2", "3"),
                           "shape": g.SHAPES, "color": g.COLOR_NAMES}.items():
        counts = Counter(r["answer"] for r in records if r["qtype"] == qtype)
        assert set(counts) == set(answers) and max(counts.values()) - min(counts.values()) <= 1, (qtype, counts)


def test_write_split_roundtrip(tmp_path: Path) -> None:
    path = g.write_split(tmp_path / "s.parquet", "val", 6)
    ds = datasets.load_dataset("parquet", data_files={"test": str(path)}, split="test")
    doc = ds[3]
    assert doc["image"].size == (96, 96) and doc["image"].mode == "RGB"
    assert doc == {**doc, **{k: v for k, v in g.make_samples("val", 6)[3].items() if k != "image"}}


def test_ensure_test_data_rewrites_stale_files(tmp_path: Path) -> None:
    path = g.write_split(tmp_path / "test.parquet", "test", 5, seed=99)  # e.g. left over from an older version
    assert g.ensure_test_data(path, n=5) == path
    fresh = [r["question"] for r in g.make_samples("test", 5)]
    assert pd.read_parquet(path)["question"].tolist() == fresh
    stamp = path.stat().st_mtime_ns
    g.ensure_test_data(path, n=5)
    assert path.stat().st_mtime_ns == stamp, "an up-to-date file must not be rewritten"


def test_task_data_lives_in_a_cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The XDG convention (as HF_HOME's default), our own variable first; lmms-eval's loader and the runner's cell
    identity both read each synthetic task's data there, written on first use, never inside the package."""
    monkeypatch.delenv(g.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert g.data_dir() == tmp_path / "xdg" / "token-reduction-bench" / "synthetic"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert g.data_dir() == tmp_path / "home" / ".cache" / "token-reduction-bench" / "synthetic"
    monkeypatch.setenv(g.CACHE_ENV, str(tmp_path / "mine"))
    monkeypatch.setattr(g, "DEFAULT_TEST_N", 6)  # a short split, written faster
    assert g.SYNTH_VQA.test_file == tmp_path / "mine" / "synthetic" / "test.parquet"

    yamls = sorted(TASKS_DIR.glob("*.yaml"))
    for task_yaml in yamls:  # what lmms-eval reads: the cache file, written while its loader runs the utils file
        test = load_yaml_config(str(task_yaml))["dataset_kwargs"]["data_files"]["test"]
        assert Path(test).parent == tmp_path / "mine" / "synthetic" and Path(test).is_file(), task_yaml.name
        assert named_data_files(task_yaml) == [Path(test)]  # and what a cell's identity hashes
    assert len(list((tmp_path / "mine" / "synthetic").iterdir())) == len(yamls)


def _dummy_lmms(seen: list) -> object:
    """A dummy lmms-eval model (built here so that importing this module does not import lmms-eval)."""
    class Dummy(lmms):
        """Answers correctly for colour questions and every third doc, else 'wrong'."""

        is_simple = True

        def generate_until(self, requests: list) -> list[str]:
            out = []
            for req in requests:
                ctx, _gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                doc = self.task_dict[task][split][doc_id]
                seen.append((ctx, doc_to_visual(doc)))
                good = doc["qtype"] == "color" or doc_id % 3 == 0
                out.append(f" {doc['answer'].upper()}." if good else "wrong")
            return out

        def loglikelihood(self, requests: list) -> list:
            raise NotImplementedError

        def generate_until_multi_round(self, requests: list) -> list:
            raise NotImplementedError

        def clean(self) -> None:  # lmms-eval 0.7.3 deletes modules here; nothing to free
            pass

    return Dummy()


def test_lmms_eval_task_scores_per_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = g.ensure_test_data()

    text = (TASKS_DIR / "synth_vqa.yaml").read_text()
    cfg = yaml.safe_load("\n".join(line for line in text.splitlines() if "!function" not in line))
    assert cfg["lmms_eval_specific_kwargs"]["default"]["post_prompt"] == task_utils.POST_PROMPT

    limit, seen = 25, []
    tm = TaskManager(include_defaults=False, include_path=[str(TASKS_DIR)])
    res = evaluator.simple_evaluate(model=_dummy_lmms(seen), tasks=["synth_vqa"], task_manager=tm, limit=limit,
                                    bootstrap_iters=0, datetime_str=f"test-{os.getpid()}")
    docs = pd.read_parquet(data).head(limit)
    good = (docs["qtype"] == "color") | (docs["doc_id"] % 3 == 0)
    got = res["results"]["synth_vqa"]
    assert got["exact_match,none"] == pytest.approx(good.mean())
    for q in g.QTYPES:
        assert got[f"acc_{q},none"] == pytest.approx(good[docs["qtype"] == q].mean()), q
    assert len(seen) == limit
    ctx, visuals = seen[0]
    assert ctx == task_utils.doc_to_text({"question": docs["question"][0]})
    assert visuals[0].size == (96, 96) and visuals[0].mode == "RGB"
