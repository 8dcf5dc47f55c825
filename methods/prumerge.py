"""PruMerge and PruMerge+ (Shang, Cai et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large
Multimodal Models", arXiv 2403.15388, ICCV 2025).

Site: features (vision features before the projector). Signals: `cls_attn` and `keys` of the vision layer that
consumes LLaVA's features (layer 23 of LLaVA-1.5's 24-layer tower), computed as the reference does: one fused head
over the full q/k width, scaled by 1/sqrt(width), softmax over CLS and every patch.

1. How many: `budget="auto"` is the reference's adaptive rule, the number of CLS-attention values above
   Q3 + 1.5 IQR (linear-interpolated quartiles). A numeric budget B keeps B - 1 tokens so that, with the extra
   token below, the LLM sees exactly B visual tokens.
2. Which: the top tokens by CLS attention, in descending-attention order (as the reference hands them to the LLM).
   PruMerge+ adds spatially uniform tokens after them (below).
3. Merge: each kept token adds sum_j a_j x_j over its 32 nearest neighbours j by key cosine similarity among all
   other tokens (kept and pruned), a_j their CLS attention; not normalised, as the reference.
4. One extra token, sum_j a_j x_j over every pruned token, goes last.

PruMerge+ (`prumerge_plus`), auto: after the IQR top-k, with ratio = k / N, the flat indices
arange(0, N - 1, int(int(1 / ratio) / 3)) not already kept are appended (ascending), then merging runs over all.

Differs from the reference code:
* the IQR count is computed per image; the reference pools the quartiles over the whole batch, which makes an
  image's token count depend on its batch-mates;
* auto mode keeps at least one token (the reference crashes, PruMerge+, or keeps none when no value is an
  outlier), and PruMerge+'s stride is at least 1 (the reference fails when ratio > 1/3 makes it 0);
* numeric budgets are our addition (the reference is adaptive or a fixed 1/8 ratio); they must be >= 2 (B - 1
  chosen tokens plus the summary token; a budget of 1 is an error, not an empty selection). PruMerge+ with budget
  B keeps k = ceil((B - 1) / 4) tokens by attention (the reference's ~1:3 split between attention and spatial
  tokens) and B - 1 - k spatial tokens on the flat grid of step max(1, (N - 1) // (B - 1 - k)), lowest indices
  first; where that grid overlaps the attention picks, the next tokens by attention fill the gap;
* batched and vectorised (the reference loops over tokens in Python, and its PruMerge+ handles batch size 1 only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from methods._ops import gather_tokens
from methods._registry import register_reducer
from methods.base import Reduced, TokenReducer, Tokens


def iqr_outlier_count(cls_attn: Tensor) -> Tensor:
    """(B, N) attention -> (B,) number of values above Q3 + 1.5 IQR in each row (linear-interpolated quartiles)."""
    q1, q3 = torch.quantile(cls_attn.float(), torch.tensor([0.25, 0.75], device=cls_attn.device), dim=1)  # (B,)
    return (cls_attn.float() > (q3 + 1.5 * (q3 - q1)).unsqueeze(1)).sum(1)


def plus_stride(k: Tensor, n: int) -> Tensor:
    """(B,) kept counts -> (B,) PruMerge+ flat stride int(int(1 / ratio) / 3), ratio = k / n, at least 1."""
    ratio = k.double().clamp(min=1) / n
    return torch.div(torch.floor(1.0 / ratio), 3, rounding_mode="floor").long().clamp(min=1)


def merge_neighbours(x: Tensor, keys: Tensor, cls_attn: Tensor, keep: Tensor, neighbours: int = 32) -> Tensor:
    """Each kept token plus the attention-weighted sum of its nearest neighbours by key cosine similarity.

    Args:
        x: (B, N, D) features; keys: (B, N, Dk); cls_attn: (B, N); keep: (B, K) source indices.
        neighbours: how many of the other N - 1 tokens each kept token absorbs (at most N - 1).

    Returns:
        (B, K, D): x_keep + sum_{j in nn(keep)} a_j x_j (not normalised).
    """
    kn = F.normalize(keys.float(), dim=-1)  # (B, N, Dk)
    sim = gather_tokens(kn, keep) @ kn.transpose(1, 2)  # (B, K, N)
    sim = sim.scatter(2, keep.unsqueeze(-1), float("-inf"))  # not itself
    nb = sim.topk(min(neighbours, x.size(1) - 1), dim=2).indices  # (B, K, M)
    b, k, m = nb.shape
    weights = cls_attn.gather(1, nb.flatten(1)).view(b, k, 1, m).to(x.dtype)  # (B, K, 1, M)
    pulled = gather_tokens(x, nb.flatten(1)).view(b, k, m, -1)  # (B, K, M, D)
    return gather_tokens(x, keep) + (weights @ pulled).squeeze(2)


def merge_macs(n: int, kept: Tensor, dim: int, key_dim: int, neighbours: int) -> Tensor:
    """(B,) MACs of `merge_neighbours` + `extra_token` for `kept` (B,) chosen tokens of n: similarities K N Dk,
    neighbour sums K M D, the extra token N D."""
    m = min(neighbours, n - 1)
    return kept * (n * key_dim + m * dim) + n * dim


def extra_token(x: Tensor, cls_attn: Tensor, kept: Tensor) -> Tensor:
    """(B, N, D), (B, N), (B, N) bool kept -> (B, 1, D) sum of a_j x_j over the pruned tokens."""
    w = cls_attn.to(x.dtype).masked_fill(kept, 0.0)  # (B, N)
    return (w.unsqueeze(1) @ x)  # (B, 1, D)


class _PruMergeBase(TokenReducer):
    """Shared body: subclasses choose the kept tokens (`select`), merging and the extra token are common."""

    needs = frozenset({"cls_attn", "keys"})
    supports_auto = True

    def __init__(self, budget: int | str = "auto", neighbours: int = 32) -> None:
        super().__init__(budget)
        if not self.auto and self.budget < 2:
            raise ValueError(f"{self.name}: budget {self.budget} is too small: it keeps budget - 1 tokens by "
                             "attention plus one token summarising the rest; give a budget >= 2")
        if neighbours < 1:
            raise ValueError(f"{self.name}: neighbours must be >= 1 (tokens each kept token absorbs), got {neighbours}")
        self.neighbours = neighbours


    def select(self, cls_attn: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N) attention -> kept source indices (B, M) in output order, and their validity (B, M)."""
        raise NotImplementedError

    def forward(self, t: Tokens) -> Reduced:
        if t.valid is not None:
            raise NotImplementedError(f"{self.name} expects every image to arrive with all its patches")
        b, n = t.cls_attn.shape
        if not self.auto and self.budget >= n:  # the whole image fits the budget: every patch, unmerged
            keep = torch.arange(n, device=t.x.device).expand(b, n)
            return Reduced(x=t.x, keep=keep, macs=torch.zeros(b, dtype=torch.long, device=t.x.device))
        keep, valid = self.select(t.cls_attn)  # (B, M); M: budget - 1, or the largest IQR count (then padded)
        merged = merge_neighbours(t.x, t.keys, t.cls_attn, keep, self.neighbours)  # (B, M, D)
        kept_mask = torch.zeros_like(t.cls_attn, dtype=torch.bool).scatter(1, keep, valid)  # (B, N)
        x = torch.cat([merged, extra_token(t.x, t.cls_attn, kept_mask)], 1)  # (B, M + 1, D)
        keep = torch.cat([keep, keep.new_full((keep.size(0), 1), -1)], 1)  # the extra token has no single source
        macs = merge_macs(t.x.size(1), valid.sum(1), t.x.size(2), t.keys.size(2), self.neighbours)  # (B,)
        if not self.auto:  # exactly budget - 1 chosen per image: no padding
            return Reduced(x=x, keep=keep, macs=macs)
        return Reduced(x=x, keep=keep, valid=torch.cat([valid, valid.new_ones(valid.size(0), 1)], 1), macs=macs)

    def _slots(self, n: int, counts: Tensor | None = None) -> int:
        """Output slots before the extra token: budget - 1, or in auto mode the largest count of the batch (one host
        sync; shorter rows are padded and marked invalid)."""
        return int(counts.max()) if self.auto else min(self.budget - 1, n)

    def _counts(self, cls_attn: Tensor) -> Tensor:
        """(B,) tokens chosen by attention: the IQR outlier count (auto), at least 1, or budget - 1."""
        if self.auto:
            return iqr_outlier_count(cls_attn).clamp(min=1)
        return torch.full(cls_attn.shape[:1], self.budget - 1, device=cls_attn.device).clamp(max=cls_attn.size(1))


