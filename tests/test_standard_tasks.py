"""lmms-eval's standard tasks on local dataset copies (`--task-data`), offline, on a tiny random checkpoint.

Each fixture is a few docs in the real schema of the task's Hub dataset (column names and feature types of
lmms-lab-encoder/{GQA,POPE,MME,textvqa,ScienceQA,MMBench}), with tiny generated images, written the way
docs/standard_tasks.md tells users to prepare them: `DatasetDict.save_to_disk` folders, or an `hf download`-like
snapshot (README `configs:` + parquet).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from types import SimpleNamespace

import PIL.Image
import pytest
import torch
from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value
from PIL import ImageDraw

import run_bench
from benchmarks.plan import RunSpec, fingerprint, run_conditions, short_hash, task_identity
from benchmarks.smoke_model.build import build_model, build_processor, vocabulary
from benchmarks.smoke_model.build_qwen import build_qwen_model, build_qwen_processor, qwen_vocabulary, save_qwen
from benchmarks.store import read_samples
from benchmarks.tasks.standard import TASKS, GqaImages, LocalCopy, parse_task_data

pytestmark = pytest.mark.slow  # local copies of the standard tasks through lmms-eval

COLORS = ["red", "green", "blue", "yellow"]
TASK_NAMES = ("gqa", "pope", "mme", "textvqa_val", "scienceqa_img", "mmbench_en_dev_static")


def image(i: int):
    """A tiny picture: a coloured square on grey, different per i, in one of three sizes (Qwen2.5-VL sees each at
    its own: 10, 12 or 14 x 8 patches)."""

    img = PIL.Image.new("RGB", (40 + 8 * (i % 3), 32), (128, 128, 128))
    ImageDraw.Draw(img).rectangle([4 + 3 * i, 4, 20 + 3 * i, 24], fill=COLORS[i % 4])
    return img


def dataset(rows: list[dict], features: dict):
    return Dataset.from_list(rows, features=Features(features))


def gqa_sets():
    """testdev_balanced_instructions (questions, by imageId) and testdev_balanced_images (id, image)."""
    s = Value("string")
    answers = ["yes", "no", "red", "green"]  # the yes-model gets doc 0 right: exact_match 0.25
    questions = dataset([
        {"id": f"20{i}", "imageId": f"n{i % 2}", "question": f"Is the square {i} red?" if i < 2 else
         f"What color is the square {i}?", "answer": answers[i], "fullAnswer": f"{answers[i]}.", "isBalanced": True,
         "groups": {"global": None, "local": f"10c-{i}"}, "entailed": "", "equivalent": f"20{i}",
         "types": {"structural": "query", "semantic": "attr", "detailed": "color"}, "semanticStr": "select: square"}
        for i in range(4)
    ], {"id": s, "imageId": s, "question": s, "answer": s, "fullAnswer": s, "isBalanced": Value("bool"),
        "groups": {"global": s, "local": s}, "entailed": s, "equivalent": s,
        "types": {"structural": s, "semantic": s, "detailed": s}, "semanticStr": s})
    images = dataset([{"id": f"n{i}", "image": image(i)} for i in (1, 0, 7)], {"id": s, "image": Image()})
    return questions, images


def pope_set():
    s = Value("string")
    return dataset([
        {"id": str(i), "question_id": str(i + 1), "question": f"Is there a {COLORS[i % 4]} square in the image?",
         "answer": "yes" if i % 2 == 0 else "no", "image_source": f"COCO_val2014_{i:012d}", "image": image(i),
         "category": "adversarial"} for i in range(6)
    ], {"id": s, "question_id": s, "question": s, "answer": s, "image_source": s, "image": Image(), "category": s})


def mme_set():
    """Two questions (a Yes and a No) per image, consecutive, as in MME; perception and cognition categories."""
    s = Value("string")
    rows = []
    for i, category in enumerate(["existence", "color", "commonsense_reasoning", "code_reasoning"]):
        for answer in ("Yes", "No"):
            rows.append({"question_id": f"{category}/{i:04d}.png", "image": image(i), "category": category,
                         "question": f"Is there a {COLORS[i] if answer == 'Yes' else 'purple'} square in this "
                                     "image? Please answer yes or no.", "answer": answer})
    return dataset(rows, {"question_id": s, "image": Image(), "question": s, "answer": s, "category": s})


def textvqa_set():
    s = Value("string")
    return dataset([
        {"image_id": f"{i:016x}", "question_id": 34602 + i, "question": "what color is the square?",
         "question_tokens": ["what", "color", "is", "the", "square"], "image": image(i), "image_width": 40,
         "image_height": 32, "flickr_original_url": "", "flickr_300k_url": "",
         "answers": ["yes"] * 10 if i == 0 else [COLORS[i]] * 7 + ["grey"] * 3,  # yes-model: exact_match 0.25
         "image_classes": ["Square"], "set_name": "val",
         "ocr_tokens": [COLORS[i]]} for i in range(4)
    ], {"image_id": s, "question_id": Value("int32"), "question": s, "question_tokens": Sequence(s),
        "image": Image(), "image_width": Value("int32"), "image_height": Value("int32"), "flickr_original_url": s,
        "flickr_300k_url": s, "answers": Sequence(s), "image_classes": Sequence(s), "set_name": s,
        "ocr_tokens": Sequence(s)})


def scienceqa_set():
    s = Value("string")
    return dataset([
        {"image": image(i), "question": "Which color is the square?", "choices": COLORS[: 2 + i % 3],
         "answer": i % 2, "hint": "" if i % 2 else "Look at the picture.", "task": "closed choice",
         "grade": "grade2", "subject": "natural science", "topic": "colors", "category": "Colors",
         "skill": "Identify colors", "lecture": "", "solution": ""} for i in range(4)
    ], {"image": Image(), "question": s, "choices": Sequence(s), "answer": Value("int8"), "hint": s, "task": s,
        "grade": s, "subject": s, "topic": s, "category": s, "skill": s, "lecture": s, "solution": s})


def mmbench_set():
    s = Value("string")
    return dataset([
        {"index": i, "question": "Is the square red?", "hint": "nan" if i % 2 else "A square is drawn.",
         "A": "yes", "B": "no", "C": "maybe", "D": "nan" if i % 2 else "unknown", "answer": "AABB"[i],  # score 50
         "category": "attribute_recognition", "image": image(i), "source": "synthetic",
         "L2-category": "finegrained_perception (instance-level)", "comment": "nan", "split": "dev"}
        for i in range(4)
    ], {"index": Value("int64"), "question": s, "hint": s, "A": s, "B": s, "C": s, "D": s, "answer": s,
        "category": s, "image": Image(), "source": s, "L2-category": s, "comment": s, "split": s})


SETS = {"pope": pope_set, "mme": mme_set, "textvqa_val": textvqa_set, "scienceqa_img": scienceqa_set,
        "mmbench_en_dev_static": mmbench_set}


def save_copies(root: Path) -> dict[str, Path]:
    """The six local copies as `save_to_disk` folders (gqa: one folder per config), as the docs prepare them."""
    paths = {}
    questions, images = gqa_sets()
    DatasetDict({"testdev": questions}).save_to_disk(root / "GQA" / "testdev_balanced_instructions")
    DatasetDict({"testdev": images}).save_to_disk(root / "GQA" / "testdev_balanced_images")
    paths["gqa"] = root / "GQA"
    for task, make in SETS.items():
        DatasetDict({TASKS[task].split: make()}).save_to_disk(root / task)
        paths[task] = root / task
    return paths


def snapshot_copies(root: Path) -> dict[str, Path]:
    """`hf download`-like snapshots: gqa with README `configs:` and a folder per config; pope with data/*.parquet
    and no README (the split comes from the file name)."""
    questions, images = gqa_sets()
    gqa = root / "GQA"
    for config, ds in (("testdev_balanced_instructions", questions), ("testdev_balanced_images", images)):
        (gqa / config).mkdir(parents=True)
        ds.to_parquet(gqa / config / "testdev-00000-of-00001.parquet")
    (gqa / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: testdev\n    path: {c}/testdev-*.parquet\n"
        for c in ("testdev_balanced_instructions", "testdev_balanced_images")) + "---\n")
    pope = root / "POPE"
    (pope / "data").mkdir(parents=True)
    pope_set().to_parquet(pope / "data" / "test-00000-of-00001.parquet")
    return {"gqa": gqa, "pope": pope}


def always_yes(model, vocab: list[str], last: str, end: str):
    """Make a tiny model answer "yes" then end, whatever it sees: the decoder layers add nothing to the residual
    stream, so the last hidden state is the last token's embedding, and the head maps the prompt's final token
    `last` (LLaVA's ":" of "ASSISTANT:", Qwen's "assistant" of its turn; the word-level tokenizers drop the newline)
    to "yes" and "yes" to `end`. Known answers make the tasks' metric values predictable."""
    ids = {t: i for i, t in enumerate(vocab)}
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.get_input_embeddings().weight, model.lm_head.weight
        basis = torch.eye(emb.shape[1])
        emb[ids[last]], emb[ids["yes"]] = 3 * basis[0], 3 * basis[1]
        head.zero_()
        head[ids["yes"]], head[ids[end]] = 10 * basis[0], 10 * basis[1]
    return model


@pytest.fixture(scope="module")
def yes_ckpt(tmp_path_factory):
    """A tiny llava-hf checkpoint (32 px images, 16 patches, 2+2 layers of width 32; random vision tower) that
    answers "yes" to everything."""
    path = tmp_path_factory.mktemp("tiny_llava")
    model = build_model(image_size=32, vision_hidden=32, vision_layers=2, text_hidden=32, text_layers=2, seed=1)
    always_yes(model, vocabulary(), ":", "</s>").save_pretrained(path)
    build_processor(image_size=32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen_yes_ckpt(tmp_path_factory):
    """A tiny Qwen2.5-VL checkpoint (its processor and prompt format; random vision tower) that answers "yes"."""
    model = always_yes(build_qwen_model(vision_hidden=32, text_hidden=32, text_layers=2, seed=1), qwen_vocabulary(),
                       "assistant", "<|im_end|>")
    return save_qwen(model, build_qwen_processor(), tmp_path_factory.mktemp("tiny_qwen"))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run from tmp_path with a private datasets cache, so nothing lands in the repository or ~/.cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path


def run(ckpt: Path, out: Path, tasks: dict[str, Path], *extra: str) -> dict[tuple[str, str], float]:
    data = [arg for t, p in tasks.items() for arg in ("--task-data", f"{t}={p}")]  # the option, repeated
    argv = ["--model", str(ckpt), "--methods", "full", "--output", str(out), "--batch-size", "8",
            "--tasks", *tasks, *data, *extra]
    assert run_bench.main(argv) == 0
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    return {(r["task"], r["metric"]): float(r["value"]) for r in csv.DictReader(open(out / "summary.csv"))}


# what lmms-eval's own scoring gives for a model that always answers "yes", on the fixtures above
EXPECTED = {
    ("gqa", "exact_match"): 0.25,
    ("pope", "pope_accuracy"): 0.5, ("pope", "pope_precision"): 0.5, ("pope", "pope_recall"): 1.0,
    ("pope", "pope_f1_score"): 2 / 3, ("pope", "pope_yes_ratio"): 0.5,
    # per category: acc 50 (the Yes of each pair) + acc+ 0 (never both); 2 categories of each kind
    ("mme", "mme_perception_score"): 100.0, ("mme", "mme_cognition_score"): 100.0,
    ("textvqa_val", "exact_match"): 0.25,  # VQA soft accuracy: 1 for the all-"yes" doc, 0 for the others
    ("scienceqa_img", "exact_match"): 0.0,  # "yes" is no option letter
    ("mmbench_en_dev_static", "gpt_eval_score"): 50.0,  # "yes" is option A's text: right on the two A docs
}


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_six_standard_tasks_on_save_to_disk_copies(family, request, in_tmp):
    """Each family with its own prompt format and processor (Qwen2.5-VL: each image at its own size)."""
    ckpt = request.getfixturevalue("yes_ckpt" if family == "llava" else "qwen_yes_ckpt")
    values = run(ckpt, in_tmp / "run", save_copies(in_tmp / "data"))
    grids = {tuple(s.get("image_grid_thw") or ()) for s in read_samples(in_tmp / "run")}
    assert grids == ({()} if family == "llava" else {(1, 8, 10), (1, 8, 12), (1, 8, 14)})
    assert {t for t, _ in values} == set(TASK_NAMES)
    for task in TASK_NAMES:  # each task's own metric names, as separate rows
        assert {m for t, m in values if t == task} == set(TASKS[task].metrics), task
    for (task, metric), v in values.items():  # valid ranges: MME's are acc + acc+ (0..200) summed over categories
        top = {"mme_perception_score": 10 * 200, "mme_cognition_score": 4 * 200, "gpt_eval_score": 100}
        assert 0 <= v <= top.get(metric, 1), (task, metric, v)
    assert values == pytest.approx(EXPECTED)
    assert (in_tmp / "run" / "submissions").is_dir() and not (in_tmp / "submissions").exists()


def test_snapshot_copies_and_gqa_image_join(yes_ckpt, in_tmp):
    out = in_tmp / "run"
    values = run(yes_ckpt, out, snapshot_copies(in_tmp / "data"), "--limit", "2")
    assert set(values) == {("gqa", "exact_match"), *(("pope", m) for m in TASKS["pope"].metrics)}
    assert values[("gqa", "exact_match")] == 0.5  # docs 0 (yes, right) and 1 (no), their images joined by imageId
    assert values[("pope", "pope_accuracy")] == 0.5
    samples = read_samples(out)
    assert len(samples) == 4 and {s["prediction"] for s in samples} == {"yes"}  # --limit 2 of each task


def test_mme_limit_keeps_pairs_and_reports_the_categories_it_reaches(yes_ckpt, in_tmp):
    DatasetDict({"test": mme_set()}).save_to_disk(in_tmp / "MME")
    values = run(yes_ckpt, in_tmp / "run", {"mme": in_tmp / "MME"}, "--limit", "4")
    assert values == {("mme", "mme_perception_score"): 100.0}  # the first 4 docs: two perception pairs only


def test_offline_without_a_local_copy_says_what_to_do(yes_ckpt, in_tmp, capsys):
    """lmms-eval retries the Hub load (~8 s) and raises a bare RetryError; the runner names the cause and the fix."""
    argv = ["--model", str(yes_ckpt), "--methods", "full", "--output", str(in_tmp / "run"), "--tasks", "pope"]
    assert run_bench.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: pope: ") and "OfflineModeIsEnabled" in err and "--task-data pope=PATH" in err


def test_gqa_join_reports_missing_images(tmp_path):
    questions, images = gqa_sets()
    DatasetDict({"testdev": questions}).save_to_disk(tmp_path / "GQA" / "testdev_balanced_instructions")
    DatasetDict({"testdev": images.select([0])}).save_to_disk(tmp_path / "GQA" / "testdev_balanced_images")
    join = GqaImages(LocalCopy.detect("gqa", tmp_path / "GQA"))
    with pytest.raises(ValueError, match=r"1 imageIds .* \(e\.g\. n0\)"):
        join.process_docs(questions)
    assert join.doc_to_visual({"imageId": "n1"})[0].size == image(1).size


def test_fingerprint_follows_the_data(tmp_path):
    """A --task-data copy is part of a cell's identity by content: another copy, or the same copy rewritten, is
    another cell; another task's copy is not."""
    for name, content in (("a", b"1"), ("b", b"2")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "test.parquet").write_bytes(content)
    tm = SimpleNamespace(task_index={"pope": {"yaml_path": None}, "gqa": {"yaml_path": None}})
    args = {"method": "full"}

    def fp(*task_data):
        spec = RunSpec(methods=("full",), tasks=("pope", "gqa"), task_data=task_data)
        return fingerprint(run_conditions(spec).key, args, short_hash(task_identity(tm, spec, "pope")))

    plain, a, b = fp(), fp(("pope", tmp_path / "a")), fp(("pope", tmp_path / "b"))
    assert len({plain, a, b}) == 3
    assert fp(("gqa", tmp_path / "a")) == plain  # another task's data does not move pope's cells
    (tmp_path / "a" / "test.parquet").write_bytes(b"3")
    assert fp(("pope", tmp_path / "a")) not in (a, b)


def test_bad_task_data(yes_ckpt, tmp_path, capsys, monkeypatch):
    copies = save_copies(tmp_path / "data")

    def error(*argv) -> str:
        capsys.readouterr()
        assert run_bench.main(["--model", str(yes_ckpt), "--methods", "full", "--dry-run", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        return err

    assert "not among --tasks" in error("--tasks", "pope", "--task-data", f"mme={copies['mme']}")
    assert "no such folder" in error("--tasks", "pope", "--task-data", f"pope={tmp_path / 'nope'}")
    assert "write TASK=PATH" in error("--tasks", "pope", "--task-data", str(copies["pope"]))
    assert "twice" in error("--tasks", "pope", "--task-data", f"pope={copies['pope']}", f"pope={copies['pope']}")
    assert "split 'test'" in error("--tasks", "pope", "--task-data", f"pope={copies['textvqa_val']}")
    assert "testdev_balanced_images" in error("--tasks", "gqa", "--task-data",
                                              f"gqa={copies['gqa'] / 'testdev_balanced_instructions'}")
    assert "even --limit" in error("--tasks", "mme", "--limit", "3", "--task-data", f"mme={copies['mme']}")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert "mmbench_en_dev_static" in error("--tasks", "mmbench_en_dev", "--task-data",
                                            f"mmbench_en_dev={copies['mmbench_en_dev_static']}")
    assert parse_task_data("pope=/data/POPE") == ("pope", Path("/data/POPE"))
