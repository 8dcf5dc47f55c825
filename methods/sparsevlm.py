"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference",
ICML 2025, arXiv 2410.04417, the ICML version).

Reference: Gumpest/SparseVLMs branch v1.5 at commit b9619e6 (Apache-2.0; its main branch is v2.0, SparseVLM+):
`llava/model/language_model/modelling_sparse_llama.py` (`LlamaModel.forward`, the attention's `return_logits`
branch), `score.py` (`attn_postprocess_topk`, `sparse_token_dict`) and `utils.py` (`cluster_and_merge`).

Site: LLM, three stages in one prefill. The reference, on a 32-layer LLaVA-1.5 with 576 image tokens:

1. Raters, once, from the LLM's input embeddings: m = softmax over the text tokens after the image of
   (image embeddings . text embeddings), averaged over the image tokens; the text tokens with m above its mean rate.
2. At `pruning_loc` layers 2, 6 and 15 the layer runs on every token; its attention (softmax over all keys, causal,
   averaged over heads) from the raters to the image tokens still in the sequence, averaged over the raters, ranks
   them, and the top min(n_s, N_v - 1) stay (n_s from `sparse_token_dict`: 66 / 30 / 17 at "64", 303 / 110 / 36 at
   "128", 300 / 200 / 110 at "192").
3. Recycling: of the image tokens deleted, the int(0.3 n_del) + 1 best-ranked are clustered (density peaks on that
   layer's outputs: L2 distances / sqrt(D), density exp(-mean squared distance to the k nearest), k = the cluster
   count int(n / 10) + 1, centres by distance-to-denser x density) and each cluster's mean becomes one token; these
   join the image tokens and can be pruned or merged again at a later stage. Everything else deleted leaves the
   sequence from the next layer on.

Here, as for every LLM-site method, a reduction runs before a layer, with its signal from the layer below: stage s
runs before layers 3, 7 and 16 of 32 (the layers after `pruning_loc`), its ranking row is the raters' attention at
the layer that ran (their queries against its cached keys), and the merged tokens are averages of that layer's
outputs, as in the reference. `layers` defaults to 3/32, 7/32 and 16/32 of the LLM's depth, rounded, at least 1
(stages that coincide on a shallow LLM are one stage with the later stage's count).

Budgets. `retained_tokens` (64, 128 or 192) runs the reference's table (its counts times N / 576 on an image of N
tokens). `counts` gives the per-stage counts directly. A `budget` B is a *layer-averaged* count of visual tokens
(the unit of the reference's own bookkeeping, "2*576 4*300 10*200 16*110" for 192), so that a "64" is the compute
point of the other methods at 64: the table nearest to B (in ratio) gives the shape, and one scale factor on its
counts is solved (bisection) for the largest layer mean, merged tokens included, that does not exceed B. The
reference's own "64" keeps 82.25 visual tokens on average over the 32 layers (576 x 3, 82 x 4, 32 x 9, 18 x 16,
counting its merged tokens); at a budget of 64 this method keeps fewer, 64 or just under. A budget below what
the first stage allows (all N tokens until it) is refused before the run.

