"""CDPruner (cdpruner.py): a hand-computed case, a direct restatement of the reference code on real-shaped inputs, and
the same restatement on the features and question embeddings HF's own modules give a model."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from methods import Tokens, create_reducer
from methods.base import TextTokens
from methods.llava import ReducedLlava
from tests.conftest import IMAGE_TOKEN, tiny_batch, tiny_llava


def question(e: Tensor) -> TextTokens:
    return TextTokens(valid=torch.ones(e.shape[:2], dtype=torch.bool), embeds=e)


def test_cdpruner_picks_by_hand():
    """Tokens (1, 0), (0, 1), (1, 1) and one text embedding (1, 0). Cosines to the text 1, 0, 0.707; the reference's
    relevance is their negation, min-max normalised: r = (1e-6, 1 + 1e-6, 0.293 + 1e-6). The kernel's diagonal r^2
    makes token 1 the first pick; its Cholesky row is e_i = S_1i r_i = (0, r_1, 0.707 r_2), which leaves token 2 the
    gain r_2^2 / 2 = 0.043 against token 0's 1e-12: token 2 next. Without the sign flip (our variant) r = (1 + 1e-6,
    1e-6, 0.707 + 1e-6): token 0 first, then token 2 (gain 0.25 against 1e-12)."""
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    text = question(torch.tensor([[[1.0, 0.0]]]))
    out = create_reducer("cdpruner", 2)(Tokens(x=x, grid=(1, 3), text=text))
    assert out.keep.tolist() == [[1, 2]]
    torch.testing.assert_close(out.x, x[:, [1, 2]])
    assert out.macs.tolist() == [3 * 3 * 2 + 3 * 1 * 2 + 0]  # similarity, relevance; a 2-pick greedy has no row update
    assert create_reducer("cdpruner", 2, negate=False)(Tokens(x=x, grid=(1, 3), text=text)).keep.tolist() == [[0, 2]]
    assert create_reducer("cdpruner", 3)(Tokens(x=x, grid=(1, 3), text=text)).keep.tolist() == [[0, 1, 2]]
    # per-sample budgets and padding: sample 1 has tokens 0-1 only and a budget of 1; padding is outside min and max
    two = torch.cat([x, x])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    out = create_reducer("cdpruner", 2)(Tokens(x=two, grid=(1, 3), valid=valid, budget=torch.tensor([2, 1]),
                                               text=question(torch.tensor([[[1.0, 0.0]]] * 2))))
    kept = [row[v].tolist() for row, v in zip(out.keep, out.valid, strict=True)]
    assert kept == [[1, 2], [1]]  # among tokens 0-1: r = (1e-6, 1 + 1e-6), token 1


def _cdpruner_restated(image_features: Tensor, image_embeds: Tensor, text_embeds: Tensor, budget: int) -> list[int]:
    """The reference's `encode_images` (Theia-4869/CDPruner 9541616, llava/model/llava_arch.py), one image, written
    out as it runs: the unit rows in the model's dtype then float32, the negated mean cosine to the text min-max
    normalised over the batch, the kernel, and `budget` rounds of the fast greedy with its (T, B, N) Cholesky rows
    and no clamp; the picks sorted."""
    x = image_features.unsqueeze(0)  # (1, N, D): the batch of one the reference runs
    xn = (x / x.norm(dim=-1, keepdim=True)).float()
    similarity = xn @ xn.transpose(1, 2)
    v = image_embeds.unsqueeze(0) / image_embeds.norm(dim=-1, keepdim=True)
    e = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = (-(v @ e.t())).mean(-1)  # (1, N)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    n = x.size(1)
    cis = torch.zeros(budget, 1, n)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    picks = []
    for i in range(budget):
        j = int(torch.argmax(di2s[0]))
        picks.append(j)
        eis = (kernel[0, j] - torch.einsum("t,tn->n", cis[:i, 0, j], cis[:i, 0])) / math.sqrt(float(di2s[0, j]))
        cis[i, 0] = eis
        di2s[0] = di2s[0] - eis.square()
        di2s[0, j] = -float("inf")
    return sorted(picks)


def test_cdpruner_equals_a_direct_restatement_of_the_reference_code_real_shaped():
    """LLaVA-1.5-7B's shapes: 576 projected tokens of width 4096, a 12-token question, 64 kept; the tokens share an
    offset, as real ones do. Relevance embeddings are the tokens themselves, as this port uses them."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(576, 4096, generator=g) + 2 * torch.randn(1, 4096, generator=g)
    text = torch.randn(12, 4096, generator=g)
    out = create_reducer("cdpruner", 64)(Tokens(x=x.unsqueeze(0), grid=(24, 24), text=question(text.unsqueeze(0))))
    assert out.keep[0].tolist() == _cdpruner_restated(x, x, text, 64)


def test_cdpruner_through_the_adapter_equals_the_restatement_on_hf_modules():
    """On a random LLaVA, batch of two prompts: each sample's kept tokens are the restatement's over the projector's
    output (HF's vision tower with hidden states, then the projector) and the LLM's embeddings of the prompt's tokens
    after the image."""
    model = tiny_llava(seed=2)
    ids, mask, pixels = tiny_batch(model, 2, seed=4)
    run = ReducedLlava(model, create_reducer("cdpruner", 5))
    with torch.no_grad():
        state = run.prefill(ids, mask, pixels)
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        feats = model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 1:])  # (B, 16, D)
        for b in range(2):
            real = ids[b][mask[b].bool()]
            after = real[int((real == IMAGE_TOKEN).nonzero().max()) + 1 :]
            text = model.model.language_model.embed_tokens(after)
            assert state.trace.sample(b, 16)["kept_indices"] == _cdpruner_restated(feats[b], feats[b], text, 5)
