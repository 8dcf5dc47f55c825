"""Qwen3-VL (`ReducedQwen3`): DeepStack, per-head q/k norms and interleaved M-RoPE, on random models of the real
8B config cut in depth and width."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration

from flops.shapes import load_config
from methods import create_reducer
from methods.qwen import ReducedQwen3
from methods.trace import QwenLayout
from tests.conftest import qwen_prompts


def tiny_qwen3(seed: int = 0, llm_layers: int = 4, deepstack: tuple[int, ...] = (1, 2, 3)):
    """Qwen3-VL-8B's real config (token ids, vision patch 16 and merge 2, 2304 learned positions, GELU vision MLP,
    interleaved M-RoPE, untied head) with small widths, 4 vision blocks whose last three are the DeepStack taps (the
    8B's are 8, 16 and 24 of 27) and `llm_layers` decoder layers; random weights large enough that greedy outputs
    vary with the input."""
    config = load_config("qwen3-vl-8b")
    vc, tc = config.vision_config, config.text_config
    vc.depth, vc.hidden_size, vc.intermediate_size, vc.num_heads, vc.out_hidden_size = 4, 32, 64, 4, 64
    vc.deepstack_visual_indexes = list(deepstack)
    tc.num_hidden_layers, tc.hidden_size, tc.intermediate_size = llm_layers, 64, 128
    tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim = 4, 2, 16
    tc.rope_parameters = {**tc.rope_parameters, "mrope_section": [4, 2, 2]}  # 24/20/20 of 64 frequencies, as 8
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.float32).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("grids", [[(1, 4, 4)], [(1, 4, 4), (1, 6, 4)]], ids=["batch1", "padded2"])
def test_full_equals_hf_generate(grids):
    model = tiny_qwen3(seed=len(grids))
    ids, mask, pixels, grid = qwen_prompts(model, grids, seed=3)
    gen = ReducedQwen3(model, create_reducer("full")).generate(ids, mask, pixels, grid, max_new_tokens=6)
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                            mm_token_type_ids=(ids == model.config.image_token_id).int(), max_new_tokens=6,
                            do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.size(1):]
    assert gen.tokens.tolist() == hf.tolist()
    assert len({tuple(r) for r in gen.tokens.tolist()}) == len(grids) or len(grids) == 1  # the samples differ


def test_layout():
    lay = QwenLayout.from_config(load_config("qwen3-vl-8b"))
    assert (lay.patch_size, lay.merge, lay.vision_layers, lay.deepstack) == (16, 2, 27, (8, 16, 24))
    assert lay.full_attention_blocks == tuple(range(27)) and (lay.llm_layers, lay.width) == (36, 4096)


def hf_kept_logits(model, ids, pixels, grid, kept: torch.Tensor, wrong_level: int | None = None) -> torch.Tensor:
    """The restatement: HF's own language model run on the prompt with only the `kept` image tokens (indices into
    the image's tokens), their M-RoPE positions from `get_rope_index` on the whole prompt, and every DeepStack level
    gathered at the same indices; the last position's logits. `wrong_level`: that level's rows taken as the first
    len(kept) rows instead (a level not gathered with the others), for the test to show it would fail."""
    m = model.model
    with torch.no_grad():
        out = m.get_image_features(pixel_values=pixels, image_grid_thw=grid)
        feats, levels = out.pooler_output[0], [level[0] for level in out.deepstack_features]
        img = ids[0] == model.config.image_token_id
        pos, _ = m.get_rope_index(ids, img[None].int(), image_grid_thw=grid)  # (3, 1, T)
        x = m.language_model.embed_tokens(ids[0].masked_fill(img, 0))
        x[img] = feats
        nth = torch.cumsum(img.long(), 0) - 1
        keep = ~img | torch.isin(nth, kept)  # text, and the kept image tokens
        rows = [lv[kept] if j != wrong_level else lv[: len(kept)] for j, lv in enumerate(levels)]
        h = m.language_model(inputs_embeds=x[keep][None], position_ids=pos[:, :, keep],
                             visual_pos_masks=(img & keep)[keep][None], deepstack_visual_embeds=rows).last_hidden_state
        return model.lm_head(h[0, -1])


def test_a_reduction_before_the_llm_keeps_every_deepstack_level_consistent():
    """`random` at 8 of an image's 16 tokens, before the LLM: the prefill's logits equal HF's own language model run on
    the kept tokens only with every DeepStack level gathered at them; and a level left ungathered changes them (the
    check would fail)."""
    model = tiny_qwen3(seed=5)
    ids, mask, pixels, grid = qwen_prompts(model, [(1, 8, 8)], seed=7)
    state = ReducedQwen3(model, create_reducer("random", 8)).prefill(ids, mask, pixels, grid)
    kept = state.trace.kept[0][state.trace.kept_valid[0]]
    assert len(kept) == 8 and kept.tolist() != list(range(8))
    ours = state.logits[0]
    assert torch.allclose(ours, hf_kept_logits(model, ids, pixels, grid, kept), atol=1e-4, rtol=1e-4)
    for level in range(3):
        assert not torch.allclose(ours, hf_kept_logits(model, ids, pixels, grid, kept, level), atol=1e-3), level
