"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
EMNLP 2025, arXiv 2502.11494).

Reference: ZichenWen1/DART, read in its mirror xqy1111111/DART at commit d6a5af6 (Apache-2.0):
`llava/model/language_model/modeling_llama_self.py` (`DART.forward`, `get_retained_image_token`) and the defaults of
`llava/eval/model_vqa_loader.py` (`pruned_layer 2`, `pivot_image_token 4`, `pivot_text_token 4`,
`max_num_trunction 128`).

Site: LLM, before decoder layer K (default 2). Pivots: the `pivot_image` image tokens and the `pivot_text` text tokens
after the image (the instruction and the answer prompt) whose keys at layer K-1 (after RoPE, heads concatenated)
have the largest L1 norm. The hidden states entering layer K are put through the LLM's final norm; for each pivot
in turn (`pivot_order`), the `per_pivot` image tokens least cosine-similar to it among those not yet chosen (image
pivots excluded) are kept. Kept: the image pivots and every token a pivot chose (text pivots are not image tokens);
the rest leave the sequence from layer K on, original positions kept (as the reference does).

Budgets. `max_num_trunction` T is the reference's knob: per_pivot = T // (pivots), so it keeps pivot_image +
pivots x per_pivot tokens (132 at T = 128). A `budget` B is the tokens kept at most: per_pivot = (B - pivot_image)
// pivots (60 at 64 on LLaVA-1.5, 36 at 36 here), so the LLM never sees more than B; a budget at or above an image's
tokens keeps all of them.

