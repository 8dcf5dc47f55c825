"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction", CVPR 2025, arXiv 2410.17247).

Reference: Cooperx521/PyramidDrop `llava/model/modeling_llama_pdrop.py` (`LlamaModel.forward`, `pdrop_rank_drop`) at
commit 3f89f94 (MIT), run with `layer_list [8, 16, 24]` and `image_token_ratio_list [0.5, 0.25, 0.125]` in its
LLaVA-1.5 scripts.

Site: LLM, several stages in one prefill. Before each stage layer l_s, the image tokens still in the sequence are
ranked by the attention the last prompt token pays them *at layer l_s itself*: that layer's input LayerNorm, its q
projection of the last token and its k projection of every token, RoPE, softmax over the whole sequence, averaged
over heads. The top `int(N * ratio_s)` (N = the image's tokens before any drop) stay, in their original order; the
rest leave the sequence for layer l_s and everything after it.

Budgets. `ratios` (one per stage, of N) gives the reference's schedule and runs once under that label. A `budget`
B is instead a *layer-averaged* count, the unit the PyramidDrop paper's tables use (issue #22 of its repository:
"sum(token_i) / layer_num"): one geometric ratio lambda (stage s keeps int(N * lambda^s), as the reference's
0.5 / 0.25 / 0.125 is lambda = 0.5) is solved by bisection for the largest mean over all L layers that does not
exceed B. The first l_1 layers always carry all N tokens, so a B below (l_1 N + (L - l_1)) / L cannot be met: the
run is refused before it starts, saying so (give earlier `layers`, or `ratios`). The result rows record both the
visual tokens entering the first layer and the layer average.

`layers` defaults to L/4, L/2 and 3L/4 of the LLM's L layers: 8, 16, 24 on LLaVA-1.5-7B's 32, as the reference.

