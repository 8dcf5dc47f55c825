"""Hand-computed cases pinning each method's steps, and each method run end to end through the adapter."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import Tensor

from methods import Reduced, TokenReducer, Tokens, create_reducer, get_reducer_class
from methods._ops import pixel_key
from methods.base import TextTokens
from methods.divprune import max_min_order
from methods.llava import ReducedLlava
from methods.pdrop import DEFAULT_RATIOS, layer_mean, stage_counts
from methods.prumerge import extra_token, iqr_outlier_count, merge_neighbours, plus_stride
from methods.random import hashed_scores
from methods.sparsevlm import cluster_merge, default_stages, recycled, visual_per_layer
from methods.visionzip import split_budget
from methods.vispruner import thin_duplicates
from tests.conftest import eager_image_row, spliced_embeds, tiny_batch, tiny_llava, tokens_seen

# ---------------------------------------------------------------------------------------------- PruMerge


def test_iqr_count_per_image():
    # row 0: 1..7 and 100. numpy-style linear quartiles: Q1 = 2.75, Q3 = 6.25, fence = 6.25 + 1.5 * 3.5 = 11.5
    # row 1: 1..6, 20, 30 -> Q1 = 2.75, Q3 = 6 + 0.25 * 14 = 9.5, fence = 9.5 + 1.5 * 6.75 = 19.625 -> 20 and 30
    a = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 100], [1, 2, 3, 4, 5, 6, 20, 30]], dtype=torch.float)
    assert iqr_outlier_count(a).tolist() == [1, 2]
    # per image: the count of row 0 does not change when row 1 changes (the reference pools the batch)
    assert iqr_outlier_count(a[:1]).tolist() == [1]


def test_neighbours_weights_and_extra_token():
    # 5 tokens, keys on a circle so that cosine neighbours are known: token 0's nearest are 1 then 4
    ang = torch.tensor([0.0, 0.3, 2.0, 3.0, -0.5])
    keys = torch.stack([ang.cos(), ang.sin()], -1).unsqueeze(0)  # (1, 5, 2)
    x = torch.arange(5, dtype=torch.float).mul(10).add(1).view(1, 5, 1)  # features 1, 11, 21, 31, 41
    a = torch.tensor([[0.4, 0.1, 0.2, 0.2, 0.1]])
    out = merge_neighbours(x, keys, a, torch.tensor([[0]]), neighbours=2)
    assert out.item() == pytest.approx(1 + 0.1 * 11 + 0.1 * 41)  # unnormalised: centre + sum a_j x_j
    kept = torch.tensor([[True, False, False, True, False]])
    assert extra_token(x, a, kept).item() == pytest.approx(0.1 * 11 + 0.2 * 21 + 0.1 * 41)


def test_prumerge_plus_indices_and_stride_zero_case():
    n = 36
    a = torch.full((1, n), 0.01)
    a[0, 19] = 0.5  # one outlier -> k = 1, ratio = 1/36, int(int(36) / 3) = 12: grid 0, 12, 24 (35 never reached)
    assert plus_stride(torch.tensor([1]), n).tolist() == [12]
    keep, valid = create_reducer("prumerge_plus", "auto").select(a)
    assert keep[0][valid[0]].tolist() == [19, 0, 12, 24]
    assert plus_stride(torch.tensor([18]), n).tolist() == [1]  # ratio 1/2: int(2 / 3) = 0 in the reference -> 1


def test_prumerge_fixed_budget_gives_exactly_budget_tokens_in_attention_order():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 36, generator=g).softmax(1)
    t = Tokens(x=torch.randn(3, 36, 4, generator=g), grid=(6, 6), cls_attn=a, keys=torch.randn(3, 36, 4, generator=g))
    for name in ("prumerge", "prumerge_plus"):
        out = create_reducer(name, 9)(t)
        assert out.x.shape == (3, 9, 4) and out.valid is None
        assert (out.keep[:, -1] == -1).all()  # the extra token is last
    out = create_reducer("prumerge", 9)(t)
    ranked = a.gather(1, out.keep[:, :-1])
    assert (ranked[:, :-1] >= ranked[:, 1:]).all()  # descending attention, as the reference
    assert set(out.keep[0, :-1].tolist()) == set(a[0].topk(8).indices.tolist())


# ---------------------------------------------------------------------------------------------- FastV, random


def test_fastv_keeps_the_most_attended_tokens_in_order():
    q = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05], [0.4, 0.1, 0.1, 0.1, 0.3]])
    x = torch.arange(10, dtype=torch.float).view(2, 5, 1)
    out = create_reducer("fastv", 2, layer=1)(Tokens(x=x, grid=(1, 5), query_attn=q))
    assert out.keep.tolist() == [[1, 3], [0, 4]]
    assert out.x.squeeze(-1).tolist() == [[1, 3], [5, 9]]
    r = create_reducer("fastv", layer=1, ratio=0.6)  # R = share dropped: round(5 * 0.4) = 2 kept
    assert r(Tokens(x=x, grid=(1, 5), query_attn=q)).keep.tolist() == [[1, 3], [0, 4]]
    with pytest.raises(ValueError, match="exactly one of budget"):
        create_reducer("fastv", 2, ratio=0.5)


# ---------------------------------------------------------------------------------------------- PyramidDrop


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


def _restated_decode(model, inputs, next_token):
    """The next logits after `next_token`, each layer attending over its own prompt (`inputs[j]` = (hidden states
    entering layer j, their position ids, the new token's position there)) plus the new token: what a KV-cached
    decoding step computes, written without a cache."""
    lm = model.model.language_model
    with torch.no_grad():
        x = lm.embed_tokens(torch.tensor([[next_token]]))
        for layer, (h, pos, nxt) in zip(lm.layers, inputs, strict=True):
            seq, p = torch.cat([h, x], 1), torch.cat([pos, torch.tensor([[nxt]])], 1)
            t = seq.size(1)
            m = torch.zeros(t, t).masked_fill(~torch.ones(t, t).tril().bool(), torch.finfo(torch.float32).min)
            x = layer(seq, attention_mask=m[None, None], position_ids=p, position_embeddings=lm.rotary_emb(seq, p))
            x = x[:, -1:]
        return model.lm_head(lm.norm(x[:, -1]))[0]


def _matches_restatement(red, state, n_patches, kept, logits, inputs, tol=1e-4) -> None:
    """The adapter's prefill `state` (of runner `red`) keeps the restatement's tokens, gives its logits, and its first
    decoding step (on the greedy token) gives `_restated_decode`'s logits."""
    assert state.trace.sample(0, n_patches)["kept_indices"] == kept
    torch.testing.assert_close(state.logits[0], logits, atol=tol, rtol=tol)
    tok = int(state.logits[0].argmax())
    with torch.no_grad():
        step = red._decode_step(state, torch.tensor([tok]))
    torch.testing.assert_close(step[0], _restated_decode(red.model, inputs, tok), atol=tol, rtol=tol)


def _pdrop_restated(model, ids, pixels, layers, ratios, positions="renumber"):
    """PyramidDrop's prefill written out as its reference does it, for one prompt: before each stage layer, that
    layer's q and k of every token (RoPE at the positions so far), the last token's softmax row, heads averaged, the
    image slice ranked and the top int(N * ratio) kept in order, positions renumbered 0..T'-1 (`positions=
    "original"`: kept, the project's variant). Returns the kept patch indices of the last stage, the last
    position's logits, and each layer's (input, positions, decoding position) for `_restated_decode`: the stage's
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
        _matches_restatement(red, state, 16, kept, logits, inputs)
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


# ---------------------------------------------------------------------------------------------- DART


def _dart_tokens(text_at: tuple[int, int] = (13, 14)):
    """Six image tokens in 2-D at sequence indices 3-8 and two text tokens at `text_at`. Key norms make token 1 the
    image pivot (index 4) and text token 1 the text pivot."""
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7], [0.0, -1.0]]])
    text = TextTokens(normed=torch.tensor([[[1.0, 1.0], [0.1, 1.0]]]), key_norms=torch.tensor([[0.5, 0.8]]),
                      valid=torch.ones(1, 2, dtype=torch.bool), prompt_index=torch.tensor([text_at]))
    return Tokens(x=x * 10, grid=(2, 3), normed=x, key_norms=torch.tensor([[0.1, 0.9, 0.2, 0.3, 0.1, 0.2]]),
                  text=text, prompt_index=torch.arange(3, 9).unsqueeze(0))


def test_dart_by_hand():
    """One image and one text pivot, at sequence indices 4 and 14: CPython's 8-slot set {4, 14} iterates slot 4,
    then slot 6, in position order. Budget 3: one token per pivot, (3 - 1) // 2. The image pivot (1, 0.1) takes its
    least similar free token, 3 (cosine -0.995); the text pivot (0.1, 1) then 5 (-0.995). Budget 5: two per pivot:
    the image pivot takes 3 and 5 (-0.995, -0.0995, before 2 at +0.0995), the text pivot 0 and 4 (0.0995 and
    0.774, before 2 at 0.995): 1 + 2 x 2 = 5 tokens. With the text pivot at 10 (slot 2) the set iterates it first:
    it takes 5 and 3, the image pivot then 2 and 4; `pivot_order=position` keeps the image pivot first."""
    t = _dart_tokens()
    out = create_reducer("dart", 3, layer=1, pivot_image=1, pivot_text=1)(t)
    assert out.keep.tolist() == [[1, 3, 5]]
    torch.testing.assert_close(out.x, t.x[:, [1, 3, 5]])
    assert out.macs.tolist() == [2 * 6 * 2]  # two pivots against six tokens of width 2
    assert create_reducer("dart", 5, layer=1, pivot_image=1, pivot_text=1)(t).keep.tolist() == [[0, 1, 3, 4, 5]]
    early = _dart_tokens(text_at=(9, 10))
    assert list({4, 10}) == [10, 4]  # the interpreter's set order this test assumes
    assert create_reducer("dart", 5, layer=1, pivot_image=1, pivot_text=1)(early).keep.tolist() == [[1, 2, 3, 4, 5]]
    by_position = create_reducer("dart", 5, layer=1, pivot_image=1, pivot_text=1, pivot_order="position")
    assert by_position(early).keep.tolist() == [[0, 1, 3, 4, 5]]
    # the reference's knob: T = 2 over 2 pivots is one token each, as budget 3
    r = create_reducer("dart", layer=1, pivot_image=1, pivot_text=1, max_num_trunction=2)
    assert r(t).keep.tolist() == [[1, 3, 5]]
    assert get_reducer_class("dart").budget_label({"max_num_trunction": 128}) == "T=128"
    with pytest.raises(ValueError, match="exactly one of budget"):
        create_reducer("dart", 64, max_num_trunction=64)
    with pytest.raises(ValueError, match="pivot_order='norm': must be one of set, position"):
        create_reducer("dart", 64, pivot_order="norm")


def _dart_restated(model, ids, pixels, k_layer, pivot_image, pivot_text, per_pivot, order="set"):
    """DART's selection written out as its reference does it, for one prompt: layer K-1's keys (HF's own RoPE) and
    their L1 norms, pivots by the largest norms among the image and the text after it (absolute sequence indices,
    in topk order), the final norm of the hidden states entering layer K, then for each pivot in the order of
    ``list(set(image_pivots + text_pivots))`` the least cosine-similar remaining image tokens, with Python sets as
    the reference keeps them. `order="position"`: the pivots sorted instead (the project's variant)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: PLC0415

    lm = model.model.language_model
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, output_hidden_states=True)
        hs = out.hidden_states  # embeddings, then each layer's output
        layer = lm.layers[k_layer - 1]
        t = ids.size(1)
        k = layer.self_attn.k_proj(layer.input_layernorm(hs[k_layer - 1])).view(1, t, -1, layer.self_attn.head_dim)
        k = k.transpose(1, 2)
        cos, sin = lm.rotary_emb(hs[0], torch.arange(t)[None])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        norms = k[0].permute(1, 0, 2).reshape(t, -1).abs().sum(-1)  # (T,)
        state = lm.norm(hs[k_layer])[0]  # (T, D)
        img = (ids[0] == model.config.image_token_id).nonzero()[:, 0]
        start, n = int(img[0]), len(img)
        image_piv = (norms[start:start + n].topk(pivot_image).indices + start).tolist()
        text_piv = (norms[start + n:].topk(pivot_text).indices + start + n).tolist()
        chosen = set(image_piv + text_piv)
        valid = set(range(start, start + n)) - set(image_piv)
        pivots = list(chosen) if order == "set" else sorted(image_piv) + sorted(text_piv)
        for p in pivots:
            order_ = list(valid)
            sims = -torch.nn.functional.cosine_similarity(state[p], state[order_], dim=-1)
            picked = [order_[i] for i in sims.topk(per_pivot).indices.tolist()]
            chosen.update(picked)
            valid.difference_update(picked)
        chosen.difference_update(text_piv)
        return sorted(i - start for i in chosen)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dart_equals_a_direct_restatement_of_the_reference(seed):
    """64 image tokens (an 8 x 8 grid), a grouped-query LLM of 3 layers, K = 2, 2 + 2 pivots, 3 tokens each: the
    default takes its pivots in the reference's set order, `pivot_order=position` in position order; each keeps
    what the restatement in that order keeps, and the two differ."""
    model = tiny_llava(image_size=64, kv_heads=2, seed=seed)
    ids, mask, pixels = tiny_batch(model, 1, seed=seed + 7)
    kept = {}
    for order in ("set", "position"):
        red = ReducedLlava(model, create_reducer("dart", 14, layer=2, pivot_image=2, pivot_text=2,
                                                 pivot_order=order))  # 2 + 4 x 3
        kept[order] = red.prefill(ids, mask, pixels).trace.sample(0, 64)["kept_indices"]
        assert kept[order] == _dart_restated(model, ids, pixels, 2, 2, 2, 3, order), order
        assert len(kept[order]) == 14
    assert kept["set"] != kept["position"]  # the old default fails this test on every seed


# ---------------------------------------------------------------------------------------------- DivPrune


def test_divprune_picks_by_hand():
    """Five 2-D tokens at 0, ~6.3, 90, 180 and 45 degrees. Nearest-neighbour cosine distances: 0.006, 0.006, 0.293,
    1.0 (token 3's nearest is token 2), 0.22: token 3 first; then the farthest from it, token 0 (distance 2); then
    the largest min-distance to {3, 0}: token 1 0.006, token 2 1.0, token 4 0.293, so token 2. Kept in order."""
    x = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]]])
    assert max_min_order(x, 3).tolist() == [[3, 0, 2]]
    out = create_reducer("divprune", 3)(Tokens(x=x, grid=(1, 5)))
    assert out.keep.tolist() == [[0, 2, 3]]
    torch.testing.assert_close(out.x, x[:, [0, 2, 3]])
    assert out.macs.tolist() == [5 * 5 * 2]  # the similarity matrix
    # per-sample budgets and padding: sample 1 has tokens 0-2 only and a budget of 2 (of a batch budget of 3)
    two = torch.cat([x, x])
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out = create_reducer("divprune", 3)(Tokens(x=two, grid=(1, 5), valid=valid, budget=torch.tensor([3, 2])))
    kept = [row[v].tolist() for row, v in zip(out.keep, out.valid if out.valid is not None else valid[:, :3],
                                               strict=True)]
    # among tokens 0-2: nearest distances 0.006, 0.006, 1 - cos(84 deg) = 0.89 -> token 2, then token 0
    assert kept == [[0, 2, 3], [0, 2]]


