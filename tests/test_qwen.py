"""The Qwen2.5-VL adapter (issue 18, first step): `full` equals HF generate on a random Qwen2.5-VL, one image and a
left-padded batch of two images of different sizes."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from flops.analytic import count, model_shape
from flops.measured import flop_counter_macs
from flops.shapes import load_config
from methods import create_reducer, get_reducer_class, list_reducers
from methods.adaptive import ControllerConfig
from methods.families import QWEN
from methods.qwen import ReducedQwen, check_reducer
from methods.trace import QwenLayout
from tests.conftest import QWEN_IMAGE, qwen_prompts, tiny_qwen

QWEN_METHODS = [m for m in list_reducers() if QWEN.runs(m)]  # what its adapter provides for


@pytest.mark.parametrize("grids", [[(1, 8, 8)], [(1, 8, 8), (1, 6, 10)]], ids=["one", "two_sizes"])
def test_full_equals_hf_generate(grids):
    model = tiny_qwen(seed=len(grids))
    ids, mask, pixels, grid = qwen_prompts(model, grids, seed=3)
    gen = ReducedQwen(model, create_reducer("full")).generate(ids, mask, pixels, grid, max_new_tokens=6)
    ours, lengths = gen.tokens, gen.lengths
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                            mm_token_type_ids=(ids == QWEN_IMAGE).int(), max_new_tokens=6, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[:, ids.size(1):]
    assert ours.tolist() == hf.tolist()
    assert lengths.tolist() == [6] * len(grids)
    assert len({tuple(r) for r in ours.tolist()}) == len(grids) or len(grids) == 1  # the samples differ


def test_layout_and_refusals():
    model = tiny_qwen()
    lay = QwenLayout.from_config(model.config)
    assert lay.tokens(torch.tensor([[1, 8, 8], [1, 6, 10]])).tolist() == [16, 15]
    assert (lay.full_attention_blocks, lay.llm_layers, lay.width) == ((1,), 2, 64)
    with pytest.raises(NotImplementedError, match="does not run on Qwen2.5-VL: it needs cls_attn and keys, which "
                                                  "require a vision CLS token; these do: adaptive_b, adaptive_q, "
                                                  "budget_blind, cdpruner, dart, divprune, fastv, full, pdrop, "
                                                  "random, sparsevlm$"):
        ReducedQwen(model, create_reducer("prumerge", 4))  # needs a CLS token
    with pytest.raises(NotImplementedError,
                       match="adaptive_a does not run on Qwen2.5-VL: it appends tokens to the vision encoder"):
        check_reducer(create_reducer("adaptive_a", 4, config=ControllerConfig("adaptive_a", dim=64, num_patches=16)),
                      lay)
    with pytest.raises(ValueError, match=r"must be in \[1, 1\]"):
        ReducedQwen(model, create_reducer("fastv", 4))  # layer 2 of a 2-layer LLM
    for name in ("pdrop", "sparsevlm"):  # M-RoPE positions: the reference's renumbering is refused, its default runs
        with pytest.raises(ValueError, match=f"{name}.positions=renumber renumbers 1-D positions"):
            check_reducer(create_reducer(name, counts=(4,), layers=(1,), positions="renumber") if name == "sparsevlm"
                          else create_reducer(name, ratios=(0.5,), layers=(1,), positions="renumber"), lay)
        assert not ReducedQwen(model, create_reducer(name, **({"counts": (4,)} if name == "sparsevlm" else
                                                              {"ratios": (0.5,)}), layers=(1,)))._renumbers()
    ids, mask, pixels, grid = qwen_prompts(model, [(1, 8, 8)])
    with pytest.raises(ValueError, match="one image's run of image tokens"):
        ReducedQwen(model, create_reducer("full")).prefill(ids[:, 1:], mask[:, 1:], pixels, torch.tensor([[1, 8, 10]]))


@pytest.mark.slow
def test_full_equals_hf_generate_on_the_real_config():
    """Qwen2.5-VL-7B's real config (3584-wide GQA LLM with 28 / 4 heads, 1280-wide vision tower, the real token ids)
    cut to 2 vision blocks (one windowed, one full) and 2 LLM layers, random weights, float32: two images of
    different sizes in one left-padded batch; and the analytic FLOPs on this shape equal FlopCounterMode's."""
    config = load_config("qwen2.5-vl-7b")
    config.vision_config.depth, config.vision_config.fullatt_block_indexes = 2, [1]
    config.text_config.num_hidden_layers = 2
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32).eval()
    ids, mask, pixels, grid = qwen_prompts(model, [(1, 8, 8), (1, 6, 10)], seed=5)
    ours = ReducedQwen(model, create_reducer("full")).generate(ids, mask, pixels, grid, max_new_tokens=3).tokens
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                            mm_token_type_ids=(ids == config.image_token_id).int(), max_new_tokens=3,
                            do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.size(1):]
    assert ours.tolist() == hf.tolist()
    # the FLOPs counter on this shape: 20 x 12 patches = 10 x 6 tokens, 4 x 4-token windows clipped at both edges
    ids, mask, pixels, grid = qwen_prompts(model, [(1, 20, 12)], seed=6)
    for reducer in (create_reducer("full"), create_reducer("fastv", 16, layer=1), create_reducer("divprune", 16)):
        run = ReducedQwen(model, reducer)
        with torch.no_grad():
            measured, state = flop_counter_macs(lambda run=run: run.prefill(ids, mask, pixels, grid))
        assert count(state.trace.sample(0, 60), model_shape(config)).prefill == measured, reducer.name


