"""Tests for the smoke model: build, prompt format, training splice, a scaled-down retrain, the committed checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from benchmarks.smoke_model import build, train
from benchmarks.tasks.synthetic import generate as g
from benchmarks.tasks.synthetic import scenes
from benchmarks.tasks.synthetic.tasks.utils import doc_to_text
from tests.conftest import interrupted_on_call

pytestmark = pytest.mark.slow  # the smoke model's trainer, resumed and retrained

CHECKPOINT = Path(build.__file__).resolve().parent / "checkpoint"
EXPECTED_PROMPT = (
    "USER: <image>\nWhat color is the circle?\nAnswer the question using a single word or phrase. ASSISTANT:"
)


def test_prompt_and_tokenizer() -> None:
    proc = build.build_processor()
    assert build.chat_prompt(proc, doc_to_text({"question": "What color is the circle?"})) == EXPECTED_PROMPT
    plain = proc.apply_chat_template([{"role": "user", "content": "<image>\nhi"}], add_generation_prompt=True)
    assert plain == "USER: <image>\nhi ASSISTANT:"
    tok = proc.tokenizer
    assert tok.padding_side == "left" and tok.pad_token == "<pad>" and tok.eos_token == "</s>"
    for word in (*g.ANSWERS, *scenes.ANSWERS):
        ids = tok(" " + word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, word
        assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == word
    for i in range(40):  # every word of both tasks' questions is in the vocabulary
        for q in (g.generate_sample(g.SPLIT_SEEDS["val"], i).question,
                  scenes.generate_scene(scenes.SPLIT_SEEDS["val"], i).question):
            assert tok.unk_token_id not in tok(q).input_ids, q
    enc = proc(images=[Image.new("RGB", (96, 96))], text=[EXPECTED_PROMPT], return_tensors="pt")
    assert int((enc.input_ids == proc.image_token_id).sum()) == g.NUM_PATCHES
    assert enc.pixel_values.shape == (1, 3, 96, 96)


def test_training_splice_equals_hf_forward() -> None:
    """With all 144 tokens, the training path (cached features + right-padded splice, no attention mask) gives HF's
    own logits, for questions of different lengths (so that some rows are padded)."""
    torch.manual_seed(0)
    proc = build.build_processor()
    model = build.build_model(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=2,
                              text_heads=2, seed=1)
    samples = [g.generate_sample(g.SPLIT_SEEDS["val"], i) for i in range(2)]
    samples += [scenes.SYNTH_SCENES.sample(scenes.SYNTH_SCENES.seeds["val"], i) for i in range(2)]
    prompts = train.tokenize_prompts(proc, samples)
    assert len({len(s) for s in prompts.suffix}) > 1, "the rows should differ in length"
    feats = train.cache_features(model, torch.from_numpy(np.stack([s.image for s in samples])))
    emb, pos, tgt = train.splice_batch(model, prompts, [0, 1, 2, 3], feats.float(), proc.image_token_id,
                                       proc.tokenizer.pad_token_id)
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=emb, position_ids=pos).last_hidden_state
        ours = model.lm_head(hidden[torch.arange(4), tgt[:, 0]])  # (B, V) logits where the answer is predicted
        texts = [build.chat_prompt(proc, doc_to_text({"question": s.question})) for s in samples]
        inputs = proc(images=[Image.fromarray(s.image) for s in samples], text=texts, padding=True,
                      return_tensors="pt")
        hf = model(**inputs).logits[:, -1]  # (B, V), left-padded with a mask
    # fp16 feature cache -> small differences only
    torch.testing.assert_close(ours, hf, atol=2e-3, rtol=1e-3)
    lengths = [len(prompts.prefix) + 144 + len(prompts.suffix[i]) + 1 for i in range(4)]
    assert tgt.tolist() == [[n - 2, n - 1] for n in lengths]


def test_scene_background_label_is_the_generators() -> None:
    """Stage 1's background label for synth_scenes images (read from the pixels) is the tint the generator drew:
    checked on background questions, whose answer is that tint."""
    names = list(scenes.BACKGROUNDS)
    n = len(scenes.QTYPES)
    for i in range(scenes.QTYPES.index("background"), 80 * n, n):
        s = scenes.generate_scene(scenes.SPLIT_SEEDS["val"], i)
        assert s.qtype == "background" and names[train.background_of(s)] == s.answer, i


def test_training_pool_mixes_both_tasks() -> None:
    """The pool holds each task's samples with its labels; a subset keeps every field aligned."""
    pool = train.Pool.concat([train.make_pool(g.SYNTH_VQA, 6, g.SPLIT_SEEDS["train"]),
                              train.make_pool(scenes.SYNTH_SCENES, 6, scenes.SPLIT_SEEDS["train"])])
    assert len(pool.samples) == 12 and pool.images.shape[0] == 12
    assert (pool.background[:6] == train.IGNORE).all() and (pool.background[6:] >= 0).all()
    assert {s.qtype for s in pool.samples[6:]} == set(scenes.QTYPES)
    sub = pool.subset(torch.tensor([7, 0]))
    assert sub.samples == [pool.samples[7], pool.samples[0]]
    assert torch.equal(sub.relevant[0], pool.relevant[7]) and int(sub.background[1]) == train.IGNORE
    for i, s in enumerate(pool.samples):
        assert pool.relevant[i].nonzero().flatten().tolist() == s.relevant_patches


