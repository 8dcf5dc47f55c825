"""PyramidDrop (pdrop.py): hand-computed cases and a direct restatement of the reference code."""

from __future__ import annotations

import pytest
import torch

from methods import Tokens, create_reducer, get_reducer_class
from methods.llava import ReducedLlava
from methods.pdrop import DEFAULT_RATIOS, layer_mean, stage_counts
from tests.conftest import eager_image_row, spliced_embeds, tiny_batch, tiny_llava, tokens_seen
from tests.restate import matches_restatement


def test_pdrop_schedule_by_hand():
    """LLaVA-1.5-7B: 576 tokens, 32 layers, stages at 8 / 16 / 24. The reference's 0.5 / 0.25 / 0.125 keeps 288, 144,
    72: layer mean (8 * 576 + 8 * (288 + 144 + 72)) / 32 = 270. A layer-averaged budget of 192 allows 8 * S <=
    32 * 192 - 8 * 576, S <= 192 tokens summed over the stages: lambda = 0.2552 keeps 146 + 37 + 9 = 192. Below
    (8 * 576 + 24) / 32 = 144.75 (one token per stage) no schedule exists."""
    assert stage_counts(576, DEFAULT_RATIOS) == [288, 144, 72]
    assert layer_mean(576, [288, 144, 72], (8, 16, 24), 32) == 270
    r = create_reducer("pdrop", 192)
    assert r.llm_layers(32, 576) == (8, 16, 24)  # L/4, L/2, 3L/4
    assert r.schedule(576, 32) == [146, 37, 9]
    assert create_reducer("pdrop", 145).schedule(576, 32) == [2, 1, 1]
    with pytest.raises(ValueError, match="below 144.8 visual tokens cannot be met by its stages at layers \\[8, 16"):
        create_reducer("pdrop", 144).llm_layers(32, 576)
    assert create_reducer("pdrop", ratios=(0.5, 0.25, 0.125)).schedule(576, 32) == [288, 144, 72]
    assert get_reducer_class("pdrop").budget_label({"ratios": (0.5, 0.25)}) == "ratios=0.5,0.25"
    with pytest.raises(ValueError, match="exactly one of budget"):
        create_reducer("pdrop", 64, ratios=(0.5,))
    with pytest.raises(ValueError, match="non-increasing"):
        create_reducer("pdrop", ratios=(0.25, 0.5))


def test_pdrop_keeps_the_most_attended_tokens_per_stage():
    """5 tokens, ratios 0.6 / 0.2: stage 0 keeps int(5 * 0.6) = 3 by the row, stage 1 int(5 * 0.2) = 1 of those."""
    q = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.06], [0.4, 0.12, 0.1, 0.08, 0.3]])
    x = torch.arange(10, dtype=torch.float).view(2, 5, 1)
    r = create_reducer("pdrop", ratios=(0.6, 0.2), layers=(1, 2))
    out = r(Tokens(x=x, grid=(1, 5), query_attn_next=q, stage=0, depth=4))
    assert out.keep.tolist() == [[0, 1, 3], [0, 1, 4]]
    out = r(Tokens(x=out.x, grid=(1, 5), query_attn_next=torch.tensor([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]]), stage=1,
                   depth=4))
    assert out.x.squeeze(-1).tolist() == [[1], [9]]