Positions, as the reference code does them (`LlamaModel.forward`: the merged tokens are concatenated right after the
kept image tokens, before the text, and `position_ids` is cut to 0..T'-1; in decoding each layer's attention takes
its own cache length as the new token's position): after every stage the merged tokens, in cluster order, follow
the kept image tokens, the sequence's positions are renumbered 0..T'-1, each layer's cache holds the keys of the
positions it saw, and in decoding the layers of stage s give the new token position T_s + t, T_s their prompt
length. That is `positions="reference"` (the default; `"renumber"` asks for it explicitly and is refused on
Qwen2.5-VL); `positions="original"` is the project's variant: survivors keep their position ids, a merged token takes
its cluster centre's place and position id, and decoding goes on from the full prompt's length in every layer. On
Qwen2.5-VL (M-RoPE, no reference code) positions stay original.

Differs from the reference code:
* the raters are recomputed at each stage (the same inputs give the same raters; the reference computes them once),
  their N x M x D similarity counted in MACs each time; if no text token is above the mean (all equal), all rate;
* no random noise is added to the densities (the reference adds U(0, 1e-6) so that no two are equal, which makes
  a tie, such as a mutual nearest pair at k = 2, go either way at random): an equal density counts as lower for
  the worse-ranked of the two tokens, and centre and candidate ties go to the better-ranked; distances come from
  one matmul (|a|^2 + |b|^2 - 2 a.b, made exactly symmetric, diagonal exactly 0), counted in MACs;
* the ranking row is computed for every text token after the image (the adapter's one-row-per-query signal) and
  the raters' rows averaged; float32 scores and merging (the reference runs in the model's dtype);
* batched with per-sample budgets and padding (the reference handles batch element 0).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from methods._ops import gather_tokens, select_top
from methods._registry import register_reducer
from methods.base import Reduced, Site, TokenReducer, Tokens
from methods.budget import Budget

REFERENCE_COUNTS = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}  # score.py, of 576 tokens
REFERENCE_PATCHES, REFERENCE_DEPTH = 576, 32
REFERENCE_LAYERS = (3, 7, 16)  # tokens leave after pruning_loc 2, 6, 15: before layers 3, 7, 16
RECYCLED_SHARE, CLUSTER_SIZE = 0.3, 10  # int(0.3 n_del) + 1 recycled, int(n / 10) + 1 clusters


def default_stages(n_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(layers, which of the three reference stages each is) on an `n_layers`-layer LLM: 3/32, 7/32 and 16/32 of the
    depth, rounded, in [1, n_layers - 1]; where two coincide the later one's count holds from that layer on."""
    raw = [min(n_layers - 1, max(1, round(r * n_layers / REFERENCE_DEPTH))) for r in REFERENCE_LAYERS]
    stages = [s for s in range(len(raw)) if s == len(raw) - 1 or raw[s] != raw[s + 1]]
    return tuple(raw[s] for s in stages), tuple(stages)


def recycled(n_deleted: int) -> tuple[int, int]:
    """(tokens recycled, clusters made of them) when `n_deleted` image tokens are deleted at a stage."""
    n = int(n_deleted * RECYCLED_SHARE) + 1
    return n, n // CLUSTER_SIZE + 1


def after_stage(n_visual: int, count: int) -> int:
    """Visual tokens after a stage that keeps `count` of `n_visual`: min(count, n_visual - 1) kept, plus clusters."""
    kept = min(count, n_visual - 1)
    if kept < 1:  # one token: nothing to rank (the reference's v_token_num == 0 case keeps all)
        return n_visual
    return kept + recycled(n_visual - kept)[1]


def visual_per_layer(n: int, counts: tuple[int, ...], layers: tuple[int, ...], n_layers: int) -> list[int]:
    """Visual tokens entering each of the `n_layers` layers when stage s keeps counts[s] before layers[s]."""
    out, nv, at = [], n, dict(zip(layers, counts, strict=True))
    for j in range(n_layers):
        nv = after_stage(nv, at[j]) if j in at else nv
        out.append(nv)
    return out


def solve_counts(budget: float, n: int, layers: tuple[int, ...], stages: tuple[int, ...], n_layers: int
                 ) -> tuple[int, ...]:
    """Per-stage counts for a layer-averaged `budget`: the reference table nearest in ratio, scaled by the largest
    factor whose layer mean is at most `budget`; raises ValueError when even one token per stage is too many."""
    ref = min(REFERENCE_COUNTS, key=lambda r: abs(math.log(r / REFERENCE_PATCHES) - math.log(budget / n)))
    shape = [REFERENCE_COUNTS[ref][s] * n / REFERENCE_PATCHES for s in stages]

    def counts(scale: float) -> tuple[int, ...]:
        return tuple(max(1, int(scale * c)) for c in shape)

    def mean(scale: float) -> float:
        return sum(visual_per_layer(n, counts(scale), layers, n_layers)) / n_layers

    if mean(0.0) > budget:
        raise ValueError(
            f"sparsevlm: layer-averaged budgets below {mean(0.0):.1f} visual tokens cannot be met by its stages at "
            f"layers {list(layers)} of {n_layers} (every one of the {n} tokens runs until layer {layers[0]}); give a "
            f"larger budget, earlier sparsevlm.layers or sparsevlm.counts")
    lo, hi = 0.0, n / min(shape)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) <= budget else (lo, mid)
    return counts(lo)