def _divprune_restated(x: Tensor, k: int) -> list[int]:
    """The paper's greedy, one sample, plain Python over the distance matrix (slow, no tensor tricks)."""
    n = x.size(0)
    cos = [[float(torch.nn.functional.cosine_similarity(x[i], x[j], dim=0)) for j in range(n)] for i in range(n)]
    d = [[1.0 - cos[i][j] for j in range(n)] for i in range(n)]
    chosen = [max(range(n), key=lambda i: (min(d[i][j] for j in range(n) if j != i), -i))]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(d[i][j] for j in chosen), -i)))
    return sorted(chosen)


def test_divprune_equals_a_direct_restatement_of_the_paper():
    """On real-shaped inputs (the 7B projector width, 576 tokens would be slow in Python: 144 here), the kept set
    equals the greedy max-min written out directly."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 144, 64, generator=g) + torch.randn(2, 1, 64, generator=g)  # a shared offset, like real tokens
    out = create_reducer("divprune", 16)(Tokens(x=x, grid=(12, 12)))
    assert [row.tolist() for row in out.keep] == [_divprune_restated(x[b], 16) for b in range(2)]


# ---------------------------------------------------------------------------------------------- FasterVLM


def test_fastervlm_keeps_the_most_attended_patches_in_order():
    a = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05], [0.4, 0.1, 0.1, 0.1, 0.3]])
    x = torch.arange(10, dtype=torch.float).view(2, 5, 1)
    out = create_reducer("fastervlm", 2)(Tokens(x=x, grid=(1, 5), feature_attn=a))
    assert out.keep.tolist() == [[1, 3], [0, 4]]
    assert out.x.squeeze(-1).tolist() == [[1, 3], [5, 9]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_feature_attn_is_the_feature_layers_cls_row_and_leaves_outputs_unchanged(attn):
    """The signal equals HF's `attentions[-2]` CLS row over the patches, heads averaged (eager output_attentions),
    and writing the feature layer out changes nothing: FasterVLM keeping every patch generates what `full` does."""
    model = tiny_llava(attn=attn, seed=4)
    ids, mask, pixels = tiny_batch(model, 3, seed=13)
    seen = {}

    class Probe(TokenReducer):  # keeps everything and records its signal
        name, needs = "probe", frozenset({"feature_attn", "feature_keys", "feature_cls"})

        def forward(self, t: Tokens) -> Reduced:
            seen.update(feature_attn=t.feature_attn, feature_keys=t.feature_keys, feature_cls=t.feature_cls)
            return Reduced(x=t.x)

    with torch.no_grad():
        ReducedLlava(model, Probe(16)).prefill(ids, mask, pixels)
        eager = tiny_llava(attn="eager", seed=4)
        out = eager.model.vision_tower(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
        layer = eager.model.vision_tower.encoder.layers[-2]  # the one that makes hidden_states[-2]
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[-3]))  # (B, S, Dv)
    ref = out.attentions[-2]  # (B, H, S, S)
    torch.testing.assert_close(seen["feature_attn"], ref[:, :, 0, 1:].mean(1), atol=1e-6, rtol=1e-5)
    heads = keys.view(*keys.shape[:2], ref.size(1), -1)[:, 1:].mean(2)  # (B, N, hd) heads averaged
    torch.testing.assert_close(seen["feature_keys"], heads, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["feature_cls"], out.hidden_states[-2][:, 0], atol=1e-5, rtol=1e-5)
    full = ReducedLlava(model, create_reducer("full")).generate(ids, mask, pixels, 5, eos_token_id=2)
    every = ReducedLlava(model, create_reducer("fastervlm", 16)).generate(ids, mask, pixels, 5, eos_token_id=2)
    assert torch.equal(full.tokens, every.tokens)
    torch.testing.assert_close(full.first_logits, every.first_logits, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- VisPruner


def test_vispruner_by_hand():
    """8 patches, budget 6, important_ratio 1/3: patches 0 and 1 are the most attended (important); the rest, in
    attention order [2..7], are thinned to 4. One round drops 2: A = [2, 4, 6], B = [3, 5, 7]; 2 and 4 have a
    near-duplicate in B (3 and 5), 6 does not (its best cosine is 0, to 7), so A keeps 6 and the list is
    [6, 3, 5, 7]."""
    x = torch.tensor([[[0.3, 0.3], [0.2, -0.5], [1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.02, 1.0], [-1.0, 0.0],
                       [0.0, -1.0]]])
    attn = torch.tensor([[0.30, 0.25, 0.10, 0.09, 0.08, 0.07, 0.06, 0.05]])
    order, macs = thin_duplicates(torch.nn.functional.normalize(x, dim=-1), torch.arange(2, 8).view(1, 6), 4)
    assert order.tolist() == [[6, 3, 5, 7]] and macs == 3 * 3 * 2
    out = create_reducer("vispruner", 6, important_ratio=1 / 3)(Tokens(x=x, grid=(2, 4), feature_attn=attn))
    assert out.keep.tolist() == [[0, 1, 3, 5, 6, 7]] and out.macs.tolist() == [18]
    torch.testing.assert_close(out.x, x[:, [0, 1, 3, 5, 6, 7]])
    # an odd list (the reference's indexing fails there): 5 to keep 4, A = [2, 4, 6], B = [3, 5]; 2 is the closest
    # to B (cos 0.99995 to 3, against 0.9998 for 4 to 5), so it goes; A's survivors by similarity, then B
    order, _ = thin_duplicates(torch.nn.functional.normalize(x, dim=-1), torch.arange(2, 7).view(1, 5), 4)
    assert order.tolist() == [[4, 6, 3, 5]]
    with pytest.raises(ValueError, match="important_ratio"):
        create_reducer("vispruner", 6, important_ratio=1.5)


def _vispruner_restated(x: Tensor, attn: Tensor, budget: int, ratio: float) -> list[int]:
    """The reference's steps for one sample, in plain Python lists (slow; stable sorts as in the method)."""
    n = x.size(0)
    xn = torch.nn.functional.normalize(x, dim=-1)
    by_attn = sorted(range(n), key=lambda i: -float(attn[i]))
    important = int(budget * ratio)
    rest, keep = by_attn[important:], budget - important
    while len(rest) > keep:
        drop = min(8, len(rest) - keep)
        a, b = rest[::2], rest[1::2]
        best = [max(float(xn[i] @ xn[j]) for j in b) for i in a]
        survivors = sorted(range(len(a)), key=lambda p: -best[p])[drop:]
        rest = [a[p] for p in survivors] + b
    return sorted(by_attn[:important] + rest)


