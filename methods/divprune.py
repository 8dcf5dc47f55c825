"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR 2025,
arXiv 2503.02175).

Site: embeddings (the projector's outputs, the LLM's input embeddings of the visual tokens), before they are spliced
into the prompt. Query-agnostic, no attention signal. Pruning as a Max-Min Diversity Problem under the cosine
distance d(i, j) = 1 - cos(x_i, x_j), solved greedily:

1. the first token is the one farthest from its nearest neighbour (the largest min over j != i of d(i, j));
2. each next token is the remaining one farthest from the set chosen so far (the largest min over the chosen j of
   d(i, j)), until `budget` tokens are chosen.

The chosen tokens go on in their original order, unchanged (pure pruning); the prompt is then spliced as if the image
had only those tokens (contiguous position ids), as the reference does by handing LLaVA the pruned features.

Reference code: vbdi/divprune, `LLaVA/llava/model/llava_arch.py` (`DivPrune()`), CC BY-NC 4.0, so it was not read
and nothing here is taken from it (its README was, at commit a6889f7): this is written from the paper's algorithm
and checked against a direct re-statement of it (`tests/test_methods.py`); the Apache-2.0 port in
ModelTC/LightCompress (`llmc/compression/token_reduction/divprune.py`, an excerpt from a code index, commit not
recorded there) was read to confirm the first pick (each column's second-smallest distance, i.e. the nearest other
token). The reference's budget is
`round(ratio * 576)` (default ratio 0.098, 56 tokens); here `budget` is the count itself.

Differs from the reference code:
* the first pick's nearest-neighbour distance excludes the token itself explicitly (the reference takes the second
  smallest distance of each column, which is the same unless rounding puts an exact duplicate below the self-distance);
* chosen tokens are excluded from later picks (the paper's greedy over the remaining set; the reference relies on a
  chosen token's self-distance being about 0);
* distances are computed in float32 whatever the model's dtype (the reference uses the model's dtype, fp16 on GPU),
  so near-ties can resolve differently in half precision;
* batched, with per-sample budgets and padding (the reference handles one image at a time).

MACs: the similarity matrix, N x N x D per sample (the greedy updates are element-wise; `flops/analytic.py` counts
matmul-like work only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from methods._ops import gather_tokens, sample_budgets, select_picks
from methods._registry import register_reducer
from methods.base import Reduced, Site, TokenReducer, Tokens


def max_min_order(x: Tensor, k: int, valid: Tensor | None = None) -> Tensor:
    """Greedy max-min diversity under the cosine distance: the first `k` picks of each sample, in pick order.

    Args:
        x: (B, N, D) tokens.
        k: picks per sample (at most the number of valid tokens of every sample).
        valid: (B, N) bool, False on padding (never picked, never a neighbour).

    Returns:
        (B, k) long indices into N, first pick first.
    """
    b, n, _ = x.shape
    xn = F.normalize(x.float(), dim=-1)
    dist = 1.0 - xn @ xn.transpose(1, 2)  # (B, N, N) cosine distance
    excluded = torch.eye(n, dtype=torch.bool, device=x.device).unsqueeze(0)  # (1, N, N): a token is not its neighbour
    if valid is not None:
        excluded = excluded | ~valid.unsqueeze(1)  # padding is nobody's neighbour
    nearest = dist.masked_fill(excluded, float("inf")).amin(-1)  # (B, N) distance to the nearest other token
    free = torch.ones(b, n, dtype=torch.bool, device=x.device) if valid is None else valid.clone()  # (B, N)
    rows = torch.arange(b, device=x.device)
    score, picks = nearest, []
    for _ in range(k):  # sequential by definition: each pick depends on the ones before
        pick = score.masked_fill(~free, float("-inf")).argmax(-1)  # (B,) first index among equals
        picks.append(pick)
        free[rows, pick] = False
        from_pick = dist[rows, pick]  # (B, N) distances to the new pick
        score = from_pick if len(picks) == 1 else torch.minimum(score, from_pick)
    return torch.stack(picks, 1) if picks else torch.zeros(b, 0, dtype=torch.long, device=x.device)


@register_reducer("divprune")
class DivPrune(TokenReducer):
    """Keep the most diverse projected tokens: greedy max-min cosine distance (query-agnostic)."""

    site = Site.EMBEDDINGS

    def __init__(self, budget: int) -> None:
        super().__init__(budget)


    def forward(self, t: Tokens) -> Reduced:
        b, n, d = t.x.shape
        counts = torch.full((b,), n, device=t.x.device) if t.valid is None else t.valid.sum(1)  # (B,)
        k = torch.minimum(sample_budgets(self.budget, t.budget, n, b, t.x.device), counts)  # (B,) at most what is there
        kmax = int(k.max())
        order = max_min_order(t.x, kmax, t.valid)  # (B, Kmax) pick order
        keep, valid = select_picks(order, k, n, t.valid)  # (B, K) the first k picks, in original order
        macs = torch.full((b,), n * n * d, dtype=torch.long, device=t.x.device)  # the similarity matrix
        return Reduced(x=gather_tokens(t.x, keep), keep=keep, valid=valid, macs=macs)  # (B, K, D)