def test_tiny_retrain_loss_falls(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = replace(train.TrainConfig.tiny(), n_test=10)
    out = train.train(cfg, tmp_path / "ckpt")
    s1 = [r["loss"] for r in out["log"] if r["stage"] == 1]
    s2 = [r["loss"] for r in out["log"] if r["stage"] == 2]
    assert len(s1) == cfg.stage1_steps and len(s2) == cfg.stage2_steps
    assert sum(s1[-5:]) / 5 < 0.8 * sum(s1[:5]) / 5, s1
    assert sum(s2[-5:]) / 5 < 0.8 * sum(s2[:5]) / 5, s2
    assert any(r["k"] < g.NUM_PATCHES for r in out["log"] if r["stage"] == 2), "no batch dropped image tokens"
    assert (tmp_path / "ckpt" / "model.safetensors").exists() and (tmp_path / "ckpt" / "eval.json").exists()
    assert set(out["eval"]) == {"synth_vqa", "synth_scenes"}  # evaluated on both tasks' test splits
    assert set(out["eval"]["synth_scenes"]["full"]) == {"overall", *(f"acc_{q}" for q in scenes.QTYPES)}

    # --vision-from: stage 1 skipped, the first run's trained tower reused as it is (for LLM pilots)
    again = train.train(replace(cfg, vision_from=str(tmp_path / "ckpt"), stage2_steps=5), None)
    assert not [r for r in again["log"] if r["stage"] == 1]
    first = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ckpt", local_files_only=True)
    with pytest.raises(ValueError, match="another config"):
        train.load_vision(build.build_model(vision_hidden=16, vision_layers=2, vision_heads=2), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="not a llava-hf checkpoint"):
        train.load_vision(first, tmp_path)
    model = build.build_model(**cfg.model_kwargs, seed=7)
    train.load_vision(model, tmp_path / "ckpt")
    for a, b in zip(model.model.vision_tower.parameters(), first.model.vision_tower.parameters(), strict=True):
        assert torch.equal(a, b)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped in stage 2 after its snapshot at step 20, the rerun loads stage 1 as finished, resumes stage 2 at step
    20 and ends with exactly the weights of an uninterrupted run. A later stage's setting reuses the stages before
    it; an earlier one's starts afresh."""
    cfg = replace(train.TrainConfig.tiny(), n_test=4, n_monitor=0, save_every=20)
    whole = train.train(cfg, tmp_path / "whole", work_dir=tmp_path / "whole.work")
    reference = LlavaForConditionalGeneration.from_pretrained(tmp_path / "whole", local_files_only=True)

    real = interrupted_on_call(monkeypatch, train, "splice_batch", 31)  # stage 2 splices once per step; stage 1 not
    work = tmp_path / "run.work"
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, tmp_path / "run", work_dir=work)
    assert sorted(p.name.split("-")[0] for p in work.iterdir()) == ["stage1", "stage2"]  # done + snapshot
    monkeypatch.setattr(train, "splice_batch", real)
    resumed = train.train(cfg, tmp_path / "run", work_dir=work)
    assert [r["step"] for r in resumed["log"] if r["stage"] == 2] == list(range(cfg.stage2_steps))
    assert resumed["log"] == whole["log"]
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "run", local_files_only=True)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not list(work.glob("*.partial.pt")) and len(list(work.glob("stage*.pt"))) == 4

    keys = train.WorkFolder(None, cfg)
    later = train.WorkFolder(None, replace(cfg, stage4_steps=3))
    assert [keys.key(s) == later.key(s) for s in (1, 2, 3, 4)] == [True, True, True, False]
    earlier = train.WorkFolder(None, replace(cfg, lr_llm=1e-4))
    assert [keys.key(s) == earlier.key(s) for s in (1, 2, 3, 4)] == [True, False, False, False]
    assert train.WorkFolder(None, replace(cfg, n_test=99, eval_split="val")).key(4) == keys.key(4)


