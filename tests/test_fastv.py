"""FastV (fastv.py): hand-computed cases, and every token kept equals `full`."""

from __future__ import annotations

import pytest
import torch

from methods import Tokens, create_reducer
from methods.llava import ReducedLlava
from tests.conftest import tiny_batch


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


def test_fastv_with_every_token_equals_full(tiny_model):
    ids, mask, pixels = tiny_batch(tiny_model, 3, seed=12)
    full = ReducedLlava(tiny_model, create_reducer("full")).generate(ids, mask, pixels, 6, eos_token_id=2)
    fastv = ReducedLlava(tiny_model, create_reducer("fastv", 16, layer=2)).generate(ids, mask, pixels, 6,
                                                                                   eos_token_id=2)
    assert torch.equal(full.tokens, fastv.tokens)
    torch.testing.assert_close(full.first_logits, fastv.first_logits, atol=1e-5, rtol=1e-5)
