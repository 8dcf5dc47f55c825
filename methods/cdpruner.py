"""CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in
MLLMs", arXiv 2506.10967): keep the visual tokens a conditional determinantal point process finds most diverse
given the instruction.

Site: embeddings (the projector's outputs, the LLM's input embeddings of the visual tokens), before they are spliced
into the prompt; it sees the question. Per image, with X the N projected tokens and T the budget:

1. similarity S = X^ X^T, X^ the rows of X scaled to unit length (cosine similarity; negative entries stay);
2. relevance rho_i = -(1/M) sum_m cos(v_i, e_m) over the instruction's M text embeddings (the reference's sign: a
   token *less* similar to the text gets the higher relevance), min-max normalised to
   r_i = (rho_i - min rho + 1e-6) / (max rho - min rho);
3. the conditional kernel L = diag(r) S diag(r);
4. the DPP's MAP selection by Chen, Zhang and Zhou's fast greedy algorithm (NeurIPS 2018): T rounds, each picking
   the token of the largest remaining marginal gain d_j^2 (the first among equals), its Cholesky row
   e = (L_j - sum_t c_tj c_t) / d_j, and d^2 <- d^2 - e^2; no early stop;
5. the picks go on in their original order, unchanged (pure pruning); the prompt is then spliced as if the image
   had only those tokens (contiguous position ids), as the reference hands LLaVA the kept rows.

Reference code: Theia-4869/CDPruner (Apache-2.0), `llava/model/llava_arch.py` `encode_images`, commit 9541616
(its algorithm unchanged since 58190f6; an index copy at ed9c12d read the same), described in
docs/references/cdpruner.md; nothing is copied. The reference's budget `visual_token_num` is a count per image, as
here.

Differs from the reference code:
* **the relevance's embeddings.** The reference scores relevance in CLIP's joint space: the vision tower's layer -2
  patches through CLIP's post-LayerNorm and `visual_projection` against the CLIP *text tower*'s embedding of the raw
  question (split into 77-token chunks, one embedding each). llava-hf and Qwen2.5-VL checkpoints carry neither
  CLIP's text tower nor its visual projection (and the smoke models have no CLIP at all), so here v_i is the token's
  own projected embedding x_i and the e_m are the LLM's input embeddings of the prompt's text after the image (the
  "question" signal: the question and the answer prompt, one embedding per token instead of per 77-token chunk),
  both in the LLM's input space. The reference's formula (negated mean cosine, min-max, kernel, greedy MAP) is
  applied unchanged to them; `negate=False` is our variant that drops the sign flip, which the reference makes for
  CLIP's space and which may not carry over to the LLM's.
* min and max of rho per image (the reference takes them over the whole batch, which is the same at its only
  batch size, 1); batched with per-sample budgets and padding (never picked, outside every min and max);
* d_j^2 is clamped at 1e-12 before the square root, so a budget beyond the kernel's rank still picks distinct
  tokens (the reference divides by the square root of a non-positive number there and gets NaN); a flat relevance
  (max = min) divides by 1e-12 instead of 0;
* the last round's Cholesky row is not computed (the reference computes it; no pick reads it);
* the unit rows and cosines are computed in float32 from the model's dtype (the reference scales in fp16, then
  casts).
* Qwen2.5-VL: the reference has no code for it (a results image only); here it runs on the merger's output per
  image, as on LLaVA's projector output, with the tokens' own M-RoPE positions.

MACs per sample (`flops/analytic.py` counts matmul-like work only): the similarity N x N x D, the relevance
N x M x D, and the greedy's Cholesky rows, t x N in round t, for t = 1 .. T - 2 (round 0's row is a row of L; the
last round's row conditions no further pick and is not computed): N (T - 1)(T - 2) / 2.

Published: LLaVA-1.5-7B at 64 tokens, 61.4 average over ten benchmarks, 97.0 % of the 576-token 63.4 (the
project page's results image, probably the paper's Table 1; docs/references/cdpruner.md section 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from methods._ops import gather_tokens, sample_budgets, select_picks
from methods._registry import register_reducer
from methods.base import Reduced, Site, TokenReducer, Tokens

TINY = 1e-12  # the smallest marginal gain and relevance range divided by


def conditional_kernel(x: Tensor, text: Tensor, text_valid: Tensor, valid: Tensor | None = None,
                       negate: bool = True) -> Tensor:
    """L = diag(r) S diag(r): cosine similarity of the tokens, scaled by their min-max relevance to the text.

    Args:
        x: (B, N, D) tokens.
        text: (B, M, D) text embeddings; text_valid: (B, M) bool.
        valid: (B, N) bool, False on padding (its rows and columns are 0, outside the min and max).
        negate: the reference's sign: relevance is the *negated* mean cosine to the text.

    Returns:
        (B, N, N) float32 kernel.
    """
    xn = F.normalize(x.float(), dim=-1)  # (B, N, D) unit rows (a zero padding row stays 0)
    sim = xn @ xn.transpose(1, 2)  # (B, N, N)
    tn = F.normalize(text.float(), dim=-1)  # (B, M, D)
    cos = xn @ tn.transpose(1, 2)  # (B, N, M)
    w = text_valid.float().unsqueeze(1)  # (1 or B, 1, M)
    rho = (cos * w).sum(-1) / w.sum(-1).clamp_min(1)  # (B, N) mean over the text's real tokens
    rho = -rho if negate else rho
    real = torch.ones_like(rho, dtype=torch.bool) if valid is None else valid
    lo = rho.masked_fill(~real, float("inf")).amin(1, keepdim=True)  # (B, 1)
    hi = rho.masked_fill(~real, float("-inf")).amax(1, keepdim=True)
    r = ((rho - lo + 1e-6) / (hi - lo).clamp_min(TINY)) * real  # (B, N), 0 on padding
    return r.unsqueeze(2) * sim * r.unsqueeze(1)


def greedy_map_order(kernel: Tensor, k: int, valid: Tensor | None = None) -> Tensor:
    """Fast greedy MAP inference of a DPP (Chen, Zhang and Zhou 2018): the first `k` picks of each sample, in pick
    order (`k` at most the valid tokens of every sample).

    Args:
        kernel: (B, N, N) positive semi-definite.
        valid: (B, N) bool, False on padding (never picked).

    Returns:
        (B, k) long indices into N, first pick first.
    """
    b, n, _ = kernel.shape
    rows = torch.arange(b, device=kernel.device)
    chol = kernel.new_zeros(b, k, n)  # (B, T, N) the Cholesky rows of the picks so far
    gain = kernel.diagonal(dim1=1, dim2=2).clone()  # (B, N) d^2, each token's marginal gain
    if valid is not None:
        gain = gain.masked_fill(~valid, float("-inf"))
    picks = []
    for i in range(k):  # sequential by definition: each pick conditions the next
        j = gain.argmax(-1)  # (B,) the first index among equals
        picks.append(j)
        if i == k - 1:  # the last pick's row would condition no further pick
            break
        e = kernel[rows, j]  # (B, N)
        if i:
            e = e - torch.bmm(chol[rows, :i, j].unsqueeze(1), chol[:, :i]).squeeze(1)  # (B, 1, i) @ (B, i, N)
        e = e / gain[rows, j].clamp_min(TINY).sqrt().unsqueeze(-1)
        chol[:, i] = e
        gain = gain - e.square()
        gain[rows, j] = float("-inf")
    return torch.stack(picks, 1) if picks else torch.zeros(b, 0, dtype=torch.long, device=kernel.device)


@register_reducer("cdpruner")
class CDPruner(TokenReducer):
    """Keep the projected tokens of the largest conditional DPP MAP: diverse, weighted by relevance to the question.

    Args:
        negate: True (the reference): relevance is the negated cosine to the text; False: the cosine itself (ours).
    """

    site = Site.EMBEDDINGS
    needs = frozenset({"question"})

    def __init__(self, budget: int, negate: bool = True) -> None:
        super().__init__(budget)
        self.negate = negate

    def forward(self, t: Tokens) -> Reduced:
        b, n, d = t.x.shape
        if t.text is None or t.text.embeds is None:
            raise ValueError("cdpruner needs the question's tokens (Tokens.text.embeds); run it through an adapter "
                             "(methods.llava.ReducedLlava, methods.qwen.ReducedQwen)")
        counts = torch.full((b,), n, device=t.x.device) if t.valid is None else t.valid.sum(1)  # (B,)
        k = torch.minimum(sample_budgets(self.budget, t.budget, n, b, t.x.device), counts)  # (B,) at most what is there
        kmax = int(k.max())
        kernel = conditional_kernel(t.x, t.text.embeds, t.text.valid, t.valid, self.negate)  # (B, N, N)
        order = greedy_map_order(kernel, kmax, t.valid)  # (B, Kmax) pick order
        keep, valid = select_picks(order, k, n, t.valid)  # (B, K) the first k picks, in original order
        m = t.text.valid.sum(1)  # (B,) real text tokens
        # the similarity, the relevance, and the greedy's rows 1..k-2 (t x N each)
        macs = counts * counts * d + counts * m * d + counts * (k - 1) * (k - 2) // 2
        return Reduced(x=gather_tokens(t.x, keep), keep=keep, valid=valid, macs=macs.long())  # (B, K, D)
