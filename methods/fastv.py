"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024, arXiv 2403.06764).

Site: LLM, before decoder layer `layer` (K, default 2). Ranks the image tokens by the attention the last prompt
token pays them at layer K-1, averaged over heads, and removes the rest from the sequence for layers K..L-1: the
sequence really gets shorter, the survivors keep their original position ids, layers below K keep the full KV
cache and layers from K on the reduced one; decoding continues from there with the kept set fixed (the HF-fork
"KV cache" variant of the reference). `budget` = image tokens kept from layer K on; `ratio` (R, the share of image
tokens dropped) is accepted instead, giving round(N * (1 - R)) as in the reference's HF fork.

Differs from the reference code:
* the ranking row is computed by the adapter from layer K-1's cached keys and the last token's query (after RoPE)
  instead of asking layers for attention maps (eager attention) or re-running layer K-1 (the lmms-eval drop-in);
  the values are the same (tested against eager `output_attentions`);
* per-sample selection in a batch with left padding, where the reference takes batch element 0 and ignores padding;
* on a shallow LLM (the smoke model has 3 layers) K=2 leaves a single reduced layer; set `layer` relative to depth.
"""

from __future__ import annotations

from methods._ops import gather_tokens, sample_budgets, select_top
from methods._registry import register_reducer
from methods.base import Reduced, Site, TokenReducer, Tokens
from methods.budget import Budget


@register_reducer("fastv")
class FastV(TokenReducer):
    """Keep the image tokens the last prompt token attends to most at LLM layer K-1; drop the rest from layer K."""

    site = Site.LLM
    needs = frozenset({"query_attn"})
    count_args_example = {"ratio": 0.5}  # the reference's own setting

    def __init__(self, budget: int | None = None, layer: int = 2, ratio: float | None = None) -> None:
        if (budget is None) == (ratio is None):
            raise ValueError("fastv: give exactly one of budget (image tokens kept) or ratio (share dropped, R)")
        if ratio is not None and not 0.0 <= ratio < 1.0:
            raise ValueError(f"fastv: ratio R is the share of image tokens dropped, in [0, 1), got {ratio}")
        super().__init__(budget if ratio is None else Budget.own(self.budget_label({"ratio": ratio})), layer)
        self.ratio = ratio

    @classmethod
    def budget_label(cls, kwargs: dict) -> str | None:
        return None if kwargs.get("ratio") is None else f"R={kwargs['ratio']}"


    def forward(self, t: Tokens) -> Reduced:
        b, n, _ = t.x.shape
        if t.budget is not None:
            k = sample_budgets(self.budget, t.budget, n, b, t.x.device)
        else:
            k = max(1, round(n * (1 - self.ratio))) if self.own_count else min(self.budget, n)
        keep, valid = select_top(t.query_attn, k, t.valid)  # (B, K) ascending positions
        return Reduced(x=gather_tokens(t.x, keep), keep=keep, valid=valid)