def _ordered(keys: Tensor, chosen: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """The `chosen` (B, N) entries first, sorted by `keys` (B, N) ascending; the first m slots and their validity."""
    # the callers' keys lie in [0, 2N): adding 4N puts every entry that is not chosen after every chosen one
    order = torch.where(chosen, keys, keys + 4 * keys.size(1)).argsort(dim=1)[:, :m]  # (B, M)
    return order, chosen.gather(1, order)


@register_reducer("prumerge")
class PruMerge(_PruMergeBase):
    """Top tokens by CLS attention (IQR count or budget - 1), neighbour merging, one extra token."""

    def select(self, cls_attn: Tensor) -> tuple[Tensor, Tensor]:
        rank = cls_attn.argsort(dim=1, descending=True).argsort(dim=1)  # (B, N) 0 = most attended
        counts = self._counts(cls_attn)  # (B,)
        return _ordered(rank.double(), rank < counts.unsqueeze(1), self._slots(n=cls_attn.size(1), counts=counts))


@register_reducer("prumerge_plus")
class PruMergePlus(_PruMergeBase):
    """PruMerge plus spatially uniform tokens (flat stride), appended after the attention-ranked ones."""

    def select(self, cls_attn: Tensor) -> tuple[Tensor, Tensor]:
        b, n = cls_attn.shape
        idx = torch.arange(n, device=cls_attn.device).expand(b, n)
        rank = cls_attn.argsort(dim=1, descending=True).argsort(dim=1)  # (B, N)
        if self.auto:
            k = self._counts(cls_attn)  # (B,)
            top = rank < k.unsqueeze(1)
            grid = (idx % plus_stride(k, n).unsqueeze(1) == 0) & (idx < n - 1) & ~top
            total = self._slots(n, (top | grid).sum(1))
        else:
            total = self._slots(n)
            k_attn = -(-total // 4)  # ceil((B - 1) / 4)
            top = rank < k_attn
            spatial = total - k_attn
            step = max(1, (n - 1) // max(spatial, 1))
            on_grid = (idx % step == 0) & (idx < n - 1) & ~top
            # spatial picks: grid tokens, lowest index first, then (if the grid ran short) the next by attention
            # (grid entries < N, the others N + rank < 2N; 4N: attention-ranked tokens are never spatial picks)
            prio = torch.where(on_grid, idx.double(), n + rank.double()).masked_fill(top, 4 * n)
            grid = prio.argsort(dim=1).argsort(dim=1) < spatial
            grid = grid & ~top
        keys = torch.where(top, rank.double(), n + idx.double())  # attention-ranked first, then spatial by index
        return _ordered(keys, top | grid, total)
