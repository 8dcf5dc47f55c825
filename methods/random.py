"""Random: a uniform random subset of exactly `budget` patches per sample, the control every method must beat.

Not from a paper as such; random pruning is the baseline that UniPruneBench (arXiv 2511.02650) and others found
surprisingly strong. Site: features. Removes tokens; keeps the survivors in their original order.

How "random" is made batch-invariant: a shared random stream would give a sample a different subset depending on
its position in the batch, so predictions would change with `--batch-size`. Instead each patch gets a 32-bit hash
of (the sample's pixel key, the patch index, the seed), and the `budget` smallest hashes win. The hash is a
bijective integer mixer, so the subset is uniform over patches, independent between samples, identical for the
same image in any batch, and changes with `seed`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from methods._ops import gather_tokens, mix32, sample_budgets, select_top
from methods._registry import register_reducer
from methods.base import Reduced, TokenReducer, Tokens


def hashed_scores(sample_key: Tensor, n: int, seed: int) -> Tensor:
    """(B,) keys -> (B, N) pseudo-random 32-bit scores, a function of (key, patch index, seed) only."""
    pos = torch.arange(n, device=sample_key.device)  # (N,)
    # the two offsets are arbitrary odd 32-bit constants (the golden-ratio constant of Fibonacci hashing, and
    # another) that keep seed 0 and patch 0 from hashing to mix32(0) = 0; any fixed values would do
    h = mix32(sample_key.unsqueeze(1) ^ mix32(torch.full_like(pos, seed) + 0x9E3779B9))  # (B, 1)
    return mix32(h ^ mix32(pos + 0x7F4A7C15))  # (B, N)


@register_reducer("random")
class Random(TokenReducer):
    """Seeded uniform random subset of `budget` patches per sample."""

    seeded = True

    def __init__(self, budget: int, seed: int = 0) -> None:
        super().__init__(budget)
        self.seed = seed


    def forward(self, t: Tokens) -> Reduced:
        b, n, _ = t.x.shape
        k = self.budget if t.budget is None else sample_budgets(self.budget, t.budget, n, b, t.x.device)
        if t.sample_key is None:
            raise ValueError("random needs Tokens.sample_key (the adapter sets it from the pixels)")
        scores = hashed_scores(t.sample_key, n, self.seed).double()  # (B, N)
        keep, valid = select_top(scores, min(k, n) if isinstance(k, int) else k, t.valid)
        return Reduced(x=gather_tokens(t.x, keep), keep=keep, valid=valid)  # (B, K, D)