def raters(image: Tensor, text: Tensor, valid: Tensor, image_valid: Tensor | None = None) -> Tensor:
    """(B, M) bool: the text tokens that rate. image (B, N, D) and text (B, M, D) input embeddings, valid (B, M),
    image_valid (B, N) when images differ in size."""
    sim = (image.float() @ text.float().transpose(1, 2)).masked_fill(~valid[:, None], float("-inf"))  # (B, N, M)
    p = sim.softmax(-1)
    if image_valid is None:
        m = p.mean(1)  # (B, M) relevance of each text token
    else:
        m = torch.where(image_valid[..., None], p, 0.0).sum(1) / image_valid.sum(1, keepdim=True).clamp(min=1)
    mean = m.masked_fill(~valid, 0).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)
    chosen = (m > mean) & valid
    return torch.where(chosen.any(1, keepdim=True), chosen, valid)


def cluster_merge(x: Tensor, valid: Tensor, clusters: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Density-peak clustering of each row's valid tokens into `clusters` (B,) groups, each averaged (the
    reference's `cluster_and_merge`, batched, without its tie-breaking noise).

    Args:
        x: (B, S, D) the tokens to merge; valid (B, S) bool; clusters (B,) long, 1 <= clusters <= valid count.

    Returns:
        merged (B, C, D) in centre-rank order, merged_valid (B, C), centres (B, C) index into S of each centre.
    """
    b, s, d = x.shape
    xf = x.float()
    sq = (xf * xf).sum(-1)  # (B, S)
    d2 = sq[:, :, None] + sq[:, None, :] - 2 * (xf @ xf.transpose(1, 2))  # (B, S, S)
    d2 = ((d2 + d2.transpose(1, 2)) / 2).clamp(min=0)  # exactly symmetric, as |a - b| is
    eye = torch.eye(s, dtype=torch.bool, device=x.device)
    dist = d2.masked_fill(eye, 0).sqrt() / d ** 0.5
    c = int(clusters.max())
    rank = torch.arange(c, device=x.device)
    near = dist.masked_fill(~valid[:, None, :], float("inf")).topk(c, dim=-1, largest=False).values  # (B, S, C)
    near = torch.where(rank < clusters.view(-1, 1, 1), near, 0.0)
    density = (-(near * near).sum(-1) / clusters.view(-1, 1)).exp()  # (B, S): mean over the k = clusters nearest
    # (B, S, S): j denser than i; equal densities (a mutual nearest pair at k = 2) go to the better-ranked token,
    # where the reference's noise would pick one of the two at random
    earlier = torch.ones(s, s, dtype=torch.bool, device=x.device).tril(-1)  # [i, j]: j < i
    dj, di = density[:, None, :], density[:, :, None]
    denser = ((dj > di) | ((dj == di) & earlier)) & valid[:, None, :]
    pair = valid[:, :, None] & valid[:, None, :]
    dmax = dist.masked_fill(~pair, float("-inf")).flatten(1).amax(1)  # (B,)
    parent = torch.where(denser, dist, dmax.view(-1, 1, 1)).amin(-1)  # (B, S) distance to the nearest denser token
    score = (parent * density).masked_fill(~valid, float("-inf"))
    centres = score.sort(dim=1, descending=True, stable=True).indices[:, :c]  # (B, C) ties: the better-ranked
    centre_ok = rank < clusters.view(-1, 1)
    to_centre = dist.gather(2, centres[:, None, :].expand(b, s, c)).masked_fill(~centre_ok[:, None, :], float("inf"))
    assign = to_centre.argmin(-1)  # (B, S) nearest centre, first on ties
    assign = assign.scatter(1, centres, torch.where(centre_ok, rank, assign.gather(1, centres)))  # centres: own
    assign = assign.masked_fill(~valid, 0)
    w = valid.float()
    size = torch.zeros(b, c, device=x.device).scatter_add(1, assign, w)  # (B, C)
    total = torch.zeros(b, c, d, device=x.device).scatter_add(1, assign[..., None].expand(b, s, d), xf * w[..., None])
    merged = total / (size + 1e-6)[..., None]  # the reference's weights 1 / (cluster size + 1e-6)
    return merged.to(x.dtype), centre_ok, centres


@register_reducer("sparsevlm")
class SparseVLM(TokenReducer):
    """Keep the image tokens the text raters attend to at three LLM layers; recycle the best deleted ones into merged
    tokens."""

    site = Site.LLM
    needs = frozenset({"text_attn", "embeds"})
    count_args_example = {"retained_tokens": 64}  # one of the reference's settings (192, 128, 64)
    budget_unit = "layer_mean"

    def __init__(self, budget: int | None = None, layers: tuple[int, ...] | None = None,
                 retained_tokens: int | None = None, counts: tuple[int, ...] | None = None,
                 positions: Literal["reference", "renumber", "original"] = "reference") -> None:
        if sum(v is not None for v in (budget, retained_tokens, counts)) != 1:
            raise ValueError("sparsevlm: give exactly one of budget (layer-averaged visual tokens), retained_tokens "
                             f"(the reference's table: {', '.join(map(str, REFERENCE_COUNTS))}) or counts (tokens "
                             "kept at each stage)")
        if retained_tokens is not None and retained_tokens not in REFERENCE_COUNTS:
            raise ValueError(f"sparsevlm: retained_tokens must be one of {list(REFERENCE_COUNTS)} (the reference's "
                             f"table), got {retained_tokens!r}; give a budget for other counts")
        if counts is not None and not (counts and all(isinstance(c, int) and c >= 1 for c in counts)):
            raise ValueError(f"sparsevlm: counts must be whole numbers >= 1, one per stage, got {counts!r}")
        if layers is not None and counts is not None and len(layers) != len(counts):
            raise ValueError(f"sparsevlm: {len(layers)} layers but {len(counts)} counts; give one count per stage")
        if layers is not None and counts is None and len(layers) != len(REFERENCE_LAYERS):
            raise ValueError(f"sparsevlm: the reference's table has {len(REFERENCE_LAYERS)} stages but layers has "
                             f"{len(layers)}; give {len(REFERENCE_LAYERS)} layers or explicit counts")
        own = self.budget_label({"retained_tokens": retained_tokens, "counts": counts})
        super().__init__(budget if own is None else Budget.own(own))
        self.layers = None if layers is None else tuple(layers)
        self.retained_tokens, self.counts = retained_tokens, None if counts is None else tuple(counts)
        self.positions = positions  # "reference": renumbered where positions are 1-D (base.TokenReducer.positions)

    @classmethod
    def budget_label(cls, kwargs: dict) -> str | None:
        if kwargs.get("counts") is not None:
            return "counts=" + ",".join(str(c) for c in kwargs["counts"])
        return None if kwargs.get("retained_tokens") is None else f"retained={kwargs['retained_tokens']}"

    def stages(self, n_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(layers, reference stage of each) on an `n_layers`-layer LLM."""
        if self.layers is not None:
            return self.layers, tuple(range(len(self.layers)))
        if self.counts is not None:  # explicit counts on default layers: the last len(counts) stages
            layers, _ = default_stages(n_layers)
            return layers[-len(self.counts):], tuple(range(len(self.counts)))
        return default_stages(n_layers)

    def llm_layers(self, n_layers: int, num_patches: int) -> tuple[int, ...]:
        layers, _ = self.stages(n_layers)
        if self.counts is not None and len(layers) != len(self.counts):
            raise ValueError(f"sparsevlm: {len(self.counts)} counts but this {n_layers}-layer LLM has {len(layers)} "
                             "default stages; give sparsevlm.layers")
        if not self.own_count and len(set(layers)) == len(layers) and 1 <= layers[0] and layers[-1] < n_layers:
            # refuses a budget the stages cannot meet
            self.schedule(num_patches, n_layers, self.token_budget.tokens(num_patches))
        return layers

    def schedule(self, n: int, n_layers: int, budget: int | None = None) -> tuple[int, ...]:
        """Image tokens kept (before recycling) at each stage, for an image of `n` tokens on an `n_layers` LLM."""
        layers, stages = self.stages(n_layers)
        if self.counts is not None:
            return self.counts
        if self.retained_tokens is not None:
            return tuple(max(1, int(REFERENCE_COUNTS[self.retained_tokens][s] * n / REFERENCE_PATCHES)) for s in stages)
        return solve_counts(self.budget if budget is None else max(1, budget), n, layers, stages, n_layers)

    def forward(self, t: Tokens) -> Reduced:
        b, nv, d = t.x.shape
        dev = t.x.device
        if t.depth is None or t.text is None or t.embeds is None:
            raise ValueError("sparsevlm acts inside the LLM: the adapter must give Tokens.depth, text and embeds")
        valid = torch.ones(b, nv, dtype=torch.bool, device=dev) if t.valid is None else t.valid
        n = t.embeds.size(1)  # the image's tokens before any stage (per image: Tokens.image_tokens)
        budgets = [None] * b if t.budget is None else t.budget.tolist()
        sizes = [n] * b if t.image_tokens is None else t.image_tokens.tolist()
        per = {(v, s): self.schedule(s, t.depth, v)[t.stage] for v, s in set(zip(budgets, sizes, strict=True))}
        n_v = valid.sum(1)  # (B,)
        k = torch.tensor([per[v, s] for v, s in zip(budgets, sizes, strict=True)], device=dev)
        k = torch.minimum(k, n_v - 1).clamp(min=1)  # (B,)
        image_valid = None if t.image_tokens is None else (
            torch.arange(n, device=dev) < t.image_tokens.to(dev).unsqueeze(1))  # (B, N0)
        rate = raters(t.embeds, t.text.embeds, t.text.valid, image_valid)  # (B, M)
        attn = torch.where(rate[..., None], t.text.attn.float(), 0.0)  # (B, M, N)
        relation = attn.sum(1) / rate.sum(1, keepdim=True).clamp(min=1)  # (B, N) the raters' mean attention
        keep, kvalid = select_top(relation, k, valid)  # (B, K) ascending
        kvalid = torch.ones_like(keep, dtype=torch.bool) if kvalid is None else kvalid
        m = t.text.valid.sum(1)  # (B,)
        n_img = torch.tensor(sizes, device=dev)  # (B,)
        macs = n_img * m * d  # the raters' similarities
        deleted = valid.scatter(1, keep, ~kvalid & valid.gather(1, keep))  # (B, N) valid and not kept
        n_del = deleted.sum(1)
        if nv < 2 or not bool((n_del > 0).any()):
            return Reduced(x=gather_tokens(t.x, keep), keep=keep, valid=None if bool(kvalid.all()) else kvalid,
                           macs=macs)
        n_sel = (n_del.double() * RECYCLED_SHARE).long() + 1  # (B,) recycled: the best-ranked deleted tokens
        clusters = n_sel // CLUSTER_SIZE + 1
        order = relation.masked_fill(~deleted, float("-inf")).sort(dim=1, descending=True, stable=True).indices
        cand = order[:, : int(n_sel.max())]  # (B, S) the best-ranked deleted tokens, best first
        cvalid = (torch.arange(cand.size(1), device=dev) < n_sel.unsqueeze(1)) & (n_del > 0).unsqueeze(1)
        merged, mvalid, centres = cluster_merge(gather_tokens(t.x, cand), cvalid, clusters.clamp(max=cand.size(1)))
        mvalid = mvalid & (n_del > 0).unsqueeze(1)
        macs = macs + (n_sel * n_sel * d).masked_fill(n_del == 0, 0)  # the pairwise distances
        x = torch.cat([gather_tokens(t.x, keep), merged], 1)  # (B, K + C, D)
        out_keep = torch.cat([keep, torch.full_like(centres, -1)], 1)
        anchor = torch.cat([keep, cand.gather(1, centres)], 1)  # a merged token stands at its centre's place
        out_valid = torch.cat([kvalid, mvalid], 1)
        return Reduced(x=x, keep=out_keep, anchor=anchor, valid=None if bool(out_valid.all()) else out_valid,
                       macs=macs)
