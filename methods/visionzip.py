"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025,
arXiv 2412.04467).

Site: features (before the projector). Query-agnostic. The budget is split as the reference's configurations split
it (64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30: `contextual` = round(budget x 10 / 64), half up):

1. dominant tokens: the vision CLS token itself plus the ``budget - contextual - 1`` patches it attends to most in
   the layer that produces the features (softmax per head, heads summed; `feature_attn` is their mean, the same
   ranking), in original order;
2. contextual tokens: of the remaining patches (in index order), ``contextual`` targets at a uniform stride
   (``max(1, R // contextual)``, from the first); every other remaining patch joins the target whose key (that
   layer's keys, heads averaged, normalised) is most cosine-similar to its own, and each contextual token is its
   target's features plus the mean of its members' features.

Output: [CLS, dominant patches, contextual tokens]; the LLM sees exactly `budget` tokens. The CLS token is one of
them (LLaVA-1.5 otherwise drops it); it has no source patch (``keep = -1``), a contextual token counts as its target.

Reference code: dvlab-research/VisionZip at commit 3151f6d (Apache-2.0): `visionzip/clip_encoder.py`
(`CLIPVisionTower_VisionZip.forward`: dominant by `attentions[-2][:, :, 0, 1:]` summed over heads, the CLS token
prepended; the rest filtered in order; targets `arange(0, R, max(1, R // contextual))[:contextual]`; members assigned
by the argmax of normalised-key similarity; contextual = target + members' mean, counts clamped at 1) and
`visionzip/utils.py` (`CLIPAttention_forward`: the metric is the layer's raw k projection, heads averaged).

The budget counts the CLS token, as the reference's does: its "64" (dominant 54, contextual 10) is set up in
`main.py` with ``dominant - 1`` patches, so the LLM gets 53 patches, the CLS token and 10 contextual tokens = 64,
exactly as here (an earlier version of this docstring listed a 65-token difference that does not exist; issue 35).

Differs from the reference code:
* the attention row and the keys are read from the feature layer's own queries and keys by the adapter (no
  hooked attention class, no eager attention maps); values as `output_attentions` gives them (tested);
* `contextual` can be set (default: the reference's 10 : 54 split); budgets below 2 are refused;
* batched with per-sample budgets (samples of equal budget run together).

MACs: the members x targets key similarities (M x c x hd) and the members' features summed into their targets
(c x M x Dv), for M = remaining patches - c.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from methods._ops import budget_groups, gather_tokens, sample_budgets
from methods._registry import register_reducer
from methods.base import Reduced, TokenReducer, Tokens


def split_budget(budget: int, contextual: int | None) -> tuple[int, int]:
    """(dominant patches, contextual tokens) for `budget` tokens, one of them the CLS token."""
    c = int(budget * 10 / 64 + 0.5) if contextual is None else contextual
    c = min(c, budget - 1)
    return budget - c - 1, c


def merge_contextual(x: Tensor, keys: Tensor, rest: Tensor, c: int) -> tuple[Tensor, Tensor, int]:
    """VisionZip's contextual tokens from the remaining patches.

    Args:
        x: (B, N, D) features.
        keys: (B, N, hd) the feature layer's keys, heads averaged.
        rest: (B, R) the remaining patch indices, ascending.
        c: contextual tokens to make (<= R).

    Returns:
        (B, c, D) contextual tokens, (B, c) their target patch indices, and the MACs per sample.
    """
    r = rest.size(1)
    if c == 0:
        return x[:, :0], rest[:, :0], 0
    where = torch.arange(0, r, max(1, r // c), device=x.device)[:c]  # (c,) target places in `rest`
    member = torch.ones(r, dtype=torch.bool, device=x.device)
    member[where] = False
    targets, members = rest[:, where], rest[:, member]  # (B, c), (B, M)
    k = F.normalize(keys.float(), dim=-1)
    sim = gather_tokens(k, members) @ gather_tokens(k, targets).transpose(1, 2)  # (B, M, c)
    assign = F.one_hot(sim.argmax(-1), c).to(x.dtype)  # (B, M, c)
    counts = assign.sum(1).clamp(min=1).unsqueeze(-1)  # (B, c, 1)
    merged = assign.transpose(1, 2) @ gather_tokens(x, members) / counts  # (B, c, D) mean of each target's members
    m = members.size(1)
    return gather_tokens(x, targets) + merged, targets, m * c * (keys.size(-1) + x.size(-1))


@register_reducer("visionzip")
class VisionZip(TokenReducer):
    """CLS and the most CLS-attended patches, plus contextual tokens merged from the rest by key similarity."""

    needs = frozenset({"feature_attn", "feature_keys", "feature_cls"})

    def __init__(self, budget: int, contextual: int | None = None) -> None:
        super().__init__(budget)
        if self.budget < 2:
            raise ValueError(f"visionzip: budget must be >= 2 (the CLS token and at least one patch), got {budget}")
        if contextual is not None and (isinstance(contextual, bool) or not 0 <= contextual < self.budget):
            raise ValueError(f"visionzip: contextual must be in [0, budget - 1], got {contextual}")
        self.contextual = contextual


    def forward(self, t: Tokens) -> Reduced:
        b, n, d = t.x.shape
        if t.valid is not None:
            raise ValueError("visionzip: the features site hands it every patch; padded inputs are not supported")
        k = sample_budgets(self.budget, t.budget, n, b, t.x.device).clamp(min=2)  # (B,)
        kmax = int(k.max())
        x = t.x.new_zeros(b, kmax, d)
        keep = torch.full((b, kmax), -1, dtype=torch.long, device=t.x.device)
        valid = torch.zeros(b, kmax, dtype=torch.bool, device=t.x.device)
        macs = torch.zeros(b, dtype=torch.long, device=t.x.device)
        for budget, rows in budget_groups(k):  # samples of one budget run together
            p, c = split_budget(budget, self.contextual)
            p = min(p, n - c)  # leave the contextual step its targets
            dominant = t.feature_attn[rows].topk(p, dim=1).indices.sort(dim=1).values  # (b', p)
            is_rest = torch.ones(len(rows), n, dtype=torch.bool, device=t.x.device).scatter(
                1, dominant, torch.zeros_like(dominant, dtype=torch.bool))
            rest = is_rest.nonzero()[:, 1].view(len(rows), n - p)  # (b', R) ascending
            ctx, targets, m = merge_contextual(t.x[rows], t.feature_keys[rows], rest, c)
            cls = t.feature_cls[rows].unsqueeze(1).to(t.x.dtype)  # (b', 1, D)
            out = torch.cat([cls, gather_tokens(t.x[rows], dominant), ctx], 1)  # (b', budget', D)
            src = torch.cat([torch.full_like(dominant[:, :1], -1), dominant, targets], 1)
            w = out.size(1)
            x[rows, :w], keep[rows, :w], valid[rows, :w], macs[rows] = out, src, True, m
        return Reduced(x=x, keep=keep, valid=None if bool(valid.all()) else valid, macs=macs)
