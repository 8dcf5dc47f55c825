"""VisPruner (vispruner.py): hand-computed cases and a direct restatement of the reference code."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from methods import Tokens, create_reducer
from methods.vispruner import thin_duplicates


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