def test_vispruner_equals_a_direct_restatement_of_the_reference():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 144, 96, generator=g)
    x[:, 72:] = x[:, :72] + 0.1 * torch.randn(2, 72, 96, generator=g)  # near-duplicate halves, as in real images
    attn = torch.rand(2, 144, generator=g).softmax(-1)
    for budget in (16, 36):
        out = create_reducer("vispruner", budget)(Tokens(x=x, grid=(12, 12), feature_attn=attn))
        assert [row.tolist() for row in out.keep] == [_vispruner_restated(x[b], attn[b], budget, 0.5)
                                                      for b in range(2)]


# ---------------------------------------------------------------------------------------------- VisionZip


def test_visionzip_by_hand():
    """8 patches, budget 5 with 2 contextual: CLS + the 2 most attended patches (1, 6); the rest [0, 2, 3, 4, 5, 7]
    at stride 6 // 2 = 3 gives targets 0 and 4; by key, 2 and 3 join 0, 5 and 7 join 4; each contextual token is
    its target plus its members' mean."""
    x = torch.tensor([[[1.0, 0], [2, 0], [0, 1], [0, 1.5], [5, 5], [6, 6], [3, 3], [7, 7]]])
    attn = torch.tensor([[0.1, 0.3, 0.05, 0.05, 0.05, 0.05, 0.3, 0.1]])
    keys = torch.tensor([[[0, 1.0], [9, 9], [0.1, 1], [0.2, 1], [1, 0], [1, 0.1], [9, 9], [1, 0.2]]])
    t = Tokens(x=x, grid=(2, 4), feature_attn=attn, feature_keys=keys, feature_cls=torch.tensor([[9.0, 9]]))
    out = create_reducer("visionzip", 5, contextual=2)(t)
    assert out.keep.tolist() == [[-1, 1, 6, 0, 4]]
    torch.testing.assert_close(out.x, torch.tensor([[[9.0, 9], [2, 0], [3, 3], [1, 1.25], [11.5, 11.5]]]))
    assert out.macs.tolist() == [4 * 2 * (2 + 2)]  # 4 members x 2 targets x (key width + feature width)
    assert [split_budget(b, None) for b in (64, 128, 192)] == [(53, 10), (107, 20), (161, 30)]  # 54 + 10, ...
    with pytest.raises(ValueError, match="budget must be >= 2"):
        create_reducer("visionzip", 1)


