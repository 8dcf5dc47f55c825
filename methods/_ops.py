"""Small tensor helpers shared by the adapter and the methods. All batched and sync-free."""

from __future__ import annotations

import torch
from torch import Tensor


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """(B, N, D), (B, K) long -> (B, K, D)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.size(-1)))


def running_index(mask: Tensor) -> Tensor:
    """(B, T) long: each True entry's index among the True entries of its row (0, 1, ...); 0 before the first."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def pack_true(mask: Tensor, right: bool = False) -> tuple[Tensor, Tensor]:
    """Indices of the True entries of each row, in their original order, packed into M = max row count slots.

    Args:
        mask: (B, T) bool.
        right: pack to the right end (left padding, as a left-padded prompt) instead of the left end.

    Returns:
        idx: (B, M) long positions into T (padding slots point at some position whose value must be ignored).
        valid: (B, M) bool, False on padding slots.
    """
    counts = mask.sum(1)  # (B,)
    m = int(counts.max()) if mask.numel() else 0
    key = mask.to(torch.int8) if right else (~mask).to(torch.int8)
    order = key.argsort(dim=1, stable=True)  # (B, T): wanted entries last (right) or first (left), order kept
    slot = torch.arange(m, device=mask.device)
    if right:
        idx = order[:, mask.size(1) - m :]
        valid = slot.unsqueeze(0) >= (m - counts).unsqueeze(1)
    else:
        idx = order[:, :m]
        valid = slot.unsqueeze(0) < counts.unsqueeze(1)
    return idx, valid


def sample_budgets(budget: int, per_sample: Tensor | None, n: int, batch: int, device: torch.device) -> Tensor:
    """(B,) tokens to keep per sample: the per-sample override if given, else `budget`; clamped to [1, n]."""
    k = per_sample if per_sample is not None else torch.full((batch,), budget, device=device)
    return k.to(device=device, dtype=torch.long).clamp(1, n)


def budget_groups(k: Tensor) -> list[tuple[int, Tensor]]:
    """The samples of each distinct budget in `k` (B,): [(budget, (b',) row indices)], for methods whose steps
    depend on the count (they run each group as one batch)."""
    return [(budget, (k == budget).nonzero().flatten()) for budget in k.unique().tolist()]


def select_top(scores: Tensor, k: Tensor | int, valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Keep the k highest-scoring tokens of each row, returned in original token order.

    Args:
        scores: (B, N).
        k: int, or (B,) long per-sample counts (output is padded to the largest; one host sync to size it).
        valid: (B, N) bool; invalid tokens are never kept.

    Returns:
        keep: (B, K) ascending source indices.
        keep_valid: (B, K) bool, or None when every row keeps K tokens.
    """
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    kmax = k if isinstance(k, int) else int(k.max())
    kmax = min(kmax, scores.size(1))
    top = scores.topk(kmax, dim=1).indices  # (B, K) best first
    if isinstance(k, int) and valid is None:
        return top.sort(dim=1).values, None
    rank_ok = (torch.arange(kmax, device=scores.device).unsqueeze(0)
               < torch.as_tensor(k, device=scores.device).view(-1, 1))
    if valid is not None:
        rank_ok = rank_ok & valid.gather(1, top)
    order = torch.where(rank_ok, top, top + scores.size(1)).argsort(dim=1)  # kept ones first, by position
    keep, keep_valid = top.gather(1, order), rank_ok.gather(1, order)
    return keep, None if bool(keep_valid.all()) else keep_valid


def select_picks(order: Tensor, k: Tensor, n: int, valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The first k[b] picks of each row of a greedy's pick order, returned in original token order (`select_top`'s
    output).

    Args:
        order: (B, Kmax) long indices into N, first pick first (Kmax = k.max()).
        k: (B,) long picks to keep per row.
        n: N, the tokens picked from.
        valid: (B, N) bool; invalid tokens are never kept.
    """
    b, kmax = order.shape
    step = torch.arange(kmax, device=order.device).expand(b, -1)  # (B, Kmax)
    # the first k picks of each row rank kmax, kmax-1, ...; later picks go to a dropped column N
    rank = torch.full((b, n + 1), float("-inf"), device=order.device)
    rank.scatter_(1, torch.where(step < k.unsqueeze(1), order, n), (kmax - step).to(rank.dtype))
    return select_top(rank[:, :n], k, valid)


def mix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding 32-bit values: a bijective bit mixer."""
    m = 0xFFFFFFFF
    h = h & m
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & m  # int64 products wrap; the low 32 bits are exact
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & m
    return h ^ (h >> 16)


def pixel_key(pixel_values: Tensor) -> Tensor:
    """(B, C, H, W) -> (B,) int64 key computed exactly from each image's pixels (identical in any batch)."""
    # pixels quantised to 8 bits (exact in any dtype the image arrives in), each weighted by its position, modulo
    # two primes below 2**16 so the weighted sum fits int64 for any image size
    q = (pixel_values.float() * 255).round().long().flatten(1) % 65521  # (B, P)
    w = torch.arange(q.size(1), device=q.device) % 65519 + 1
    return mix32((q * w).sum(1))


def additive_mask(key_mask: Tensor, q_len: int, dtype: torch.dtype) -> Tensor:
    """(B, S) real-key mask -> (B, 1, q_len, S) additive mask for the last q_len positions of the sequence.

    Causal over sequence order, padding keys masked. A query may always see itself, so rows of padding queries stay
    finite (their outputs are never used, but a NaN there would leak through later matmuls).
    """
    s = key_mask.size(1)
    qi = torch.arange(s - q_len, s, device=key_mask.device).unsqueeze(1)  # (q, 1)
    kj = torch.arange(s, device=key_mask.device).unsqueeze(0)  # (1, S)
    allowed = ((kj <= qi).unsqueeze(0) & key_mask.unsqueeze(1)) | (kj == qi).unsqueeze(0)  # (B, q, S)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)
