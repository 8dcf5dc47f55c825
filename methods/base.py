"""The reducer contract: what a site hands to a method, and what the method hands back.

A reducer is a pure torch module. It receives the visual tokens at its site plus the signals it asked for
(`needs`) and returns at most `budget` tokens. It never imports transformers, never holds a reference to the
model and never installs hooks: the adapters (`methods/llava.py`, `methods/qwen.py` and the LLM side they share,
`methods/_llm.py`) are the only code that knows where layers live, where the image span sits in the prompt and how
positions, masks and the KV cache follow a reduction. The signals a reducer may ask for are declared in
`methods/signals.py`.

Shape vocabulary used in every method file: B batch, N visual tokens in, K kept, D width, T prompt tokens,
L layers, H heads.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor, nn

from methods.budget import AUTO, Budget


class Site(enum.Enum):
    """Where a reducer acts."""

    VISION = "vision"  # before vision-encoder layer `layer`; the adapter keeps the CLS token itself
    FEATURES = "features"  # on the selected vision features, before the projector (LLaVA: CLS already dropped)
    EMBEDDINGS = "embeddings"  # on the projector's outputs (the LLM's input embeddings), before they are spliced in
    LLM = "llm"  # before LLM decoder layer `layer`, during prefill only; layers below keep every token


@dataclass
class TextTokens:
    """The prompt's text tokens after the image (the instruction and the answer prompt) at an LLM-site reduction
    point, M per sample (padded): DART's text pivots, SparseVLM's raters. Only the fields the reducer's `needs` ask
    for are set.

    Attributes:
        valid: (B, M) bool, False on padding.
        normed: (B, M, D) their hidden states entering the reducing layer, through the LLM's final norm ("text").
        key_norms: (B, M) L1 norm of their keys at the layer below (after RoPE, key/value heads concatenated; "text").
        attn: (B, M, N) each one's attention over the image tokens still in the sequence at the layer below: its
            query against that layer's cached keys, softmax per head over every real key up to its own position
            (causal), averaged over heads ("text_attn").
        embeds: (B, M, D) their LLM input embeddings ("embeds").
        prompt_index: (B, M) long, each one's index in its sample's unpadded sequence ("prompt_index").
    """

    valid: Tensor
    normed: Tensor | None = None
    key_norms: Tensor | None = None
    attn: Tensor | None = None
    embeds: Tensor | None = None
    prompt_index: Tensor | None = None


@dataclass
class Tokens:
    """What a site hands to a reducer.

    Attributes:
        x: (B, N, D) the visual tokens only (no CLS, no text).
        grid: patch grid (rows, cols) of the image before any reduction; N == rows * cols unless an earlier
            reduction already removed tokens.
        valid: (B, N) bool, present only when samples carry different numbers of tokens (padding is False).
        cls_attn: (B, N) CLS -> patch attention of the vision layer that consumes the features (features site;
            only when the reducer `needs` it), as PruMerge computes it: one fused head over the full q/k width,
            scaled by 1/sqrt(width), softmax over CLS and all patches.
        keys: (B, N, Dk) that layer's key projections of the patches (full width, before any head split).
        feature_attn: (B, N) CLS -> patch attention inside the vision layer that *produces* the features (HF's
            `attentions[vision_feature_layer]`, LLaVA-1.5's layer -2), softmax per head over CLS and every token,
            averaged over heads (features site; FasterVLM's and VisionZip's signal).
        feature_keys: (B, N, hd) that layer's key projections of the patches, averaged over heads (VisionZip).
        feature_cls: (B, Dv) the CLS token's features from the layer(s) the patches' come from (VisionZip keeps it).
        query_attn: (B, N) attention the last prompt token pays each image token at LLM layer `layer - 1`,
            heads averaged (LLM site).
        key_norms: (B, N) L1 norm of the image tokens' keys at LLM layer `layer - 1` (after RoPE, key/value heads
            concatenated; LLM site; DART's pivots).
        normed: (B, N, D) the image tokens' hidden states entering the reducing layer, through the LLM's final norm
            (LLM site; DART's similarities).
        text: the text tokens after the image, as `TextTokens` (LLM site: for "text", "text_attn" or "embeds"; features
            site: "question", their LLM input embeddings).
        embeds: (B, N0, D) the LLM input embeddings of every one of the image's N0 tokens, as the projector made them,
            whatever earlier stages removed (LLM site; SparseVLM chooses its raters from them).
        query_attn_next: (B, N) the same row at the layer about to run (the one the reduced tokens enter), from
            that layer's own query and key projections of its input, before it runs (LLM site; PyramidDrop's).
        budget: (B,) long, optional per-sample budgets that override the reducer's own `budget`.
        sample_key: (B,) long, a key derived from each sample's exact inputs (its pixels), for methods that need
            per-sample randomness that does not depend on the batch a sample lands in.
        extra: (B, E, Dv) at the features site, the feature-layer outputs of the tokens the reducer appended to
            the vision encoder's input with `extra_vision_tokens` (they are not among `x`).
        image_tokens: (B,) long, at the LLM site when images differ in size (Qwen2.5-VL): each image's visual
            tokens before any LLM-site reduction; None means grid rows x cols for every sample.
        relevant: (B, N) bool, at the features site: the patches the task records as relevant to each question
            (`relevant_patches` of the synthetic tasks; "relevant", the `oracle` reference's only signal).
        prompt_index: (B, N) long, at the LLM site: each image token's index in its sample's unpadded sequence as it
            stands (padding excluded; tokens an earlier stage removed are not counted). DART's reference iterates a
            Python set of these.
        stage: at the LLM site, which of the reducer's `llm_layers` this call is at (0 for the first).
        depth: at the LLM site, the language model's number of decoder layers.
    """

    x: Tensor
    grid: tuple[int, int]
    valid: Tensor | None = None
    cls_attn: Tensor | None = None
    keys: Tensor | None = None
    feature_attn: Tensor | None = None
    feature_keys: Tensor | None = None
    feature_cls: Tensor | None = None
    query_attn: Tensor | None = None
    query_attn_next: Tensor | None = None
    key_norms: Tensor | None = None
    normed: Tensor | None = None
    text: TextTokens | None = None
    embeds: Tensor | None = None
    budget: Tensor | None = None
    sample_key: Tensor | None = None
    extra: Tensor | None = None
    image_tokens: Tensor | None = None
    relevant: Tensor | None = None
    prompt_index: Tensor | None = None
    stage: int = 0
    depth: int | None = None


@dataclass
class Reduced:
    """What a reducer returns.

    Attributes:
        x: (B, K, D) the tokens that go on, K <= budget.
        keep: (B, K) long source index (into the site's N tokens) of each returned token, -1 where a token is
            not a single source token (a merged summary token, for instance). None means "all N, unchanged".
        anchor: (B, K) long, LLM site only: for each token with keep -1, the source index of a removed token whose
            place in the sequence and position id it takes (SparseVLM's recycled tokens); anchors are distinct and
            never a kept token. None when every keep >= 0.
        valid: (B, K) bool, only when per-sample counts differ; False slots are padding and are dropped.
        macs: (B,) long, multiply-accumulates of the reducer's own matmul-like work per sample (scoring, merging,
            a controller), on the conventions of `flops/analytic.py`; None means none. The signals the adapter
            computes for the reducer (`needs`) are counted by the adapter, not here.
        aux: training-time extras (e.g. controller logits, the log-probability of a sampled selection); the
            adapter hands them to the caller of `prefill` unchanged.
    """

    x: Tensor
    keep: Tensor | None = None
    anchor: Tensor | None = None
    valid: Tensor | None = None
    macs: Tensor | None = None
    aux: dict[str, Tensor] = field(default_factory=dict)


class TokenReducer(nn.Module):
    """Base class for every method. Subclasses set `site` and `needs` and implement `forward`.

    Args:
        budget: a `methods.budget.Budget`, or what `Budget.of` reads (a count, a fraction, "auto"): the largest
            number of visual tokens the LLM sees from the reduction point on (a count >= 1, then `budget`); a fraction
            of each image's tokens (a float in (0, 1), `fraction`), for families whose images differ in size: the
            adapter then passes each sample's count as `Tokens.budget` and `budget` is None; "auto" (`auto`) for
            methods that choose their own count; or `Budget.own(label)` for a method whose own arguments set the count
            (`own_count`). Kept as `token_budget`. Methods that never reduce (`full`) accept None.
        layer: for the VISION and LLM sites, the index of the first layer that sees the reduced tokens (an LLM-site
            method that acts at several layers overrides `llm_layers` instead and may leave it None).
    """

    name: ClassVar[str] = ""  # set by @register_reducer
    site: ClassVar[Site] = Site.FEATURES
    needs: ClassVar[frozenset[str]] = frozenset()  # signal names, each an entry of `methods.signals.SIGNALS`
    uses_budget: ClassVar[bool] = True  # False for methods (like `full`) that run once whatever the budgets
    supports_auto: ClassVar[bool] = False  # True when the method can choose its own count (budget "auto")
    needs_checkpoint: ClassVar[bool] = False  # True for learned methods: a `checkpoint` argument, found by default in
    # MODEL/controllers/<name>
    budget_unit: ClassVar[str] = "kept"  # "layer_mean": the budget is the visual tokens averaged over the LLM's
    # layers (PyramidDrop), not the count kept from the reduction point on
    count_args_example: ClassVar[dict] = {}  # for a method whose own arguments can set its token count
    # (`budget_label`): such arguments, as its paper uses them (FastV's {"ratio": 0.5}); the speed benchmark times it
    seeded: ClassVar[bool] = False  # True for methods that draw at random: a `seed` argument, set from --seed
    reference: ClassVar[bool] = False  # True for a reference row that is not a method (`oracle` reads the task's
    # relevant patches): tables and figures mark it, comparisons of methods leave it out
    positions: str = "original"  # LLM site, after this method removes tokens: "original" (survivors keep
    # their position ids; a merged token takes its anchor's place), "renumber" (PyramidDrop's and SparseVLM's
    # reference code: positions 0..T'-1 after every stage, merged tokens right after the kept image tokens, and each
    # layer decodes on from its own prompt length), or "reference": "renumber" where positions are 1-D (LLaVA),
    # "original" on Qwen2.5-VL's M-RoPE (no reference code renumbers it); methods that renumber set it per instance

    method_args: dict  # the constructor's arguments as called (None ones left out), recorded by `create_reducer`

    def __init__(self, budget: Budget | int | float | str | None, layer: int | None = None) -> None:
        super().__init__()
        who = self.name or type(self).__name__
        if isinstance(budget, float) and not 0 < budget < 1:
            raise ValueError(f"{who}: a fraction budget must be strictly between 0 and 1, got {budget}")
        try:
            spend = None if budget is None else Budget.of(budget)
        except ValueError:
            spend = None
        usable = spend is not None and spend.kind != "all"  # `full`'s every-token budget is no reducer's
        if not usable and (budget is not None or self.uses_budget):
            raise ValueError(f"{who}: budget must be an integer >= 1 or a fraction in (0, 1), got {budget!r}")
        if spend is not None and spend.kind == AUTO and not self.supports_auto:
            raise ValueError(f"{who} has no {AUTO!r} budget; give a number of visual tokens")
        self.token_budget = spend if self.uses_budget else None
        self.auto = spend is not None and spend.kind == AUTO
        self.fraction = spend.value if spend is not None and spend.kind == "fraction" and self.uses_budget else None
        budget = spend.value if spend is not None and spend.kind == "count" else None
        multi = type(self).llm_layers is not TokenReducer.llm_layers
        if self.site in (Site.VISION, Site.LLM) and (layer is None and not multi or layer is not None and layer < 0):
            raise ValueError(f"{type(self).__name__} acts at site {self.site.value!r} and needs a `layer` index >= 0")
        self.budget = budget
        self.layer = layer

    @property
    def own_count(self) -> bool:
        """Whether this instance's own arguments set its token count (`budget_label`: FastV's `ratio`), not a
        budget."""
        return self.token_budget is not None and self.token_budget.kind == "method"

    @classmethod
    def budget_label(cls, kwargs: dict) -> str | None:
        """A cell label when these constructor arguments set the token count themselves (FastV's `ratio`), so the
        method runs once, not once per budget; None otherwise. A method that overrides it sets
        `count_args_example`."""
        return None

    def check_model(self, num_patches: int, feature_width: int) -> None:
        """Raise ValueError (saying what to do) if this reducer cannot run on a model with `num_patches` patches of
        `feature_width` channels at the features site; called before a run starts. Most methods run on any model."""

    def llm_layers(self, n_layers: int, num_patches: int) -> tuple[int, ...]:
        """LLM site: the decoder layers before which this reducer runs, in order, on an LLM of `n_layers` layers whose
        prompts carry `num_patches` visual tokens; call `i` gets ``Tokens.stage == i``. Raise ValueError (saying what
        to do) when the reducer cannot run there. Default: once, before `layer`."""
        return (self.layer,)

    def extra_vision_tokens(self, batch: int, num_patches: int, budgets: Tensor | None) -> Tensor | None:
        """(B, E, Dv) tokens to append to the vision encoder's input (after the patch and position embeddings,
        before the encoder's pre-LayerNorm), or None. They run through the encoder layers with the patches and come
        back, at the features site, as `Tokens.extra`."""
        return None

    def forward(self, t: Tokens) -> Reduced:  # pragma: no cover - abstract
        raise NotImplementedError
