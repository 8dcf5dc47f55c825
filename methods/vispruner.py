"""VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in
VLMs", ICCV 2025, arXiv 2412.01818: the later version of FasterVLM's paper, `methods/fastervlm.py`).

Site: features (before the projector). Query-agnostic, from visual cues only:

1. important tokens: the top ``int(budget * important_ratio)`` patches by the vision CLS token's head-averaged
   attention inside the feature layer (the signal FasterVLM uses, `feature_attn`);
2. diverse tokens: the other patches, in descending attention, are thinned until ``budget - important`` remain, in
   rounds: split the current list alternately into A (even places) and B (odd places), give each A token its
   highest cosine similarity to any B token (features normalised), and drop the (at most 8) A tokens most similar
   to B; the survivors of A (in descending similarity) followed by B make the next list.

The kept patches go on in original order, unchanged (pure pruning).

Reference code: Theia-4869/VisPruner, `llava/model/llava_arch.py` (`encode_images`, commit a089bff, Apache-2.0).
`important_ratio` is an argument of its evaluation scripts; 0.5 here, as in its README's examples (128 tokens at
0.5: 64 important + 64 diverse; also 0.75 for MME), and the `--important_ratio` default of the forks' evaluation
scripts in the code index (the official one is not there).

Differs from the reference code:
* any list length: the reference's indexing fails when a round's list has an odd length (an A token more than B);
  here the extra A token takes part like the others, and a lone A token with no B has similarity -inf;
* sorts are stable (ties keep the earlier place; the reference's `argsort` does not promise an order);
* the projector runs on the kept patches only (reference: on all, then masks);
* batched with per-sample budgets (samples of equal budget run together; the reference needs one budget per batch).

MACs: each round's A x B similarity matrix, ceil(R/2) x floor(R/2) x C for a list of R tokens of width C.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from methods._ops import budget_groups, gather_tokens, sample_budgets, select_top
from methods._registry import register_reducer
from methods.base import Reduced, TokenReducer, Tokens

ROUND = 8  # tokens dropped per round at most, as in the reference


def thin_duplicates(x: Tensor, order: Tensor, keep: int) -> tuple[Tensor, int]:
    """VisPruner's duplicate removal: shrink the list `order` to `keep` tokens, in rounds of at most `ROUND`.

    Args:
        x: (B, N, C) normalised features.
        order: (B, R) indices into N, the list to thin (most attended first).
        keep: tokens to keep (<= R).

    Returns:
        (B, keep) the surviving indices, in the order the rounds leave them, and the rounds' MACs per sample.
    """
    macs = 0
    while order.size(1) > keep:
        r = order.size(1)
        drop = min(ROUND, r - keep)
        a, b = order[:, ::2], order[:, 1::2]  # (B, ceil(R/2)), (B, floor(R/2))
        if b.size(1):
            sim = gather_tokens(x, a) @ gather_tokens(x, b).transpose(1, 2)  # (B, |A|, |B|)
            best = sim.amax(-1)  # (B, |A|) each A token's closest B token
            macs += a.size(1) * b.size(1) * x.size(-1)
        else:
            best = torch.full(a.shape, float("-inf"), device=x.device)
        survivors = best.argsort(dim=-1, descending=True, stable=True)[:, drop:]  # the least similar A tokens
        order = torch.cat([a.gather(1, survivors), b], 1)  # (B, R - drop)
    return order, macs


@register_reducer("vispruner")
class VisPruner(TokenReducer):
    """Important patches by the feature layer's CLS attention, then diverse ones by removing near-duplicates."""

    needs = frozenset({"feature_attn"})

    def __init__(self, budget: int, important_ratio: float = 0.5) -> None:
        if not 0.0 <= important_ratio <= 1.0:
            raise ValueError(f"vispruner: important_ratio is a share of the budget, in [0, 1], got {important_ratio}")
        super().__init__(budget)
        self.important_ratio = important_ratio


    def forward(self, t: Tokens) -> Reduced:
        b, n, _ = t.x.shape
        if t.valid is not None:
            raise ValueError("vispruner: the features site hands it every patch; padded inputs are not supported")
        k = sample_budgets(self.budget, t.budget, n, b, t.x.device)  # (B,)
        xn = F.normalize(t.x.float(), dim=-1)
        by_attention = t.feature_attn.argsort(dim=-1, descending=True, stable=True)  # (B, N)
        chosen = torch.zeros(b, n, dtype=torch.bool, device=t.x.device)
        macs = torch.zeros(b, dtype=torch.long, device=t.x.device)
        for budget, rows in budget_groups(k):  # samples of one budget run together
            important = int(budget * self.important_ratio)
            diverse, m = thin_duplicates(xn[rows], by_attention[rows, important:], budget - important)
            picked = torch.cat([by_attention[rows, :important], diverse], 1)  # (b', budget)
            chosen[rows] = chosen[rows].scatter(1, picked, torch.ones_like(picked, dtype=torch.bool))
            macs[rows] = m
        keep, valid = select_top(chosen.float(), k)  # (B, K) the chosen patches, in original order
        return Reduced(x=gather_tokens(t.x, keep), keep=keep, valid=valid, macs=macs)
