"""A llava-hf checkpoint with LLaVA-1.5-7B's real shapes, run by the runner with every registered method.

The checkpoint is `flops/configs/llava-1.5-7b.json` (4096-wide LLM with 32 heads and 11008-wide MLP, 1024-wide CLIP
at 336 px with 14 px patches: 576 patches) with only the depth cut (2 vision layers: LLaVA reads layer -2; 2 LLM
layers: FastV needs a layer below its cut) and the vocabulary replaced by the smoke model's small local tokenizer
(no Hub access; vocab_size is not a width). Random weights, saved in bfloat16 (0.8 GB instead of 1.6 GB) and
loaded as float32 on the CPU, with llava-1.5's processor (CLIP image processor: shortest edge 336, centre crop
336, CLIP mean/std) and chat template. The learned methods get untrained controllers saved into
MODEL/controllers/<method>, where the runner finds them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from benchmarks.lmms_model import ReducedLMM
from benchmarks.plan import RunSpec, make_plan
from benchmarks.runner import run
from benchmarks.smoke_model.build import IMAGE_TOKEN, build_processor
from benchmarks.store import read_samples
from benchmarks.tasks.manager import task_manager
from benchmarks.tasks.synthetic.generate import SPLIT_SEEDS, generate_sample
from benchmarks.tasks.synthetic.tasks.utils import doc_to_text
from flops.shapes import load_config, stand_in_reducer
from methods import get_reducer_class, list_reducers
from methods.llava import complete_processor, llava_prompt

pytestmark = pytest.mark.slow  # every test here builds LLaVA-1.5-7B- or Qwen2.5-VL-7B-shaped models

BUDGET = 64
PATCHES = 576
POST_PROMPT = "\nAnswer the question using a single word or phrase."


def build_llava15_7b_shaped(path: Path, vision_layers: int = 2, llm_layers: int = 2, seed: int = 0) -> Path:
    """Write a random-weight llava-hf checkpoint with LLaVA-1.5-7B's widths and geometry to `path`."""

    processor = build_processor(image_size=336, patch_size=14)  # llava-1.5's CLIP processor settings
    tok = processor.tokenizer
    config = load_config("llava-1.5-7b")
    config.vision_config.num_hidden_layers = vision_layers
    text = config.text_config
    text.num_hidden_layers = llm_layers
    text.vocab_size = len(tok)
    text.bos_token_id, text.eos_token_id, text.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    config.image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    gen.do_sample = False
    model.save_pretrained(path)
    processor.save_pretrained(path)
    for method in list_reducers():
        if get_reducer_class(method).needs_checkpoint:
            stand_in_reducer(method, BUDGET, config).save(path / "controllers" / method)  # untrained controller
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_llava15_7b_shaped(tmp_path_factory.mktemp("llava15_7b_shaped"))


def test_checkpoint_keeps_the_real_widths_and_geometry(checkpoint):
    real, saved = load_config("llava-1.5-7b"), load_config(checkpoint)
    for part in ("vision_config", "text_config"):
        for key in ("hidden_size", "intermediate_size", "num_attention_heads"):
            assert getattr(getattr(saved, part), key) == getattr(getattr(real, part), key), (part, key)
    assert saved.text_config.num_key_value_heads == real.text_config.num_key_value_heads
    assert (saved.vision_config.image_size, saved.vision_config.patch_size) == (336, 14)
    assert saved.vision_feature_layer == -2 and saved.vision_feature_select_strategy == "default"
    assert json.loads((checkpoint / "config.json").read_text())["dtype"] == "bfloat16"


def test_processor_without_patch_size_is_completed_from_the_config(checkpoint):
    """Older llava-hf snapshots save no patch_size: the loader fills it in from the model config."""


    processor = AutoProcessor.from_pretrained(checkpoint, local_files_only=True)
    processor.patch_size = None
    processor.num_additional_image_tokens = 0
    config = load_config(checkpoint)
    complete_processor(processor, config)
    inputs = processor(images=[Image.new("RGB", (96, 96))], text=["USER: <image>\nhi ASSISTANT:"], return_tensors="pt")
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == PATCHES
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 336, 336)
    processor.num_additional_image_tokens = 0
    with pytest.raises(ValueError, match="575 tokens but the model has 576 patches"):
        complete_processor(processor, config)


