"""DivPrune (divprune.py): hand-computed cases and a direct restatement of the paper."""

from __future__ import annotations

import torch
from torch import Tensor

from methods import Tokens, create_reducer
from methods.divprune import max_min_order


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