def _visionzip_restated(x: Tensor, attn: Tensor, keys: Tensor, cls: Tensor, budget: int) -> tuple[list, Tensor]:
    """The steps for one sample in plain Python (slow): keep indices and output tokens."""
    n = x.size(0)
    c = int(budget * 10 / 64 + 0.5)
    p = budget - c - 1
    dominant = sorted(sorted(range(n), key=lambda i: -float(attn[i]))[:p])
    rest = [i for i in range(n) if i not in dominant]
    step = max(1, len(rest) // c)
    targets = rest[::step][:c]
    members = [i for i in rest if i not in targets]
    kn = torch.nn.functional.normalize(keys, dim=-1)
    groups = {tg: [] for tg in targets}
    for i in members:
        groups[max(targets, key=lambda tg: (float(kn[i] @ kn[tg]), -targets.index(tg)))].append(i)
    ctx = [x[tg] + (torch.stack([x[i] for i in groups[tg]]).mean(0) if groups[tg] else 0) for tg in targets]
    return [-1, *dominant, *targets], torch.stack([cls, *[x[i] for i in dominant], *ctx])


def test_visionzip_equals_a_direct_restatement():
    g = torch.Generator().manual_seed(7)
    x, keys = torch.randn(2, 144, 96, generator=g), torch.randn(2, 144, 24, generator=g)
    attn, cls = torch.rand(2, 144, generator=g).softmax(-1), torch.randn(2, 96, generator=g)
    for budget in (16, 36):
        out = create_reducer("visionzip", budget)(Tokens(x=x, grid=(12, 12), feature_attn=attn, feature_keys=keys,
                                                         feature_cls=cls))
        for i in range(2):
            keep, tokens = _visionzip_restated(x[i], attn[i], keys[i], cls[i], budget)
            assert out.keep[i].tolist() == keep
            torch.testing.assert_close(out.x[i], tokens, atol=1e-5, rtol=1e-5)


def test_random_is_exact_seeded_and_batch_invariant():
    x = torch.randn(4, 144, 16, generator=torch.Generator().manual_seed(1))
    key = pixel_key(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3)))
    r = create_reducer("random", 18)
    out = r(Tokens(x=x, grid=(12, 12), sample_key=key))
    assert out.keep.shape == (4, 18) and all(len(set(row)) == 18 for row in out.keep.tolist())
    assert torch.equal(r(Tokens(x=x[2:3], grid=(12, 12), sample_key=key[2:3])).keep[0], out.keep[2])
    assert not torch.equal(create_reducer("random", 18, seed=1)(Tokens(x=x, grid=(12, 12), sample_key=key)).keep,
                           out.keep)
    # uniform: over many images, every patch is kept about equally often (18 / 144 = 1/8 of the time)
    keys = torch.arange(4000) * 7919
    kept = hashed_scores(keys, 144, 0).argsort(1)[:, :18]
    freq = torch.bincount(kept.flatten(), minlength=144) / 4000
    assert (freq - 0.125).abs().max() < 0.03