def _pdrop_restated(model, ids, pixels, layers, ratios, positions="renumber"):
    """PyramidDrop's prefill written out as its reference does it, for one prompt: before each stage layer, that
    layer's q and k of every token (RoPE at the positions so far), the last token's softmax row, heads averaged, the
    image slice ranked and the top int(N * ratio) kept in order, positions renumbered 0..T'-1 (`positions=
    "original"`: kept, the project's variant). Returns the kept patch indices of the last stage, the last
    position's logits, and each layer's (input, positions, decoding position) for `restated_decode`: the stage's
    prompt length when renumbered (the reference shifts the new token down by what each stage dropped), else the
    full prompt's."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: PLC0415

    lm = model.model.language_model
    h, img = spliced_embeds(model, ids, pixels)
    with torch.no_grad():
        h, t = h[None], ids.size(1)
        pos = torch.arange(t)[None]
        full = h.size(1)
        src = torch.full((t,), -1)
        src[img] = torch.arange(int(img.sum()))
        n = int(img.sum())
        inputs = []
        for j, layer in enumerate(lm.layers):
            t = h.size(1)
            if j in layers:
                att = layer.self_attn
                hn = layer.input_layernorm(h)
                q = att.q_proj(hn).view(1, t, -1, att.head_dim).transpose(1, 2)
                k = att.k_proj(hn).view(1, t, -1, att.head_dim).transpose(1, 2)
                cos, sin = lm.rotary_emb(h, pos)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
                w = (q @ k.transpose(-1, -2)) / att.head_dim ** 0.5 + torch.full((t, t), float("-inf")).triu(1)
                row = w.softmax(-1, dtype=torch.float32).mean(1)[0, -1]  # (T,) the last token's row
                image = (src >= 0).nonzero()[:, 0]
                top = row[image].topk(int(n * ratios[layers.index(j)])).indices.sort().values
                keep = torch.cat([(src < 0).nonzero()[:, 0], image[top]]).sort().values
                h, src, t = h[:, keep], src[keep], len(keep)
                pos = torch.arange(t)[None] if positions == "renumber" else pos[:, keep]
            inputs.append((h, pos, t if positions == "renumber" else full))
            m = torch.zeros(t, t).masked_fill(~torch.ones(t, t).tril().bool(), torch.finfo(torch.float32).min)
            h = layer(h, attention_mask=m[None, None], position_ids=pos, position_embeddings=lm.rotary_emb(h, pos))
        return src[src >= 0].tolist(), model.lm_head(lm.norm(h[:, -1]))[0], inputs


@pytest.mark.parametrize("seed", [0, 1])
def test_pdrop_equals_a_direct_restatement_of_the_reference(seed):
    """A 4-layer, grouped-query LLaVA with stages before layers 1 and 3 (16 -> 8 -> 2 image tokens): the same kept
    tokens, counts, logits and next-token logits after one decoding step as the restatement, by default with the
    reference's renumbered positions, with `positions=original` as the variant's restatement; the two differ."""
    model = tiny_llava(llm_layers=4, kv_heads=2, seed=seed)
    ids, mask, pixels = tiny_batch(model, 1, seed=seed + 3)
    got = {}
    for positions in ("renumber", "original"):
        args = {} if positions == "renumber" else {"positions": "original"}
        red = ReducedLlava(model, create_reducer("pdrop", ratios=(0.5, 0.125), layers=(1, 3), **args))
        state = red.prefill(ids, mask, pixels)
        kept, logits, inputs = _pdrop_restated(model, ids, pixels, (1, 3), (0.5, 0.125), positions)
        assert state.trace.visual_tokens[0].tolist() == [16, 8, 8, 2]
        matches_restatement(red, state, 16, kept, logits, inputs)
        got[positions] = (kept, logits)
    assert got["renumber"][0] != got["original"][0] or not torch.allclose(got["renumber"][1], got["original"][1])


def test_pdrop_row_equals_eager_attention_of_the_stage_layer():
    model = tiny_llava(llm_layers=4, kv_heads=2, seed=2, attn="eager")
    ids, mask, pixels = tiny_batch(model, 3, seed=4)
    reducer = create_reducer("pdrop", ratios=(0.5,), layers=(2,))
    seen = tokens_seen(reducer)
    ReducedLlava(model, reducer).prefill(ids, mask, pixels)
    torch.testing.assert_close(seen[0].query_attn_next, eager_image_row(model, ids, mask, pixels, 2), atol=1e-5,
                               rtol=1e-4)