def test_committed_checkpoint_reloads_and_answers_both_tasks() -> None:
    """The committed smoke model: at most 20 MiB, the README's prompt, at least 8 LLM layers, and on 36 held-out
    questions per task well above its own answers without image tokens (1,000-question scores: MODEL_CARD.md)."""
    size = sum(f.stat().st_size for f in CHECKPOINT.iterdir() if f.is_file())
    assert size <= 20 * 2**20, f"checkpoint is {size / 2**20:.1f} MiB; the limit is 20"
    model = LlavaForConditionalGeneration.from_pretrained(CHECKPOINT, local_files_only=True)
    proc = AutoProcessor.from_pretrained(CHECKPOINT, local_files_only=True)
    assert build.chat_prompt(proc, doc_to_text({"question": "What color is the circle?"})) == EXPECTED_PROMPT
    assert proc.tokenizer.padding_side == "left"
    assert model.config.text_config.num_hidden_layers >= 8
    for task in ("synth_vqa", "synth_scenes"):
        samples = train.split_samples(task, "test", 36)
        full, blind = train.evaluate(model, proc, samples), train.evaluate(model, proc, samples, keep=0)
        assert full["overall"] >= 0.7 and full["overall"] > blind["overall"] + 0.2, (task, full, blind)


def test_the_model_cards_tables_are_its_eval_json() -> None:
    """The card's calibration and learnability tables are regenerated from eval.json (`--card`): they agree."""
    record = json.loads((CHECKPOINT / "eval.json").read_text())
    card = (CHECKPOINT / "MODEL_CARD.md").read_text()
    assert train.calibration_table(record) in card
    assert train.monitor_table(record) in card
    if record["config"]["vision_from"]:  # a copied tower: the record names the run that trained it, and its time counts
        source = record["vision_source"]
        assert source["command"] in card and source["stage1_s"] > 0
        assert train.training_minutes(record) == (record["time"]["total_s"] + source["stage1_s"]) / 60
    assert record["config"]["model_kwargs"]["text_layers"] >= 8


def test_bad_card_and_work_folders_are_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "eval.json").write_text("{bad")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "eval.json").write_text((CHECKPOINT / "eval.json").read_text())
    (tmp_path / "a_file").write_text("")
    cases = {("--card", str(tmp_path / "missing")): "no eval.json there",
             ("--card", str(tmp_path / "corrupt")): "JSONDecodeError",
             ("--card", str(tmp_path / "no_weights")): "not a checkpoint this script wrote (OSError",
             ("--tiny", "--work", str(tmp_path / "a_file")): "a file, not a folder",
             ("--tiny", "--text-hidden", "97"): "not a multiple of the LLM's 4 heads",
             ("--tiny", "--text-layers", "0"): "--text-layers 0: give a positive number"}
    for argv, phrase in cases.items():
        with pytest.raises(SystemExit) as e:
            train.main(list(argv))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and phrase in err[-1], (argv, err)
    assert sorted(p.name for p in (tmp_path / "no_weights").iterdir()) == ["eval.json"]  # no card written