def test_every_method_on_llava15_7b_shapes(checkpoint, tmp_path):
    """Every registered method runs through the runner at 64 of 576 visual tokens; `full` equals HF generate."""

    lm = ReducedLMM(pretrained=str(checkpoint), batch_size=2, device="cpu", dtype="float32")
    assert lm.model.dtype == torch.float32 and lm.runner.layout.num_patches == PATCHES
    out = tmp_path / "run"
    spec = RunSpec(model=checkpoint, budgets=(BUDGET,), limit=2, batch_size=2, output=out, device="cpu",
                   dtype="float32", method_kwargs=(("fastv", "layer", 1), ("dart", "layer", 1),
                                                   ("sparsevlm", "counts", (BUDGET,)), ("sparsevlm", "layers", (1,))))
    assert set(spec.methods) == set(list_reducers())  # the learned methods found their controllers
    rows = run(spec, make_plan(spec), task_manager(spec.tasks), lm, progress=False)

    cells = {(r["method"], r["budget"]) for r in rows}
    fixed = {"full": PATCHES, "sparsevlm": f"counts={BUDGET}"}  # SparseVLM: one stage (2 layers) keeping 64
    assert cells == {(m, fixed.get(m, BUDGET)) for m in list_reducers()}
    assert all(r["n"] == 2 for r in rows if r["metric"] == "exact_match")
    samples = read_samples(out )
    assert sorted({s["method"] for s in samples}) == list_reducers() and len(samples) == 2 * len(list_reducers())
    for s in samples:
        per_layer = s["visual_tokens_per_layer"]
        if s["method"] == "full":
            assert per_layer == [PATCHES, PATCHES] and s["kept_indices"] is None
        elif s["method"] == "pdrop":  # PyramidDrop: the budget is the layer mean
            assert sum(per_layer) / len(per_layer) <= BUDGET and per_layer == sorted(per_layer, reverse=True)
        elif get_reducer_class(s["method"]).site.value == "llm":  # every token below its layer
            # DART: 4 pivots + 7 x 8 = 60; SparseVLM: 64 + int((int(0.3 x 512) + 1) / 10) + 1 = 16 merged
            kept = {"dart": 4 + (BUDGET - 4) // 8 * 8, "sparsevlm": BUDGET + 16}.get(s["method"], BUDGET)
            assert per_layer == [PATCHES, kept], s["method"]
        else:  # pre-LLM methods; at the embeddings site (DivPrune) every patch went through the projector first
            projected = PATCHES if get_reducer_class(s["method"]).site.value == "embeddings" else BUDGET
            assert per_layer == [BUDGET, BUDGET] and s["projector_tokens"] == projected, s["method"]
        assert s["prefill_gflops"] > 0 and s["llm_prefill_gflops"] > 0
    full_flops = next(r["prefill_gflops_mean"] for r in rows if r["method"] == "full")
    assert all(r["prefill_gflops_mean"] < full_flops for r in rows if r["method"] != "full")

    # the prompt lmms-eval's task produced is LLaVA-1.5's, and `full`'s answer is HF generate's on the same inputs
    sample = generate_sample(SPLIT_SEEDS["test"], 0)
    context = json.loads((out / "pictures" / "synth_vqa__0.json").read_text())["question"]  # as lmms-eval asked it
    assert context == doc_to_text({"question": sample.question}) == sample.question + POST_PROMPT
    prompt = llava_prompt(lm.processor, context)
    assert prompt == f"USER: <image>\n{context} ASSISTANT:"
    inputs = lm.processor(images=[Image.fromarray(sample.image)], text=[prompt], return_tensors="pt")
    assert int((inputs["input_ids"] == lm.model.config.image_token_id).sum()) == PATCHES
    tok = lm.processor.tokenizer
    with torch.no_grad():
        ref = lm.model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)
    hf_text = tok.decode(ref[0, inputs["input_ids"].size(1):], skip_special_tokens=True).strip()
    ours = next(s["prediction"] for s in samples if s["method"] == "full" and s["doc_id"] == 0)
    assert ours == hf_text and hf_text, (ours, hf_text)  # a random model's words, but the same ones


