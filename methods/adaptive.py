"""Adaptive, budget-conditioned token pruning: a learned controller picks exactly K patch tokens per sample.

This project's method (the user's SEED_PLAN), built on AdaLLaVA's recipe (Xu, Nguyen et al., "Learning to Inference
Adaptively for Multimodal Large Language Models", arXiv 2503.10905): a scalar budget is encoded (sinusoidal, 128
frequencies, then an MLP), fused with the image content, and a head scores every patch; "how many" is the budget
itself (K = budget), "which" comes from the scores. Selection is Gumbel top-K in training (exactly K patches per
sample, drawn without replacement from the scores' softmax) and plain top-K in eval. Trained with the LM loss only
and a random budget per batch (`python -m benchmarks.tools.train_adaptive`).

Site: features. The kept patches go to the projector in their original order (CLS is dropped before the
controller, as LLaVA's "default" feature selection does); the LLM sees exactly K visual tokens, in training as in
eval.

**Gradient estimator: a deviation from the plan, measured.** The plan (and AdaLLaVA) use K rounds of masked
Gumbel-softmax with the straight-through trick (tau = 5). AdaLLaVA's mask switches whole layers or heads, whose "off"
state is exact; a dropped *token* has no such state, and the mask's straight-through gradient then measures how
sensitive the loss is to a patch, not whether keeping it helps. On the smoke model it learned to avoid the question's
objects, below `random`, whichever way the mask acted (the numbers: docs/adaptive.md, "How it learns"). The default
estimator is therefore the score function (REINFORCE): the Gumbel top-K draw is a Plackett-Luce sample whose
log-probability is exact (`plackett_luce_topk`); each question is run with S draws (default 4) and a draw's advantage
is how much lower its answer loss is than the other draws' mean (leave-one-out baseline). The LLM and the features
need no gradient, so a step is S forward passes and no backward through the model. The loss is still the LM loss alone
(no FLOPs or sparsity term), one budget per batch. The straight-through estimator stays available (`--estimator
straight_through`, the mean-reference variant) to reproduce the plan as written.

* `adaptive_b` (Option B): the vision encoder runs unchanged; the budget embedding attends to the patch features
  (one cross-attention, budget as query) and the fused vector conditions the scores.
* `adaptive_a` (Option A): a budget token (budget embedding + its own learned position embedding) is appended as the
  last position of the vision encoder's input, [CLS, P1..PN, BUDGET], and goes through the same encoder layers
  (the checkpoint's weights, unchanged); its output at the feature layer conditions the scores. It is appended
  after the patch and position embeddings and before the encoder's pre-LayerNorm, so it is normalised like the
  other tokens. The encoder runs on N + 2 tokens (counted in the token trace).
* `budget_blind`: the ablation; the same scorer with no budget input (content only).

Differs from AdaLLaVA: the budget is a token count, encoded as the ratio K / N in [0, 1] (AdaLLaVA quantises a
latency to a layer count); the controller selects tokens, not layers or heads. The budget embedding's MLP is
LayerNorm(256) -> Linear -> GELU -> Linear as in AdaLLaVA, with a narrower hidden width (`hidden`, default 256).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from methods._ops import gather_tokens, sample_budgets, select_top
from methods._registry import register_reducer
from methods.base import Reduced, TokenReducer, Tokens
from methods.cli import first_line

CONFIG_FILE = "controller.json"
ESTIMATORS = ("reinforce", "straight_through")
WEIGHTS_FILE = "controller.safetensors"
NEVER = -1e4  # the keep logit of a padding position: far below any score, finite so that log-probabilities stay so


def budget_encoding(ratio: Tensor, num_freqs: int = 128) -> Tensor:
    """(B,) ratios in [0, 1] -> (B, 2 * num_freqs): [sin(s f), cos(s f)], s = 2 pi ratio, f_i = 10000^(-i/num_freqs)."""
    freqs = 10000.0 ** (-torch.arange(num_freqs, device=ratio.device, dtype=torch.float32) / num_freqs)
    s = 2 * math.pi * ratio.float().unsqueeze(1) * freqs  # (B, F)
    return torch.cat([s.sin(), s.cos()], dim=1)


class BudgetEmbedding(nn.Module):
    """Scalar budget ratio -> vector of width `dim`.

    Sinusoidal encoding, then LayerNorm -> Linear -> GELU -> Linear.
    """

    def __init__(self, dim: int, num_freqs: int = 128, hidden: int = 256) -> None:
        super().__init__()
        self.num_freqs = num_freqs
        self.mlp = nn.Sequential(nn.LayerNorm(2 * num_freqs), nn.Linear(2 * num_freqs, hidden), nn.GELU(),
                                 nn.Linear(hidden, dim))

    def forward(self, ratio: Tensor) -> Tensor:
        return self.mlp(budget_encoding(ratio, self.num_freqs))  # (B, D)


def gumbel_topk(logits: Tensor, k: Tensor, tau: float = 5.0, training: bool = True) -> Tensor:
    """Exactly k[b] items per row: AdaLLaVA's `n_times_gumbel_softmax`, vectorised over the batch.

    Training: K rounds; each adds Gumbel(0, 1) noise once (shared by the rounds, so the result is a draw without
    replacement), masks the items already picked, and takes the hard one-hot of the softmax's argmax with the
    straight-through trick (y_hard - stopgrad(y_soft) + y_soft, y_soft = softmax((logits + g) / tau)). Eval: top-k.

    Args:
        logits: (B, N) scores.
        k: (B,) long, items per row (1 <= k <= N).

    Returns:
        (B, N) mask with exactly k[b] ones per row going forward (gradients flow to `logits` in training).
    """
    b, n = logits.shape
    kmax = int(k.max())
    if not training:
        top = logits.topk(kmax, dim=1).indices  # (B, K)
        ranked = torch.arange(kmax, device=logits.device).unsqueeze(0) < k.unsqueeze(1)
        return torch.zeros_like(logits).scatter(1, top, ranked.to(logits.dtype))
    gumbel = -torch.empty_like(logits).exponential_().log()
    z = (logits + gumbel) / tau  # (B, N)
    picked = torch.zeros(b, n, dtype=torch.bool, device=logits.device)
    total = torch.zeros_like(logits)
    for i in range(kmax):
        active = (i < k).unsqueeze(1)  # (B, 1): rows that still pick
        y_soft = z.masked_fill(picked, float("-inf")).softmax(dim=1)  # (B, N)
        y_hard = F.one_hot(y_soft.argmax(dim=1), n).to(logits.dtype)
        total = total + torch.where(active, y_hard - y_soft.detach() + y_soft, torch.zeros_like(y_soft))
        picked = picked | (y_hard.bool() & active)
    return total


def plackett_luce_topk(logits: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Draw exactly k[b] items per row without replacement, and the log-probability of the draw.

    The draw is the Gumbel top-K of `logits` (add Gumbel(0, 1) noise once, keep the k largest), which is a sample of
    the first k places of a Plackett-Luce ranking with weights exp(logits); its log-probability (of that ordered
    draw) is sum_r [l_(r) - logsumexp(l_(r)..l_(N))] over the first k ranks. This is what the score-function
    (REINFORCE) estimator differentiates.

    Args:
        logits: (B, N) scores.
        k: (B,) long, items per row (1 <= k <= N).

    Returns:
        mask: (B, N) float, exactly k[b] ones per row (no gradient).
        log_prob: (B,) log-probability of the drawn ordered selection (differentiable in `logits`).
    """
    gumbel = -torch.empty_like(logits).exponential_().log()
    order = (logits.detach() + gumbel).argsort(dim=1, descending=True)  # (B, N) a drawn ranking
    ranked = logits.gather(1, order)  # (B, N) logits in drawn order
    rest = ranked.flip(1).logcumsumexp(1).flip(1)  # (B, N) logsumexp of ranked[r:], the items still available
    first_k = torch.arange(logits.size(1), device=logits.device).unsqueeze(0) < k.unsqueeze(1)  # (B, N)
    log_prob = ((ranked - rest) * first_k).sum(1)  # (B,)
    mask = torch.zeros_like(logits).scatter(1, order, first_k.to(logits.dtype)).detach()
    return mask, log_prob


