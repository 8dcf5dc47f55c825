"""Qwen2.5-VL through the harness (issue 18): a local checkpoint folder chosen from its config by run_bench.py and
the lmms-eval model class, its own prompt format, budgets as fractions of each image's tokens, the FLOPs of every
sample, and predictions identical to Hugging Face's own generate on the same processor inputs."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import run_bench
from benchmarks.defaults import DEFAULT_OUTPUT, QWEN_SMOKE_MODEL, SMOKE_MODEL, default_output
from benchmarks.lmms_model import ReducedLMM
from benchmarks.plan import RunSpec, make_plan
from benchmarks.smoke_model import train_qwen as tq
from benchmarks.smoke_model.build_qwen import build_qwen_model, build_qwen_processor
from benchmarks.smoke_model.train_qwen import (
    QWEN_SMOKE_ARCH,
    QwenTrainConfig,
    merged_tokens,
    patchify,
    splice,
    tokenize,
    train,
)
from benchmarks.store import read_samples
from benchmarks.tasks.synthetic.generate import SYNTH_VQA
from benchmarks.tasks.synthetic.tasks.utils import doc_to_text
from methods import create_reducer
from methods.adaptive import ControllerConfig
from methods.families import LLAVA, QWEN, family_of
from methods.qwen import QWEN_TURN, ReducedQwen, fraction_counts, qwen_prompt
from tests.conftest import hf_answers, interrupted_on_call, qwen_prompts, tiny_qwen

pytestmark = pytest.mark.slow  # sweeps and training runs on Qwen2.5-VL folders


def test_fraction_budgets_are_per_image():
    """A fraction keeps floor(f x tokens) of each image, at least 1: 16 and 15 tokens at 0.25 keep 4 and 3, before
    the LLM (divprune) and inside it (fastv, from layer 1 on)."""
    model = tiny_qwen(seed=3, llm_layers=3)
    ids, mask, pixels, grid = qwen_prompts(model, [(1, 8, 8), (1, 6, 10)], seed=4)
    assert fraction_counts(0.25, torch.tensor([16, 15, 2])).tolist() == [4, 3, 1]
    divprune = ReducedQwen(model, create_reducer("divprune", 0.25)).prefill(ids, mask, pixels, grid).trace
    assert divprune.visual_tokens.tolist() == [[4, 4, 4], [3, 3, 3]]
    fastv = ReducedQwen(model, create_reducer("fastv", 0.5, layer=1)).prefill(ids, mask, pixels, grid).trace
    assert fastv.visual_tokens.tolist() == [[16, 8, 8], [15, 7, 7]]
    one = ReducedQwen(model, create_reducer("fastv", 0.5, layer=1)).prefill(ids[1:], mask[1:], pixels[64:], grid[1:])
    assert one.trace.visual_tokens.tolist() == [[15, 7, 7]]  # the same count alone as in the batch


def test_families_come_from_the_config(qwen_ckpt, tiny_ckpt):
    spec = RunSpec(model=qwen_ckpt, methods=("full", "divprune", "prumerge"), tasks=("synth_vqa",))
    with pytest.raises(NotImplementedError,
                       match="prumerge does not run on Qwen2.5-VL: it needs cls_attn and keys, which require a"):
        make_plan(spec)
    with pytest.raises(NotImplementedError,
                       match="adaptive_a does not run on Qwen2.5-VL: it appends tokens to the vision encoder"):
        make_plan(RunSpec(model=qwen_ckpt, methods=("adaptive_a",), tasks=("synth_vqa",)))
    llava_controller = create_reducer("adaptive_b", 4, config=ControllerConfig("adaptive_b", dim=64, num_patches=144))
    with pytest.raises(ValueError, match="trained for 144 patches of width 64, the model gives images of any size"):
        QWEN.check_reducer(llava_controller, QWEN.layout(QWEN.load(qwen_ckpt)[0].config))
    notes = make_plan(RunSpec(model=qwen_ckpt, tasks=("synth_vqa",))).notes  # the default set says what it leaves out
    assert any(n.startswith("adaptive_b skipped: no trained controller in ") and "train_adaptive" in n for n in notes)
    assert any(n.startswith("adaptive_a skipped: adaptive_a does not run on Qwen2.5-VL") for n in notes)
    assert default_output(QWEN_SMOKE_MODEL).name == "smoke_qwen" and default_output(qwen_ckpt).name == qwen_ckpt.name
    assert default_output(SMOKE_MODEL) == DEFAULT_OUTPUT
    plan = make_plan(RunSpec(model=qwen_ckpt, methods=("full", "divprune"), tasks=("synth_vqa",)))
    assert plan.family is QWEN and plan.num_patches is None
    assert [(c.method, str(c.budget)) for c in plan.cells] == [("full", "1.0"), ("divprune", "0.111"),
                                                               ("divprune", "0.25"), ("divprune", "0.333")]
    assert [r.fraction for r in plan.reducers] == [None, 1 / 9, 0.25, 1 / 3]  # the shares exactly: 16, 36, 48 of 144
    llava = make_plan(RunSpec(model=tiny_ckpt, methods=("divprune",), budgets=(0.25,), tasks=("synth_vqa",)))
    assert llava.family is LLAVA
    assert [(str(c.budget), r.budget) for c, r in zip(llava.cells, llava.reducers, strict=True)] == [("0.25", 36)]
    with pytest.raises(ValueError, match="not a model family this harness runs; it runs LLaVA-1.5 .'llava'., "):
        family_of(type("C", (), {"model_type": "idefics3"})())


def test_prompt_is_qwens(qwen_ckpt):
    lm = ReducedLMM(pretrained=str(qwen_ckpt), method="full")
    text = "<image>\nWhat colour is the circle?"
    assert lm.build_prompt(text) == qwen_prompt(lm.processor, text) == QWEN_TURN.format(
        text="What colour is the circle?")
    assert qwen_prompt(None, "hi") == QWEN_TURN.format(text="hi")  # no template: the same turn, written out


def test_run_bench_on_a_qwen_folder(qwen_ckpt, tmp_path):
    """The sweep on a Qwen2.5-VL folder: fraction and count budgets, realised counts and image grids per sample, the
    FLOPs of each, and `full`'s predictions equal to Hugging Face's generate on the same processor inputs."""
    out = tmp_path / "run"
    argv = ["--model", str(qwen_ckpt), "--methods", "full", "divprune", "fastv", "--budgets", "0.25", "16",
            "--limit", "6", "--batch-size", "4", "--output", str(out), "--method-args", "fastv.layer=1"]
    assert run_bench.main(argv) == 0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert {(r["method"], r["budget"]) for r in rows} == {("full", "1.0"), ("divprune", "0.25"), ("divprune", "16"),
                                                         ("fastv", "0.25"), ("fastv", "16")}
    samples = read_samples(out)
    by = {(s["method"], str(s["budget"])): s for s in samples if s["doc_id"] == 0}
    assert by["full", "1.0"]["image_grid_thw"] == [1, 24, 24] and by["full", "1.0"]["visual_tokens"] == 144
    assert by["divprune", "0.25"]["visual_tokens"] == 36 and by["divprune", "16"]["visual_tokens"] == 16
    assert by["fastv", "0.25"]["visual_tokens_per_layer"] == [144, 36, 36]
    assert by["divprune", "0.25"]["prefill_gflops"] < by["full", "1.0"]["prefill_gflops"]
    full = by["full", "1.0"]  # KV cache: 3 layers x (prompt + generated - 1) x K and V x 2 heads of 16 x float32
    assert full["kv_cache_mb"] == round(3 * (full["llm_tokens_per_layer"][0] + full["generated_tokens"] - 1)
                                        * 2 * 32 * 4 / 2**20, 4)
    assert by["divprune", "0.25"]["kv_cache_mb"] < full["kv_cache_mb"]
    assert all(float(r["kv_cache_mb_mean"]) > 0 for r in rows)
    # full's predictions are Hugging Face's own
    ours = {s["doc_id"]: s["prediction"] for s in samples if s["method"] == "full"}
    assert [ours[i] for i in range(6)] == hf_answers(QWEN, qwen_ckpt, 6)


def test_trainer_inputs_are_the_processors_and_get_rope_index():
    """The trainer's own patchify equals Qwen's image processor, its merged tokens the model's own vision output, and
    its M-RoPE positions `get_rope_index`'s on the evaluation prompt; a dropped token's neighbours keep theirs."""
    processor, model = build_qwen_processor(), build_qwen_model(**QWEN_SMOKE_ARCH)
    samples = [SYNTH_VQA.sample(1, i) for i in range(3)]
    images = torch.from_numpy(np.stack([s.image for s in samples]))
    ref = processor.image_processor([Image.fromarray(s.image) for s in samples], return_tensors="pt")
    assert torch.allclose(patchify(images, 4, 2), ref["pixel_values"], atol=1e-6)
    with torch.no_grad():
        feats = merged_tokens(model, images)  # (3, 144, D)
        own = model.model.visual(ref["pixel_values"], grid_thw=ref["image_grid_thw"]).pooler_output
        assert torch.allclose(feats.flatten(0, 1), own, atol=1e-5)
        prompts = tokenize(processor, samples)
        _, pos, targets = splice(model, prompts, [0, 1, 2], feats, None, processor.tokenizer.pad_token_id)
        kept = torch.tensor([[0, 13, 143]] * 3)
        _, pos_kept, _ = splice(model, prompts, [0, 1, 2], feats[:, kept[0]], kept, processor.tokenizer.pad_token_id)
    texts = [qwen_prompt(processor, doc_to_text({"question": s.question})) for s in samples]
    inputs = processor(images=[Image.fromarray(s.image) for s in samples], text=texts, return_tensors="pt",
                       padding=True, padding_side="right")
    ids = inputs["input_ids"]
    hf, _ = model.model.get_rope_index(ids, (ids == model.config.image_token_id).int(),
                                       image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    p = len(prompts.prefix)
    for j in range(3):
        n = int(inputs["attention_mask"][j].sum())
        assert torch.equal(pos[:, j, :n], hf[:, j, :n]) and targets[j, 0] == n - 1  # the last prompt token
        assert torch.equal(pos_kept[:, j, p:p + 3], hf[:, j, p + kept[j]])  # the kept tokens' own positions
        assert torch.equal(pos_kept[:, j, p + 3:n - 141], hf[:, j, p + 144:n])  # the text after the image


def test_trainer_tiny_run_writes_a_checkpoint_the_harness_runs(tmp_path):
    res = train(QwenTrainConfig.tiny(), tmp_path / "ckpt", command="tiny")
    assert set(res["results"]) == {"full", "random_16"} and 0 <= res["results"]["full"]["overall"] <= 1
    assert {r["stage"] for r in res["log"]} == {1, 2, 3, 4}
    card = (tmp_path / "ckpt" / "MODEL_CARD.md").read_text()
    assert "## Held-out accuracy" in card and "| full |" in card
    plan = make_plan(RunSpec(model=tmp_path / "ckpt", methods=("full", "random"), tasks=("synth_vqa",)))
    assert plan.family is QWEN


def test_trainer_resumes_an_interrupted_run_to_the_same_weights(tmp_path, monkeypatch):
    """Stopped in stage 2 after its snapshot at step 10, a rerun loads stage 1 as finished, resumes stage 2 at step
    10 and ends with the log and weights of an uninterrupted run; a stage-3 setting keeps stages 1-2's keys."""
    cfg = QwenTrainConfig.tiny()
    whole = train(cfg, tmp_path / "whole", work_dir=tmp_path / "whole.work")
    real = interrupted_on_call(monkeypatch, tq, "splice", 13)  # the LLM stages splice once per step; stage 1 not
    work = tmp_path / "run.work"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", work_dir=work)
    assert sorted(p.name.split("-")[0] for p in work.iterdir()) == ["stage1", "stage2"]  # done + snapshot
    monkeypatch.setattr(tq, "splice", real)
    resumed = train(cfg, tmp_path / "run", work_dir=work)
    assert resumed["log"] == whole["log"]
    for (name, a), b in zip(resumed["model"].state_dict().items(), whole["model"].state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not list(work.glob("*.partial.pt")) and len(list(work.glob("stage*.pt"))) == 4
    keys = [tq.WorkFolder(None, c).key(s) for c in (cfg, replace(cfg, stage3_steps=3)) for s in (1, 2, 3)]
    assert keys[:2] == keys[3:5] and keys[2] != keys[5]


def test_controllers_train_and_run_on_qwen(qwen_ckpt, tmp_path, capsys):
    """`benchmarks.tools.train_adaptive` on a Qwen2.5-VL folder, with images of two sizes in each batch: each batch's
    budget is one share of every image's own tokens; the saved controller serves any image size (at the merger's width),
    keeps exactly floor(f x tokens) of each image through the adapter and runs through run_bench.py; adaptive_a is
    refused in one line before any step."""
    from benchmarks.tools import train_adaptive  # noqa: PLC0415

    records = []
    for i, size in enumerate([(96, 96), (64, 80), (96, 96), (64, 80)]):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        records.append({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    common = ["--model", str(qwen_ckpt), "--data", str(tmp_path / "data.json"), "--batch-size", "4",
              "--device", "cpu", "--budget-range", "0.2", "0.5"]
    for estimator, steps in (("reinforce", 2), ("straight_through", 1)):
        out = tmp_path / estimator
        assert train_adaptive.main([*common, "--method", "adaptive_b", "--out", str(out), "--steps", str(steps),
                                    "--estimator", estimator]) == 0, capsys.readouterr().err
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        assert len(log) == steps and all(0.2 <= r["budget"] <= 0.5 and r["lm_loss"] > 0 for r in log)
    controller = create_reducer("adaptive_b", 0.25, checkpoint=tmp_path / "reinforce").eval()
    assert (controller.config.num_patches, controller.config.dim) == (None, 64)
    model, processor = QWEN.load(qwen_ckpt, device="cpu", dtype="float32")
    images = [Image.open(tmp_path / f"{i}.png") for i in range(2)]
    inputs = processor(images=images, text=[qwen_prompt(processor, "What?")] * 2, padding=True, return_tensors="pt")
    trace = ReducedQwen(model, controller).prefill(*(inputs[k] for k in QWEN.inputs)).trace
    assert trace.visual_tokens[:, 0].tolist() == [36, 20]  # 144 and 80 tokens at 0.25
    assert train_adaptive.main([*common, "--method", "adaptive_q", "--out", str(tmp_path / "q"), "--steps", "1"]) == 0
    question = create_reducer("adaptive_q", 0.25, checkpoint=tmp_path / "q").eval()  # reads the LLM's embeddings
    assert (question.config.num_patches, question.config.dim, question.config.text_dim) == (None, 64, 64)
    trace = ReducedQwen(model, question).prefill(*(inputs[k] for k in QWEN.inputs)).trace
    assert trace.visual_tokens[:, 0].tolist() == [36, 20]
    capsys.readouterr()
    assert train_adaptive.main([*common, "--method", "adaptive_a", "--out", str(tmp_path / "a"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: adaptive_a does not run on Qwen2.5-VL") and "\n" not in err
    assert not (tmp_path / "a" / "train_log.jsonl").exists()
    out = tmp_path / "run"
    assert run_bench.main(["--model", str(qwen_ckpt), "--methods", "adaptive_b", "--budgets", "0.25", "--limit", "2",
                           "--output", str(out), "--method-args",
                           f"adaptive_b.checkpoint={tmp_path / 'reinforce'}"]) == 0
    samples = read_samples(out)
    assert [s["visual_tokens"] for s in samples] == [36, 36]
