"""DART (dart.py): hand-computed cases and a direct restatement of the reference code."""

from __future__ import annotations

import pytest
import torch

from methods import Tokens, create_reducer, get_reducer_class
from methods.base import TextTokens
from methods.llava import ReducedLlava
from tests.conftest import tiny_batch, tiny_llava


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