Pivot order. The reference loops over ``list(set(image_pivots + text_pivots))``, a Python set of the pivots' indices
in the (unpadded) sequence, image pivots inserted first, each group in descending norm. CPython iterates a set of
small ints in hash-table slot order (index mod table size, 32 slots for 8 pivots), not in position order; since
each pivot chooses among what the ones before it left, the order changes the kept tokens. `pivot_order="set"` (the
default) computes that order per sample with CPython's own `set` from `Tokens.prompt_index` (one host sync);
`pivot_order="position"` (the project's earlier variant) takes image pivots, then text pivots, in position order.

Differs from the reference code:
* the key norms sum over the key/value heads once (the reference repeats them to every query head first: the same
  ranking, each norm times H / Hkv);
* the similarities of all pivots to all image tokens are one batched matmul (pivots x N x D MACs); the greedy then
  masks the tokens already chosen (the reference recomputes against the remaining ones);
* batched with left padding and per-sample budgets (the reference takes batch element 0); a prompt with fewer text
  tokens than `pivot_text` uses those it has.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from methods._ops import gather_tokens, pack_true, sample_budgets
from methods._registry import register_reducer
from methods.base import Reduced, Site, TokenReducer, Tokens
from methods.budget import Budget


@register_reducer("dart")
class DART(TokenReducer):
    """Keep the image tokens least duplicated by key-norm pivots (image and text) at LLM layer K; drop the rest."""

    site = Site.LLM
    needs = frozenset({"key_norms", "normed", "text", "prompt_index"})
    count_args_example = {"max_num_trunction": 128}  # the reference's own setting

    def __init__(self, budget: int | None = None, layer: int = 2, pivot_image: int = 4, pivot_text: int = 4,
                 max_num_trunction: int | None = None, pivot_order: Literal["set", "position"] = "set") -> None:
        if (budget is None) == (max_num_trunction is None):
            raise ValueError("dart: give exactly one of budget (image tokens kept at most) or max_num_trunction "
                             "(the reference's T: pivot_image + T // pivots tokens per pivot)")
        if max_num_trunction is not None and max_num_trunction < 0:
            raise ValueError(f"dart: max_num_trunction must be >= 0 (tokens each pivot may choose, times the pivots), "
                             f"got {max_num_trunction}")
        if pivot_image < 1 or pivot_text < 0:
            raise ValueError(f"dart: pivot_image must be >= 1 and pivot_text >= 0, got {pivot_image}, {pivot_text}")
        own = self.budget_label({"max_num_trunction": max_num_trunction})
        super().__init__(budget if own is None else Budget.own(own), layer)
        self.pivot_image, self.pivot_text, self.max_num_trunction = pivot_image, pivot_text, max_num_trunction
        self.pivot_order = pivot_order

    @classmethod
    def budget_label(cls, kwargs: dict) -> str | None:
        t = kwargs.get("max_num_trunction")
        return None if t is None else f"T={t}"

    def pivot_sequence(self, t: Tokens, img: Tensor, txt: Tensor, ok: Tensor) -> Tensor:
        """(B, P) the order in which the pivots choose, as indices into [image pivots, text pivots] (`img` (B, Pi)
        and `txt` (B, Pt) in the order of their norms, `ok` (B, P) False where a slot holds no pivot; those last).

        "set": the reference's order, that of CPython iterating ``set(image + text)`` over the pivots' indices in
        their unpadded sequences (`Tokens.prompt_index`): a set of small ints iterates in hash-table slot order,
        index mod table size, so this is not position order. "position": image pivots, then text pivots, each in
        order of position (the project's variant)."""
        p, pi = ok.size(1), img.size(1)
        if self.pivot_order == "position":
            big = torch.iinfo(torch.long).max  # a missing pivot sorts last in its group
            return torch.cat([img.masked_fill(~ok[:, :pi], big).argsort(dim=1, stable=True),
                              pi + txt.masked_fill(~ok[:, pi:], big).argsort(dim=1, stable=True)], 1)
        if t.prompt_index is None or t.text.prompt_index is None:
            raise ValueError("dart: pivot_order=set needs each token's index in its sequence (Tokens.prompt_index); "
                             "the LLM site provides it, or pass dart.pivot_order=position")
        where = torch.cat([t.prompt_index.gather(1, img), t.text.prompt_index.gather(1, txt)], 1)  # (B, P)
        rows = []
        for w, o in zip(where.tolist(), ok.tolist(), strict=True):  # one host sync for the batch
            slot = {w[i]: i for i in range(p) if o[i]}  # pivot indices are distinct: image and text tokens
            pivots = set([w[i] for i in range(p) if o[i]])  # noqa: C403 - built as the reference builds it
            first = [slot[i] for i in pivots]  # CPython's iteration order of that set
            rows.append(first + [i for i in range(p) if not o[i]])
        return torch.tensor(rows, dtype=torch.long, device=img.device)

    def forward(self, t: Tokens) -> Reduced:
        b, n, d = t.x.shape
        dev = t.x.device
        pivots = self.pivot_image + self.pivot_text
        valid = torch.ones(b, n, dtype=torch.bool, device=dev) if t.valid is None else t.valid
        if self.own_count:
            n_img = torch.full((b,), min(self.pivot_image, n), device=dev)
            per = torch.full((b,), self.max_num_trunction // pivots, device=dev)
        else:
            budget = sample_budgets(self.budget, t.budget, n, b, dev)  # (B,)
            n_img = budget.clamp(max=self.pivot_image)
            per = (budget - self.pivot_image).clamp(min=0) // pivots  # (B,)
        # image pivots: the largest key norms (n = no pivot); text pivots likewise among the text tokens
        rank = torch.arange(self.pivot_image, device=dev).unsqueeze(0)
        top_img = t.key_norms.masked_fill(~valid, float("-inf")).topk(min(self.pivot_image, n), dim=1).indices
        img_ok = (rank[:, : top_img.size(1)] < n_img.unsqueeze(1)) & valid.gather(1, top_img)
        img_piv = torch.where(img_ok, top_img, n)  # (B, Pi) in the order of their norms
        is_piv = torch.zeros(b, n + 1, dtype=torch.bool, device=dev)
        is_piv = is_piv.scatter(1, img_piv, torch.ones_like(img_piv, dtype=torch.bool))[:, :n]  # (B, N)
        text = t.text
        m = min(self.pivot_text, text.valid.size(1))
        top_txt = text.key_norms.masked_fill(~text.valid, float("-inf")).topk(m, dim=1).indices  # (B, Pt)
        txt_ok = text.valid.gather(1, top_txt)
        img_at = img_piv.clamp(max=n - 1)  # a missing pivot points at some token; piv_ok masks it
        piv_vec = torch.cat([gather_tokens(t.normed, img_at), gather_tokens(text.normed, top_txt)], 1)  # (B, P, D)
        piv_ok = torch.cat([img_ok, txt_ok], 1)  # (B, P)
        order = self.pivot_sequence(t, img_at, top_txt, piv_ok)  # (B, P) the loop's order
        piv_vec, piv_ok = gather_tokens(piv_vec, order), piv_ok.gather(1, order)
        free = valid & ~is_piv
        chosen = is_piv.clone()
        if not self.own_count:  # a budget at or above an image's tokens keeps every one of them
            chosen = chosen | (valid & (budget >= valid.sum(1)).unsqueeze(1))
        kmax = int(per.max()) if b else 0
        if kmax == 0:  # a budget of at most pivot_image tokens: the image pivots alone, no similarity needed
            keep, kvalid = pack_true(chosen)
            return Reduced(x=gather_tokens(t.x, keep), keep=keep, valid=None if bool(kvalid.all()) else kvalid,
                           macs=torch.zeros(b, dtype=torch.long, device=dev))
        sim = F.normalize(piv_vec.float(), dim=-1) @ F.normalize(t.normed.float(), dim=-1).transpose(1, 2)  # (B,P,N)
        for p in range(sim.size(1)):  # sequential: each pivot chooses among what the ones before left
            score = sim[:, p].masked_fill(~free, float("inf"))  # (B, N) lowest similarity first
            pick = (-score).topk(min(kmax, n), dim=1).indices  # (B, k)
            ok = (torch.arange(pick.size(1), device=dev) < per.unsqueeze(1)) & piv_ok[:, p : p + 1]
            ok = ok & free.gather(1, pick)
            chosen = chosen.scatter(1, pick, chosen.gather(1, pick) | ok)  # picks of a row are distinct
            free = free & ~chosen
        keep, kvalid = pack_true(chosen)  # (B, K) ascending
        macs = torch.full((b,), sim.size(1) * n * d, dtype=torch.long, device=dev)  # the pivot similarities
        return Reduced(x=gather_tokens(t.x, keep), keep=keep, valid=None if bool(kvalid.all()) else kvalid, macs=macs)