# ---------------------------------------------------------------------------------------------- through the adapter


@pytest.mark.parametrize("name,budget,kw", [("prumerge", 5, {}), ("prumerge_plus", 7, {}), ("random", 4, {}),
                                            ("fastv", 3, {"layer": 1}), ("prumerge", "auto", {}),
                                            ("divprune", 5, {}), ("fastervlm", 6, {}),
                                            ("vispruner", 6, {}), ("visionzip", 6, {})])
def test_methods_run_through_the_adapter_batch_invariant(tiny_model, name, budget, kw):
    ids, mask, pixels = tiny_batch(tiny_model, 4, seed=11)
    red = ReducedLlava(tiny_model, create_reducer(name, budget, **kw))
    batched = red.generate(ids, mask, pixels, 4, eos_token_id=2)
    seen = batched.trace.visual_tokens[:, -1]
    if budget != "auto":
        assert seen.tolist() == [budget] * 4
    for i in (0, 3):
        row = mask[i].bool()
        one = red.generate(ids[i:i + 1, row], mask[i:i + 1, row], pixels[i:i + 1], 4, eos_token_id=2)
        assert one.tokens[0].tolist() == batched.tokens[i, : one.tokens.size(1)].tolist()
        assert one.trace.sample(0, 16)["kept_indices"] == batched.trace.sample(i, 16)["kept_indices"]


