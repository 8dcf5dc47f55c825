"""Small tensor helpers shared by the adapter and the methods. All batched and sync-free."""

from __future__ import annotations

import torch
from torch import Tensor


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """(B, N, D), (B, K) long -> (B, K, D)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.size(-1)))


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


def topk_sorted(scores: Tensor, k: int) -> Tensor:
    """(B, N) scores -> (B, k) indices of the k largest per row, sorted ascending (original token order)."""
    return scores.topk(k, dim=1).indices.sort(dim=1).values
