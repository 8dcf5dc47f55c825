"""PruMerge and PruMerge+ (prumerge.py): hand-computed cases of each step."""

from __future__ import annotations

import pytest
import torch

from methods import Tokens, create_reducer
from methods.prumerge import extra_token, iqr_outlier_count, merge_neighbours, plus_stride


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