def float32_model_and_prompt(checkpoint: Path) -> tuple:
    """The 7B-shaped model in float32 and one test question's (input_ids, attention_mask, pixel_values)."""
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    complete_processor(processor, model.config)
    sample = generate_sample(SPLIT_SEEDS["test"], 0)
    prompt = llava_prompt(processor, doc_to_text({"question": sample.question}))
    inputs = processor(images=[Image.fromarray(sample.image)], text=[prompt], return_tensors="pt")
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    return model, (ids, mask, pixels)


def test_in_llm_methods_equal_their_reference_restatements_on_7b_shapes(checkpoint):
    """LLaVA-1.5-7B's widths, its 576 image tokens and its prompt: DART before layer 1 with the reference's 4 + 4
    pivots (budget 64: 4 + 8 x 7 = 60 kept; the pivots' set order over sequence indices up to ~600), PyramidDrop
    (one stage before layer 1 keeping half) and SparseVLM (one stage before layer 1 keeping 64, 16 merged) keep what
    the direct restatements of their reference code keep, with the same logits, and for the two that renumber the
    same logits after one decoding step."""
    from methods import create_reducer  # noqa: PLC0415
    from methods.llava import ReducedLlava  # noqa: PLC0415
    from tests.restate import matches_restatement  # noqa: PLC0415
    from tests.test_dart import _dart_restated  # noqa: PLC0415
    from tests.test_pdrop import _pdrop_restated  # noqa: PLC0415
    from tests.test_sparsevlm import _sparsevlm_restated  # noqa: PLC0415

    model, (ids, mask, pixels) = float32_model_and_prompt(checkpoint)

    dart = ReducedLlava(model, create_reducer("dart", BUDGET, layer=1)).prefill(ids, mask, pixels)
    assert dart.trace.sample(0, PATCHES)["kept_indices"] == _dart_restated(model, ids, pixels, 1, 4, 4, 7)
    for name in ("pdrop", "sparsevlm"):
        if name == "pdrop":
            red = ReducedLlava(model, create_reducer("pdrop", ratios=(0.5,), layers=(1,)))
            kept, logits, layer_inputs = _pdrop_restated(model, ids, pixels, (1,), (0.5,))
            per_layer = [PATCHES, PATCHES // 2]
        else:
            red = ReducedLlava(model, create_reducer("sparsevlm", counts=(BUDGET,), layers=(1,)))
            kept, per_layer, logits, layer_inputs = _sparsevlm_restated(model, ids, pixels, (1,), (BUDGET,))
            assert per_layer == [PATCHES, BUDGET + 16]
        state = red.prefill(ids, mask, pixels)
        assert state.trace.visual_tokens[0].tolist() == per_layer, name
        matches_restatement(red, state, PATCHES, kept, logits, layer_inputs, tol=2e-3)


def test_cdpruner_equals_the_reference_restatement_on_7b_shapes(checkpoint):
    """LLaVA-1.5-7B's widths, 576 image tokens and prompt: CDPruner at 64 keeps what the direct restatement of its
    reference code keeps over the projector's output of HF's own vision tower (layer -2, CLS dropped) and the LLM's
    embeddings of the prompt's tokens after the image."""
    from methods import create_reducer  # noqa: PLC0415
    from methods.llava import ReducedLlava  # noqa: PLC0415
    from tests.test_cdpruner import _cdpruner_restated  # noqa: PLC0415

    model, (ids, mask, pixels) = float32_model_and_prompt(checkpoint)
    with torch.no_grad():
        state = ReducedLlava(model, create_reducer("cdpruner", BUDGET)).prefill(ids, mask, pixels)
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        feats = model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 1:])[0]  # (576, 4096)
        after = ids[0][int((ids[0] == model.config.image_token_id).nonzero().max()) + 1 :]
        text = model.model.language_model.embed_tokens(after)
    assert state.trace.sample(0, PATCHES)["kept_indices"] == _cdpruner_restated(feats, feats, text, BUDGET)
