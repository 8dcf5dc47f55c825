"""Full: every visual token goes to the LLM (LLaVA-1.5, Liu et al., "Improved Baselines with Visual Instruction
Tuning", arXiv 2310.03744). The reference point every other method is compared with.

Site: features. Removes nothing. Runs once whatever the budgets (`uses_budget = False`).
Differs from the reference code: none; the adapter reproduces the untouched model's greedy outputs (tested).
"""

from __future__ import annotations

from methods._registry import register_reducer
from methods.base import Reduced, TokenReducer, Tokens


@register_reducer("full")
class Full(TokenReducer):
    """Identity reducer."""

    uses_budget = False

    def __init__(self, budget: int | None = None) -> None:
        super().__init__(budget=None)


    def forward(self, t: Tokens) -> Reduced:
        return Reduced(x=t.x, keep=None, valid=t.valid)