def test_fastv_with_every_token_equals_full(tiny_model):
    ids, mask, pixels = tiny_batch(tiny_model, 3, seed=12)
    full = ReducedLlava(tiny_model, create_reducer("full")).generate(ids, mask, pixels, 6, eos_token_id=2)
    fastv = ReducedLlava(tiny_model, create_reducer("fastv", 16, layer=2)).generate(ids, mask, pixels, 6,
                                                                                   eos_token_id=2)
    assert torch.equal(full.tokens, fastv.tokens)
    torch.testing.assert_close(full.first_logits, fastv.first_logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- SparseVLM


def test_sparsevlm_schedule_by_hand():
    """The reference's "64" on LLaVA-1.5-7B: 66 / 30 / 17 kept after layers 2, 6 and 15 (before 3, 7, 16), plus
    int(int(0.3 n_del) + 1) / 10) + 1 clusters: 66 + 16, 30 + 2, 17 + 1: a layer mean of 82.25, not 64. A budget of
    64 solves one scale on that table for a mean of at most 64."""
    assert default_stages(32) == ((3, 7, 16), (0, 1, 2))
    assert default_stages(8) == ((1, 2, 4), (0, 1, 2))
    assert default_stages(3) == ((1, 2), (1, 2))  # 3/32 and 7/32 of 3 layers coincide: the later count holds
    assert recycled(510) == (154, 16) and recycled(52) == (16, 2) and recycled(15) == (5, 1)
    r = create_reducer("sparsevlm", retained_tokens=64)
    assert r.schedule(576, 32) == (66, 30, 17) and r.llm_layers(32, 576) == (3, 7, 16)
    per = visual_per_layer(576, (66, 30, 17), (3, 7, 16), 32)
    assert per == [576] * 3 + [82] * 4 + [32] * 9 + [18] * 16 and sum(per) / 32 == 82.25
    assert create_reducer("sparsevlm", retained_tokens=192).schedule(144, 32) == (75, 50, 27)  # x 144 / 576
    solved = create_reducer("sparsevlm", 64).schedule(576, 32)
    assert sum(visual_per_layer(576, solved, (3, 7, 16), 32)) / 32 <= 64
    bigger = tuple(c + 1 for c in solved)
    assert sum(visual_per_layer(576, bigger, (3, 7, 16), 32)) / 32 > 64  # the largest that fits
    with pytest.raises(ValueError, match="budgets below 20.2 visual tokens cannot be met"):
        create_reducer("sparsevlm", 16).llm_layers(8, 144)  # 144 tokens run through layer 0: at least 20.2
    with pytest.raises(ValueError, match="retained_tokens must be one of"):
        create_reducer("sparsevlm", retained_tokens=100)
    with pytest.raises(ValueError, match="exactly one of"):
        create_reducer("sparsevlm", 64, counts=(8,))
    assert get_reducer_class("sparsevlm").budget_label({"retained_tokens": 64}) == "retained=64"
    assert get_reducer_class("sparsevlm").budget_label({"counts": (8, 3)}) == "counts=8,3"


def test_sparsevlm_by_hand():
    """Ten image tokens, three text tokens. Raters: every image embedding is (1, 0), the text embeddings (2, 0),
    (0, 0), (0, 0): softmax of (2, 0, 0) is (0.79, 0.11, 0.11), above the mean 1/3 only text token 0, so its row
    alone ranks. Keep 3: tokens 0, 4, 2 (0.30, 0.25, 0.20). Deleted 7: int(2.1) + 1 = 3 recycled, the best-ranked
    3, 5, 1, in one cluster (int(3 / 10) + 1); every density is exp(0) at k = 1, so the best-ranked, 3, is the
    densest and the centre (score d_max = 8 against 4 and 4): the mean of x1, x3, x5 stands at token 3's place."""
    x = torch.arange(20, dtype=torch.float).view(1, 10, 2)
    row = torch.tensor([0.30, 0.05, 0.20, 0.12, 0.25, 0.08, 0.01, 0.02, 0.03, 0.04])
    text = TextTokens(valid=torch.ones(1, 3, dtype=torch.bool), attn=torch.stack([row, row.flip(0), row.flip(0)])[None],
                      embeds=torch.tensor([[[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]]))
    t = Tokens(x=x, grid=(2, 5), text=text, embeds=torch.tensor([1.0, 0.0]).expand(1, 10, 2), stage=0, depth=2)
    out = create_reducer("sparsevlm", counts=(3,), layers=(1,))(t)
    assert out.keep.tolist() == [[0, 2, 4, -1]] and out.anchor.tolist() == [[0, 2, 4, 3]]
    torch.testing.assert_close(out.x[0, :3], x[0, [0, 2, 4]])
    torch.testing.assert_close(out.x[0, 3], (x[0, 1] + x[0, 3] + x[0, 5]) / (3 + 1e-6))
    assert out.macs.tolist() == [10 * 3 * 2 + 3 * 3 * 2]  # the raters' similarities, the pairwise distances
    # all text embeddings equal: no token is above the mean, so every one rates (the mean of the three rows)
    flat = replace(text, embeds=torch.zeros(1, 3, 2))
    out = create_reducer("sparsevlm", counts=(1,), layers=(1,))(replace(t, text=flat))
    assert out.keep[0, 0].item() == int((row + 2 * row.flip(0)).argmax())


def test_cluster_merge_by_hand():
    """Six points on a line, 3 clusters (k = 3 nearest, self included). Mean squared distances: 10/3, 5/3, 13/3,
    34.25/3, 16.25/3, 42.5/3, so the densities rank 1, 0, 2, 4, 3, 5. Distance to the nearest denser point: 15.5
    (d_max: 1 is the densest), 1, 2, 2, 9, 3.5; times density, the top three are 1, 4, 0. Point 2 joins 1, 3 and 5
    join 4: clusters {1, 2} (mean 2), {3, 4, 5} (mean 12.5), {0} (mean 0), in centre-rank order."""
    x = torch.tensor([0.0, 1.0, 3.0, 10.0, 12.0, 15.5]).view(1, 6, 1)
    merged, ok, centres = cluster_merge(x, torch.ones(1, 6, dtype=torch.bool), torch.tensor([3]))
    assert centres.tolist() == [[1, 4, 0]] and ok.all()
    torch.testing.assert_close(merged[0, :, 0], torch.tensor([4 / (2 + 1e-6), 37.5 / (3 + 1e-6), 0.0]))


def _density_peaks(x: Tensor, k: int) -> tuple[list[Tensor], list[int]]:
    """The reference's `cluster_and_merge` in plain Python for one row of tokens x (S, D), k clusters, its noise
    replaced by the rank rule: (merged tokens, centres) in centre-rank order."""
    import math  # noqa: PLC0415

    s, c = x.shape
    dist = [[float((x[i] - x[j]).norm()) / c ** 0.5 for j in range(s)] for i in range(s)]
    dens = [math.exp(-sum(v * v for v in sorted(dist[i])[:k]) / k) for i in range(s)]
    dmax = max(max(r) for r in dist)
    parent = [min([dist[i][j] for j in range(s) if dens[j] > dens[i] or (dens[j] == dens[i] and j < i)] + [dmax])
              for i in range(s)]
    centres = sorted(range(s), key=lambda i: -parent[i] * dens[i])[:k]
    assign = [min(range(k), key=lambda q: dist[i][centres[q]]) for i in range(s)]
    for q, i in enumerate(centres):
        assign[i] = q
    merged = [sum(x[i] for i in range(s) if assign[i] == q) / (assign.count(q) + 1e-6) for q in range(k)]
    return merged, centres


def _sparsevlm_restated(model, ids, pixels, layers, counts, positions="renumber"):
    """SparseVLM's prefill for one prompt as its reference writes it (v1.5): raters once from the input embeddings;
    after each layer l = stage layer - 1, that layer's full attention (q and k of every token, RoPE, causal softmax,
    heads averaged), the raters' rows over the image tokens averaged, the top min(count, N_v - 1) kept, the
    best-ranked int(0.3 n_del) + 1 deleted ones clustered (plain Python) into int(n / 10) + 1 tokens of that layer's
    outputs, placed right after the kept image tokens in cluster order, positions cut to 0..T'-1 (`positions=
    "original"`: the project's variant, positions kept and a merged token at its centre's place). Returns the kept
    patch indices at the end, the visual tokens per layer, the last logits and each layer's (input, positions,
    decoding position) for `_restated_decode`."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: PLC0415

    lm = model.model.language_model
    h, img = spliced_embeds(model, ids, pixels)
    with torch.no_grad():
        start = int(img.nonzero()[0, 0])
        n = int(img.sum())
        v_t, t_t = h[img], h[start + n:]
        m = (v_t @ t_t.T).softmax(1).mean(0)
        rater_from_end = [t_t.size(0) - i for i in (m > m.mean()).nonzero()[:, 0].tolist()]
        h, pos = h[None], torch.arange(ids.size(1))[None]
        full = h.size(1)
        src = [i - start if img[i] else None for i in range(ids.size(1))]  # None: text; -1: a merged token
        per_layer, inputs = [], []
        for j, layer in enumerate(lm.layers):
            t = h.size(1)
            per_layer.append(sum(v is not None for v in src))
            inputs.append((h, pos, t if positions == "renumber" else full))
            mask = torch.zeros(t, t).masked_fill(~torch.ones(t, t).tril().bool(), torch.finfo(torch.float32).min)
            cos, sin = lm.rotary_emb(h, pos)
            out = layer(h, attention_mask=mask[None, None], position_ids=pos, position_embeddings=(cos, sin))
            if j + 1 in layers:
                att = layer.self_attn
                hn = layer.input_layernorm(h)
                q = att.q_proj(hn).view(1, t, -1, att.head_dim).transpose(1, 2)
                k = att.k_proj(hn).view(1, t, -1, att.head_dim).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
                w = (q @ k.transpose(-1, -2)) / att.head_dim ** 0.5 + torch.full((t, t), float("-inf")).triu(1)
                a = w.softmax(-1, dtype=torch.float32).mean(1)[0]  # (T, T)
                vis = [i for i in range(t) if src[i] is not None]
                rel = a[[t - r for r in rater_from_end]][:, vis].mean(0)  # (N_v,)
                kept = set(rel.topk(min(counts[layers.index(j + 1)], len(vis) - 1)).indices.tolist())
                deleted = sorted(set(range(len(vis))) - kept, key=lambda i: -float(rel[i]))  # best first, stable
                cand = deleted[: int(len(deleted) * 0.3) + 1]
                merged, centres = _density_peaks(out[0, [vis[i] for i in cand]], len(cand) // 10 + 1)
                if positions == "renumber":  # before the image, kept image tokens, merged ones, the text after
                    before = [i for i in range(t) if src[i] is None and i < vis[0]]
                    after = [i for i in range(t) if src[i] is None and i > vis[-1]]
                    middle = [vis[i] for i in sorted(kept)]
                    rows = [out[0, i] for i in before + middle] + merged + [out[0, i] for i in after]
                    src = [src[i] for i in before + middle] + [-1] * len(merged) + [src[i] for i in after]
                    out, pos = torch.stack(rows)[None], torch.arange(len(rows))[None]
                else:
                    at_centre = {vis[cand[c]]: merged[q] for q, c in enumerate(centres)}
                    keep = [i for i in range(t) if src[i] is None or i in at_centre or vis.index(i) in kept]
                    for i, v in at_centre.items():
                        out[0, i], src[i] = v, -1
                    out, pos, src = out[:, keep], pos[:, keep], [src[i] for i in keep]
            h = out
        kept = sorted(v for v in src if v is not None and v >= 0)
        return kept, per_layer, model.lm_head(lm.norm(h[:, -1]))[0], inputs


@pytest.mark.parametrize("seed", [0, 1])
def test_sparsevlm_equals_a_direct_restatement_of_the_reference(seed):
    """64 image tokens, a 4-layer grouped-query LLM, stages before layers 1 and 3 keeping 12 and 4: 12 + 2 merged
    (16 recycled of 52) then 4 + 1: the same kept tokens, counts, logits and next-token logits after one decoding
    step as the restatement, with the reference's placement and positions by default and the variant's with
    `positions=original`; the two differ."""
    model = tiny_llava(image_size=64, llm_layers=4, kv_heads=2, seed=seed)
    ids, mask, pixels = tiny_batch(model, 1, seed=seed + 11)
    got = {}
    for positions in ("renumber", "original"):
        args = {} if positions == "renumber" else {"positions": "original"}
        red = ReducedLlava(model, create_reducer("sparsevlm", counts=(12, 4), layers=(1, 3), **args))
        state = red.prefill(ids, mask, pixels)
        kept, per_layer, logits, inputs = _sparsevlm_restated(model, ids, pixels, (1, 3), (12, 4), positions)
        assert state.trace.visual_tokens[0].tolist() == per_layer == [64, 14, 14, 5]
        _matches_restatement(red, state, 64, kept, logits, inputs)
        got[positions] = (kept, logits)
    assert got["renumber"][0] != got["original"][0] or not torch.allclose(got["renumber"][1], got["original"][1])


def test_sparsevlm_rows_equal_eager_attention():
    """The text tokens' rows the adapter hands SparseVLM at its first stage are HF's eager attention maps of the
    layer below at those rows and the image's columns (a left-padded batch of three)."""
    model = tiny_llava(llm_layers=3, kv_heads=2, seed=2, attn="eager")
    ids, mask, pixels = tiny_batch(model, 3, seed=4)
    reducer = create_reducer("sparsevlm", counts=(4,), layers=(2,))
    seen = tokens_seen(reducer)
    ReducedLlava(model, reducer).prefill(ids, mask, pixels)
    text = seen[0].text
    with torch.no_grad():
        att = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_attentions=True).attentions[1]
    for i in range(3):
        img = (ids[i] == 5).nonzero()[:, 0]
        after = torch.arange(int(img[-1]) + 1, ids.size(1))
        want = att[i].mean(0)[after][:, img]  # (M_i, N)
        got = text.attn[i][text.valid[i]]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
