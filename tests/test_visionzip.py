"""VisionZip (visionzip.py): hand-computed cases and a direct restatement."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from methods import Tokens, create_reducer
from methods.visionzip import split_budget


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