@dataclass(frozen=True)
class ControllerConfig:
    """What a trained controller needs to be rebuilt: saved next to its weights."""

    method: str
    dim: int  # feature width at the features site (LLaVA-1.5: the vision tower's 1024; Qwen2.5-VL: the LLM's)
    num_patches: int | None  # tokens per image; None for families whose images differ in size (any count)
    hidden: int = 256
    heads: int = 4
    tau: float = 5.0  # Gumbel-softmax temperature; only the straight-through estimator uses it
    estimator: str = "reinforce"  # how training gets gradients to the scores: one of ESTIMATORS
    text_dim: int = 0  # width of the question's tokens (the LLM's input embeddings) for a controller that reads them

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator {self.estimator!r} is not one of {ESTIMATORS}")


class _Adaptive(TokenReducer):
    """Shared body: scorer, Gumbel top-K, saving and loading. Subclasses say where the budget meets the content."""

    conditioning: ClassVar[str] = ""  # "cross_attention", "budget_token" or "none"
    needs_checkpoint: ClassVar[bool] = True  # the runner looks in MODEL/controllers/<name>/seed<N> by default

    def __init__(self, budget: int | None = None, checkpoint: str | Path | None = None,
                 config: ControllerConfig | None = None) -> None:
        super().__init__(budget if budget is not None else 1)
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        if (checkpoint is None) == (config is None):
            raise ValueError(f"{self.name}: no trained controller; train one with `python -m "
                             f"benchmarks.tools.train_adaptive --model MODEL --method {self.name}` (it lands in "
                             f"MODEL/controllers/{self.name}/seed0) or pass --method-args {self.name}.checkpoint=DIR")
        if checkpoint is not None:
            config = load_config(checkpoint, self.name)
        self.config = config
        d, h = config.dim, config.hidden
        self.budget_embedding = BudgetEmbedding(d, hidden=h) if self.conditioning != "none" else None
        self.norm = nn.LayerNorm(d)
        self.content = nn.Linear(d, h)
        self.condition = nn.Linear(d, h) if self.conditioning != "none" else None
        self.head = nn.Sequential(nn.GELU(), nn.Linear(h, 1))
        self.build_fusion(config)
        if checkpoint is not None:
            try:
                state = load_file(str(Path(checkpoint) / WEIGHTS_FILE))
                missing, unexpected = self.load_state_dict(state, strict=False)
            except Exception as e:  # unreadable file, or tensors of another shape
                raise ValueError(f"{checkpoint}: cannot load the {self.name} controller ({first_line(e)}); retrain "
                                 f"it with `python -m benchmarks.tools.train_adaptive --method {self.name}`") from None
            if missing or unexpected:
                raise ValueError(f"{checkpoint} does not match {self.name}: missing {missing}, unexpected {unexpected}")

    def build_fusion(self, config: ControllerConfig) -> None:
        """Create the modules where budget and content meet (subclasses)."""

    def check_model(self, num_patches: int | None, feature_width: int) -> None:
        """`num_patches` None: the model's images differ in size (a controller for any count is needed)."""
        fixed = self.config.num_patches
        if feature_width != self.config.dim or (fixed is not None and num_patches != fixed):
            def said(n: int | None) -> str:
                return "images of any size" if n is None else f"{n} patches"
            raise ValueError(f"{self.name}: this controller was trained for {said(fixed)} of width {self.config.dim}, "
                             f"the model gives {said(num_patches)} of width {feature_width}; train one for this "
                             f"model with `python -m benchmarks.tools.train_adaptive --method {self.name}`")

    def ratio(self, k: Tensor, n: Tensor | int) -> Tensor:
        return k.float() / n  # (B,) the budget as a share of each image's patches, in [0, 1]

    def budgets(self, t: Tokens, n: Tensor) -> Tensor:
        """(B,) tokens to keep: the budget, at most each image's `n` (B,) tokens."""
        return sample_budgets(self.budget, t.budget, t.x.size(1), t.x.size(0), t.x.device).minimum(n)

    def fused(self, t: Tokens, k: Tensor, n: Tensor) -> Tensor | None:
        """(B, D) the budget-and-content vector that conditions the scores (None: content only); `n` (B,) is each
        image's token count (`t.valid` marks them when images differ in size)."""
        raise NotImplementedError

    def scores(self, t: Tokens, k: Tensor, n: Tensor) -> Tensor:
        """(B, N) keep logits in the controller's dtype (its inputs are cast to it: a float32 controller scores a
        bfloat16 model's features); padding positions (`t.valid` False) get `NEVER`."""
        dt = next(self.head.parameters()).dtype
        t = replace(t, x=t.x.to(dt), extra=None if t.extra is None else t.extra.to(dt))
        h = self.content(self.norm(t.x))  # (B, N, H)
        f = self.fused(t, k, n)
        if f is not None:
            h = h + self.condition(f).unsqueeze(1)
        logits = self.head(h).squeeze(-1)
        return logits if t.valid is None else logits.masked_fill(~t.valid, NEVER)

    def forward(self, t: Tokens) -> Reduced:
        b, n_max, width = t.x.shape
        self.check_model(n_max if self.config.num_patches is not None else None, width)
        n = (torch.full((b,), n_max, device=t.x.device) if t.valid is None else t.valid.sum(1))  # (B,) tokens
        k = self.budgets(t, n)  # (B,)
        logits = self.scores(t, k, n)  # (B, N)
        if self.training and self.config.estimator == "reinforce":  # score function: the LLM needs no graph
            mask, log_prob = plackett_luce_topk(logits, k)  # (B, N) exactly k ones (never padding), (B,)
            keep, valid = select_top(mask, k, t.valid)  # (B, K) ascending, as in eval
            return Reduced(x=gather_tokens(t.x.detach(), keep), keep=keep, valid=valid,
                           aux={"logits": logits, "log_prob": log_prob})
        if self.training:  # straight-through: the K patches, each moved by its mask value (1 forward)
            mask = gumbel_topk(logits, k, self.config.tau, training=True)  # (B, N), exactly k ones
            keep, valid = select_top(mask.detach(), k, t.valid)  # (B, K) ascending, as in eval
            real = (torch.ones_like(logits) if t.valid is None else t.valid.to(logits.dtype)).unsqueeze(-1)
            ref = ((t.x * real).sum((0, 1)) / real.sum()).detach()  # (D,) the "absent" reference: the mean patch
            x = gather_tokens(ref + mask.unsqueeze(-1).to(t.x.dtype) * (t.x - ref), keep)  # (B, K, D), = x forward
            return Reduced(x=x, keep=keep, valid=valid, aux={"logits": logits})
        keep, valid = select_top(logits, k, t.valid)  # (B, K) ascending: eval is plain top-K (= gumbel_topk's eval)
        return Reduced(x=gather_tokens(t.x, keep), keep=keep, valid=valid, macs=self.macs(n, self.words(t)),
                       aux={"logits": logits})

    def words(self, t: Tokens) -> Tensor | int:
        """(B,) question tokens the controller reads per sample (0: it reads none)."""
        return 0

    def macs(self, n: Tensor | int, m: Tensor | int = 0) -> Tensor | int:
        """MACs of scoring one sample's n patches: content N D H and head N H; with a budget, its embedding
        (2F H + H D) and the condition (D H); plus the subclass's fusion (over `m` question tokens where it reads
        them)."""
        d, h = self.config.dim, self.config.hidden
        total = n * d * h + n * h
        if self.budget_embedding is not None:
            total += 2 * self.budget_embedding.num_freqs * h + h * d + d * h
        return total + self.fusion_macs(n, m)

    def fusion_macs(self, n: Tensor | int, m: Tensor | int = 0) -> Tensor | int:
        """MACs of the budget-content fusion for one sample of `n` patches and `m` question tokens (subclasses)."""
        return 0

    def save(self, directory: str | Path) -> None:
        """Write the controller's weights and config (small files) to `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")


def load_config(checkpoint: str | Path, method: str) -> ControllerConfig:
    path = Path(checkpoint) / CONFIG_FILE
    if not path.is_file() or not (Path(checkpoint) / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint} is not a trained controller folder ({CONFIG_FILE} + {WEIGHTS_FILE}); "
                                f"train one with `python -m benchmarks.tools.train_adaptive --method {method}`")
    try:
        config = ControllerConfig(**json.loads(path.read_text()))
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a controller config this version understands: {e}") from None
    if config.method != method:
        raise ValueError(f"{checkpoint} holds a {config.method} controller, not {method}")
    return config


@register_reducer("adaptive_b")
class AdaptiveB(_Adaptive):
    """Option B: budget embedding cross-attends to the patch features after the encoder; fused vector conditions."""

    conditioning = "cross_attention"

    def build_fusion(self, config: ControllerConfig) -> None:
        self.attend = nn.MultiheadAttention(config.dim, config.heads, batch_first=True)

    def fusion_macs(self, n: Tensor | int, m: Tensor | int = 0) -> Tensor | int:
        d = self.config.dim  # q and out projections D^2 each, k and v N D^2 each, scores and weighted sum N D each
        return 2 * d * d + 2 * n * d * d + 2 * n * d

    def fused(self, t: Tokens, k: Tensor, n: Tensor) -> Tensor:
        q = self.budget_embedding(self.ratio(k, n)).unsqueeze(1).to(t.x.dtype)  # (B, 1, D)
        kv = self.norm(t.x)  # (B, N, D)
        pad = None if t.valid is None else ~t.valid  # (B, N) keys the budget may not attend to
        kv, pad = self.keys(t, kv, pad)
        return self.attend(q, kv, kv, key_padding_mask=pad, need_weights=False)[0][:, 0]  # (B, D)

    def keys(self, t: Tokens, kv: Tensor, pad: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """What the budget query attends to, (B, S, D), and (B, S) True where it may not (None: all of it): the
        patches here."""
        return kv, pad


@register_reducer("adaptive_a")
class AdaptiveA(_Adaptive):
    """Option A: a budget token goes through the vision encoder with the patches; its output conditions."""

    conditioning = "budget_token"

    def build_fusion(self, config: ControllerConfig) -> None:
        self.position = nn.Parameter(torch.zeros(1, 1, config.dim))  # the budget token's own position embedding

    def extra_vision_tokens(self, batch: int, num_patches: int, budgets: Tensor | None) -> Tensor:
        k = sample_budgets(self.budget, budgets, num_patches, batch, self.position.device)
        return self.budget_embedding(self.ratio(k, num_patches)).unsqueeze(1) + self.position  # (B, 1, D)

    def fused(self, t: Tokens, k: Tensor, n: Tensor) -> Tensor:
        if t.extra is None:
            raise ValueError("adaptive_a needs the budget token's encoder output (Tokens.extra); run it through "
                             "methods.llava.ReducedLlava")
        return t.extra[:, -1]  # (B, D) the budget token after the encoder layers


@register_reducer("budget_blind")
class BudgetBlind(_Adaptive):
    """Ablation: the same learned scorer with no budget input (content only); K still comes from the budget."""

    conditioning = "none"

    def fused(self, t: Tokens, k: Tensor, n: Tensor) -> None:
        return None


@register_reducer("adaptive_q")
class AdaptiveQ(AdaptiveB):
    """Option B with the question: the budget query attends to the patch features and to the question's tokens.

    As AdaLLaVA's budget token attends to the image and the text before its scheduler reads it (Path 1): "how many"
    is still the budget, "which" depends on the budget, the image and the question.

    The question's tokens are the LLM's own input embeddings of the prompt's text after the image (the question and
    the answer prompt; the "question" signal, a lookup), LayerNorm-ed and projected to the controller's width by one
    linear layer (M T D MACs for M tokens of width T), then appended to the patches as keys and values of the same
    cross-attention (its K and V projections and scores then run over N + M). The scorer is Option B's.

    Args:
        question: False masks the question out (the "text term off" ablation): the same trained weights, the budget
            query attends to the patches only, as `adaptive_b`'s does; its cost is then `adaptive_b`'s.
    """

    needs = frozenset({"question"})

    def __init__(self, budget: int | None = None, checkpoint: str | Path | None = None,
                 config: ControllerConfig | None = None, question: bool = True) -> None:
        super().__init__(budget, checkpoint, config)
        self.question = question

    def build_fusion(self, config: ControllerConfig) -> None:
        super().build_fusion(config)
        if config.text_dim < 1:
            raise ValueError(f"{self.name}: its controller config gives no question width (text_dim); build it with "
                             "methods.families.Family.controller_config, which reads the LLM's width")
        self.text_norm = nn.LayerNorm(config.text_dim)
        self.text = nn.Linear(config.text_dim, config.dim)

    def words(self, t: Tokens) -> Tensor | int:
        return t.text.valid.sum(1) if self.question and t.text is not None else 0

    def fusion_macs(self, n: Tensor | int, m: Tensor | int = 0) -> Tensor | int:
        d = self.config.dim  # the question's projection M T D, then Option B's attention over N + M keys
        return m * self.config.text_dim * d + super().fusion_macs(n + m)

    def keys(self, t: Tokens, kv: Tensor, pad: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if not self.question:
            return kv, pad
        if t.text is None or t.text.embeds is None:
            raise ValueError(f"{self.name} needs the question's tokens (Tokens.text.embeds); run it through an adapter "
                             "(methods.llava.ReducedLlava, methods.qwen.ReducedQwen)")
        e = t.text.embeds
        if e.size(-1) != self.config.text_dim:
            raise ValueError(f"{self.name}: this controller was trained on question tokens of width "
                             f"{self.config.text_dim}, the model gives {e.size(-1)}; train one for this model with "
                             f"`python -m benchmarks.tools.train_adaptive --method {self.name}`")
        words = self.text(self.text_norm(e.to(kv.dtype)))  # (B, M, D)
        if pad is None:
            pad = torch.zeros(kv.shape[:2], dtype=torch.bool, device=kv.device)
        return torch.cat([kv, words], 1), torch.cat([pad, ~t.text.valid], 1)  # (B, N + M, D), (B, N + M)
