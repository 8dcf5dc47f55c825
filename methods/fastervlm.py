"""FasterVLM (Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster", arXiv 2412.01818).

Site: features (before the projector). Ranks the patches by the attention the vision encoder's CLS token pays them
inside the layer that produces LLaVA's features (layer -2 for LLaVA-1.5: HF's `attentions[-2]`), softmax per head
over CLS and every patch, averaged over heads, and keeps the top `budget` in their original order. Pure pruning;
query-agnostic.

Reference code: Theia-4869/FasterVLM, `llava/model/llava_arch.py` (`encode_images`, commit 29ed074, Apache-2.0):
`image_attentions.mean(dim=1)`, `topk`, then a boolean index mask over the patches, so the kept ones stay in order.
Its vision tower returns the CLS row of `attentions[-2]` (the tower's file is not in the code index; the row as
described in `shared/design/REFERENCE_METHODS.md`).

Differs from the reference code:
* the projector runs on the kept patches only; the reference projects all N and masks afterwards (same tokens,
  fewer projector FLOPs here);
* the attention row is computed from the layer's own queries and keys by the adapter instead of asking the encoder
  for every attention map (eager attention); the values are the same (tested against `output_attentions`);
* batched with per-sample budgets and padding.
"""

from __future__ import annotations

from methods._ops import gather_tokens, sample_budgets, select_top
from methods._registry import register_reducer
from methods.base import Reduced, TokenReducer, Tokens


@register_reducer("fastervlm")
class FasterVLM(TokenReducer):
    """Keep the patches the vision CLS token attends to most in the feature layer (heads averaged)."""

    needs = frozenset({"feature_attn"})

    def __init__(self, budget: int) -> None:
        super().__init__(budget)


    def forward(self, t: Tokens) -> Reduced:
        b, n, _ = t.x.shape
        k = min(self.budget, n) if t.budget is None else sample_budgets(self.budget, t.budget, n, b, t.x.device)
        keep, valid = select_top(t.feature_attn, k, t.valid)  # (B, K) ascending positions
        return Reduced(x=gather_tokens(t.x, keep), keep=keep, valid=valid)
