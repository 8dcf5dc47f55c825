"""Random (random.py): exact, seeded and batch-invariant."""

from __future__ import annotations

import torch

from methods import Tokens, create_reducer
from methods._ops import pixel_key
from methods.random import hashed_scores


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
