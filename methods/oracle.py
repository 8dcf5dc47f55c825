"""Oracle: the question's relevant patches first, the rest of the budget a seeded random draw. A reference, not a
method: it reads the answer's location from the task's records, which no real selector can.

It is the upper reference of the selection tables and figures (issue 33): how much a pre-LLM selection of `budget`
patches can keep when it knows which patches the question is about. It runs only on tasks that record each
question's `relevant_patches` (the synthetic tasks, `benchmarks/tasks/synthetic`); the runner refuses it in one line on
any other task, and the adapter refuses a batch that carries no relevant patches.

Site: features (what the smoke model's card calls ``oracle_16``, restated as a reducer). Removes tokens; keeps the
survivors in their original order. Each patch scores ``2 * relevant + u`` with ``u`` in [0, 1) the random
baseline's batch-invariant hash of (the sample's pixels, the patch index, the seed) (`methods.random`), and the
`budget` highest scores win: every relevant patch when there are at most `budget` of them, otherwise a uniform
draw among them (a background question's 96-104 patches), and a uniform draw of the others to fill the budget.
No reference code: the rule is the card's ``oracle_16``.
"""

from __future__ import annotations

from methods._ops import gather_tokens, sample_budgets, select_top
from methods._registry import register_reducer
from methods.base import Reduced, TokenReducer, Tokens
from methods.random import hashed_scores


@register_reducer("oracle")
class Oracle(TokenReducer):
    """The question's relevant patches first, filled to `budget` by a seeded random draw (a reference row)."""

    needs = frozenset({"relevant"})
    seeded = True
    reference = True

    def __init__(self, budget: int, seed: int = 0) -> None:
        super().__init__(budget)
        self.seed = seed

    def forward(self, t: Tokens) -> Reduced:
        b, n, _ = t.x.shape
        if t.relevant is None or t.sample_key is None:
            raise ValueError("oracle needs Tokens.relevant (each question's relevant patches) and Tokens.sample_key")
        k = self.budget if t.budget is None else sample_budgets(self.budget, t.budget, n, b, t.x.device)
        u = hashed_scores(t.sample_key, n, self.seed).double() / 2**32  # (B, N) in [0, 1)
        scores = 2.0 * t.relevant.double() + u  # (B, N): relevant patches above every other
        keep, valid = select_top(scores, min(k, n) if isinstance(k, int) else k, t.valid)
        return Reduced(x=gather_tokens(t.x, keep), keep=keep, valid=valid)  # (B, K, D)
