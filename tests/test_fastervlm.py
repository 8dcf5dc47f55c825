"""FasterVLM (fastervlm.py): hand-computed cases, and its signal read from the feature layer."""

from __future__ import annotations

import pytest
import torch

from methods import Reduced, TokenReducer, Tokens, create_reducer
from methods.llava import ReducedLlava
from tests.conftest import tiny_batch, tiny_llava


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