Positions, as the reference code does them (re-read at its commit 6444f30: `pdrop_rank_drop` sets `position_ids` to
0..T'-1 after each drop; in decoding each stage shifts the new token's position down by the tokens it dropped):
after every stage the sequence's positions are renumbered 0..T'-1, each layer's cache holds the keys of the
positions it saw, and in decoding the layers of stage s give the new token position T_s + t, T_s their prompt
length (the layers before the first stage: the full prompt's length). The ranking row of a stage uses the positions
before its drop. That is `positions="reference"` (the default; `"renumber"` asks for it explicitly and is refused on
Qwen2.5-VL); `positions="original"` is the project's variant: survivors keep their original position ids and
decoding goes on from the full prompt's length in every layer (as FastV's and DART's references do). On
Qwen2.5-VL (M-RoPE, no reference code) positions stay original.

Differs from the reference code:
* the ranking row's keys come from the layer's k projection of every token and the layer then computes them again
  for the survivors (the reference also runs q, k and v projections of every token once more); counted in MACs;
* per-sample selection in a left-padded batch (the reference loops over samples with right padding), each stage
  keeps at least one image token (the reference's int() can reach 0 at tiny ratios), and a per-sample budget
  (`Tokens.budget`) solves its own lambda.
"""

from __future__ import annotations

from typing import Literal

import torch

from methods._ops import gather_tokens, select_top
from methods._registry import register_reducer
from methods.base import Reduced, Site, TokenReducer, Tokens
from methods.budget import Budget

DEFAULT_RATIOS = (0.5, 0.25, 0.125)  # the reference's image_token_ratio_list after its leading 1.0


def default_layers(n_layers: int) -> tuple[int, ...]:
    """L/4, L/2 and 3L/4 (8, 16, 24 on a 32-layer LLM); fewer stages where they coincide on a very shallow LLM."""
    return tuple(sorted({n_layers // 4, n_layers // 2, 3 * n_layers // 4}))


def stage_counts(n: int, ratios: tuple[float, ...]) -> list[int]:
    """Image tokens kept at each stage: int(N * ratio) as the reference, at least one."""
    return [max(1, int(n * r)) for r in ratios]


def layer_mean(n: int, counts: list[int], layers: tuple[int, ...], n_layers: int) -> float:
    """Visual tokens averaged over all `n_layers` layers when stage s keeps counts[s] from layers[s] on."""
    bounds = [*layers, n_layers]
    later = sum(c * (b - a) for c, a, b in zip(counts, bounds[:-1], bounds[1:], strict=True))
    return (layers[0] * n + later) / n_layers


def solve_ratio(budget: float, n: int, layers: tuple[int, ...], n_layers: int) -> float:
    """The largest geometric ratio lambda in [0, 1] whose layer-averaged count is at most `budget` (bisection on a
    non-decreasing step function); raises ValueError when even one token per stage is too many."""
    def mean(lam: float) -> float:
        return layer_mean(n, stage_counts(n, tuple(lam ** (s + 1) for s in range(len(layers)))), layers, n_layers)

    if mean(0.0) > budget:
        raise ValueError(
            f"pdrop: layer-averaged budgets below {mean(0.0):.1f} visual tokens cannot be met by its stages at "
            f"layers {list(layers)} of {n_layers} (every one of the {n} tokens runs until layer {layers[0]}); give a "
            f"larger budget, earlier pdrop.layers or explicit pdrop.ratios")
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) <= budget else (lo, mid)
    return lo


@register_reducer("pdrop")
class PyramidDrop(TokenReducer):
    """Drop image tokens in stages inside the LLM, ranked by the last prompt token's attention at each stage layer."""

    site = Site.LLM
    needs = frozenset({"query_attn_next"})
    count_args_example = {"ratios": (0.5, 0.25, 0.125)}  # the reference's own setting
    budget_unit = "layer_mean"

    def __init__(self, budget: int | None = None, layers: tuple[int, ...] | None = None,
                 ratios: tuple[float, ...] | None = None,
                 positions: Literal["reference", "renumber", "original"] = "reference") -> None:
        if (budget is None) == (ratios is None):
            raise ValueError("pdrop: give exactly one of budget (layer-averaged visual tokens) or ratios (the share "
                             f"of the image's tokens each stage keeps, e.g. {DEFAULT_RATIOS})")
        if ratios is not None and not (ratios and all(0 < r <= 1 for r in ratios)
                                       and list(ratios) == sorted(ratios, reverse=True)):
            raise ValueError(f"pdrop: ratios must be non-increasing shares in (0, 1], one per stage, got {ratios}")
        if layers is not None and (ratios is not None and len(layers) != len(ratios)):
            raise ValueError(f"pdrop: {len(layers)} layers but {len(ratios)} ratios; give one ratio per stage")
        super().__init__(budget if ratios is None else Budget.own(self.budget_label({"ratios": ratios})))
        self.layers, self.ratios = (None if layers is None else tuple(layers)), ratios
        self.positions = positions  # "reference": renumbered where positions are 1-D (base.TokenReducer.positions)

    @classmethod
    def budget_label(cls, kwargs: dict) -> str | None:
        r = kwargs.get("ratios")
        return None if r is None else "ratios=" + ",".join(f"{x:g}" for x in r)

    def llm_layers(self, n_layers: int, num_patches: int) -> tuple[int, ...]:
        layers = self.layers if self.layers is not None else default_layers(n_layers)
        if self.own_count and len(self.ratios) != len(layers):
            raise ValueError(f"pdrop: {len(self.ratios)} ratios but {len(layers)} stages (layers {list(layers)} of "
                             f"this {n_layers}-layer LLM); give one ratio per stage, or pdrop.layers with one layer "
                             "per ratio")
        if not self.own_count and len(set(layers)) == len(layers) and layers[-1] < n_layers:
            # refuses a budget the stages cannot meet
            solve_ratio(self.token_budget.tokens(num_patches), num_patches, layers, n_layers)
        return layers

    def schedule(self, n: int, n_layers: int, budget: int | None = None) -> list[int]:
        """Image tokens kept at each stage for an image of `n` tokens on an `n_layers`-layer LLM."""
        layers = self.layers if self.layers is not None else default_layers(n_layers)
        if self.own_count:
            return stage_counts(n, self.ratios)
        budget = self.budget if budget is None else max(1, budget)
        if budget >= n:  # at or above the image's tokens: every token stays (the bisection would lose one to rounding)
            return [n] * len(layers)
        lam = solve_ratio(budget, n, layers, n_layers)
        return stage_counts(n, tuple(lam ** (s + 1) for s in range(len(layers))))

    def forward(self, t: Tokens) -> Reduced:
        b = t.x.size(0)
        n = t.grid[0] * t.grid[1]  # the image's tokens before any drop (per image: Tokens.image_tokens)
        if t.depth is None:
            raise ValueError("pdrop acts inside the LLM: the adapter must give Tokens.depth (its layer count)")
        budgets = [None] * b if t.budget is None else t.budget.tolist()
        sizes = [n] * b if t.image_tokens is None else t.image_tokens.tolist()  # each image's tokens
        per = {(v, m): self.schedule(m, t.depth, v)[t.stage] for v, m in set(zip(budgets, sizes, strict=True))}
        k = torch.tensor([per[v, m] for v, m in zip(budgets, sizes, strict=True)], device=t.x.device)
        k = k.clamp(max=t.x.size(1))  # (B,)
        keep, valid = select_top(t.query_attn_next, k, t.valid)  # (B, K) ascending positions
        return Reduced(x=gather_tokens(t.x, keep), keep=keep, valid=valid)