def _fastv_restated(model, ids, pixels, grid, layer: int, keep: int):
    """FastV on Qwen2.5-VL for one prompt, from HF's own outputs: the last token's eager attention at layer K-1
    (heads averaged) ranks the image tokens; the top `keep` and every text token go on from layer K with their
    original M-RoPE positions (the model's get_rope_index). Returns the kept image-token indices and the logits."""
    from methods._ops import additive_mask  # noqa: PLC0415

    lm = model.model.language_model
    img = ids[0] == model.config.image_token_id
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=img[None].int(),
                    output_attentions=True, output_hidden_states=True)
        row = out.attentions[layer - 1][0, :, -1].mean(0)  # (T,)
        image = img.nonzero()[:, 0]
        top = row[image].topk(keep).indices.sort().values
        kept = torch.cat([(~img).nonzero()[:, 0], image[top]]).sort().values
        pos, _ = model.model.get_rope_index(ids, img[None].int(), image_grid_thw=grid)  # (3, 1, T)
        pos = pos[:, :, kept]
        h = out.hidden_states[layer][:, kept]  # the input of layer K, kept tokens only
        cos_sin = lm.rotary_emb(h, pos)
        mask = additive_mask(torch.ones(1, len(kept), dtype=torch.bool), len(kept), h.dtype)
        for dec in lm.layers[layer:]:
            h = dec(h, attention_mask=mask, position_embeddings=cos_sin)
        return top.tolist(), model.lm_head(lm.norm(h[:, -1]))[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_fastv_keeps_original_mrope_positions(seed):
    """FastV K=1 keeping 5 of 16 image tokens on a 3-layer Qwen2.5-VL: the same kept tokens and logits as the
    restatement from HF's eager attention maps and hidden states, with the survivors' original 3-D positions."""
    model = tiny_qwen(seed=seed, attn="eager", llm_layers=3)
    ids, mask, pixels, grid = qwen_prompts(model, [(1, 8, 8)], seed=seed + 2)
    state = ReducedQwen(model, create_reducer("fastv", 5, layer=1)).prefill(ids, mask, pixels, grid)
    kept, logits = _fastv_restated(model, ids, pixels, grid, 1, 5)
    assert state.trace.sample(0, 16)["kept_indices"] == kept
    assert state.trace.visual_tokens[0].tolist() == [16, 5, 5]
    torch.testing.assert_close(state.logits[0], logits, atol=1e-4, rtol=1e-4)


def qwen_reducer(method: str, budget: int, **kwargs):
    """`method` at `budget` for the tiny Qwen (learned ones: an untrained controller for its 64-wide tokens)."""
    if get_reducer_class(method).needs_checkpoint:
        text = 64 if "question" in get_reducer_class(method).needs else 0  # the LLM's width, for adaptive_q
        kwargs["config"] = ControllerConfig(method, dim=64, num_patches=None, text_dim=text)
    return create_reducer(method, budget, **kwargs).eval()


@pytest.mark.parametrize("method", QWEN_METHODS)
def test_batch_of_two_sizes_equals_each_alone(method):
    """Two images of different sizes (16 and 15 tokens) in one left-padded batch: each sample's answer and kept
    tokens are those it gets alone (PyramidDrop and SparseVLM schedule each image by its own token count)."""
    model = tiny_qwen(seed=4, llm_layers=3)
    ids, mask, pixels, grid = qwen_prompts(model, [(1, 8, 8), (1, 6, 10)], seed=6)
    kwargs = {"full": {}, "pdrop": {"ratios": (0.5, 0.25), "layers": (1, 2)},
              "sparsevlm": {"counts": (6, 3), "layers": (1, 2)}, "fastv": {"layer": 1}, "dart": {"layer": 1}}
    reducer = qwen_reducer(method, None if method in ("full", "pdrop", "sparsevlm") else 6, **kwargs.get(method, {}))
    run = ReducedQwen(model, reducer)
    both = run.generate(ids, mask, pixels, grid, max_new_tokens=4)
    split = grid.prod(-1).tolist()
    for i, p in enumerate(pixels.split(split)):
        real = mask[i].bool()
        one = run.generate(ids[i:i + 1, real], mask[i:i + 1, real], p, grid[i:i + 1], max_new_tokens=4)
        assert one.tokens[0].tolist() == both.tokens[i].tolist()
        assert one.trace.sample(0, 16)["kept_indices"] == both.trace.sample(i, 16)["kept_indices"]


def _kept_logits(model, ids, pixels, grid, kept: list[int]):
    """The last logits when only the image tokens `kept` (indices into the image's tokens) and every text token go
    through the LLM, each with its original M-RoPE position: the model's own layers, written out."""
    from methods._ops import additive_mask  # noqa: PLC0415

    lm = model.model.language_model
    img = ids[0] == model.config.image_token_id
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels, image_grid_thw=grid).pooler_output[0]
        h = lm.embed_tokens(ids[0].masked_fill(img, 0))
        h[img] = feats
        pos, _ = model.model.get_rope_index(ids, img[None].int(), image_grid_thw=grid)  # (3, 1, T)
        keep = torch.cat([(~img).nonzero()[:, 0], img.nonzero()[kept, 0]]).sort().values
        h, pos = h[None, keep], pos[:, :, keep]
        cos_sin = lm.rotary_emb(h, pos)
        mask = additive_mask(torch.ones(1, len(keep), dtype=torch.bool), len(keep), h.dtype)
        for dec in lm.layers:
            h = dec(h, attention_mask=mask, position_embeddings=cos_sin)
        return model.lm_head(lm.norm(h[:, -1]))[0]


@pytest.mark.parametrize("method", ["random", "divprune", "adaptive_b", "budget_blind"])
def test_after_the_merger_survivors_keep_their_positions(method):
    """`random`, `divprune` and the controllers on each image's merged tokens: at most the budget per image (an image
    with fewer keeps all), and the logits of a run that feeds only the kept image tokens with their original M-RoPE
    positions."""
    model = tiny_qwen(seed=5, llm_layers=2)
    ids, mask, pixels, grid = qwen_prompts(model, [(1, 8, 8)], seed=8)
    state = ReducedQwen(model, qwen_reducer(method, 5)).prefill(ids, mask, pixels, grid)
    kept = state.trace.sample(0, 16)["kept_indices"]
    assert len(kept) == 5 and state.trace.visual_tokens[0].tolist() == [5, 5]
    torch.testing.assert_close(state.logits[0], _kept_logits(model, ids, pixels, grid, kept), atol=1e-4, rtol=1e-4)
    big = ReducedQwen(model, qwen_reducer(method, 40)).prefill(ids, mask, pixels, grid)
    assert big.trace.visual_tokens[0].tolist() == [16, 16]
