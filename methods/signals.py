"""Signals: what an adapter computes for a reducer besides its tokens, each declared once.

A method names the signals it reads in `needs`. The entry of each signal here says at which site it is computed,
which `Tokens` fields it fills, their shapes, whether it is read at the layer below the reducing one, what computing
it costs (MACs, on the conventions of `flops/analytic.py`) and how to make a stand-in of the right shape (for
shape-only traces, `flops/shapes.py`, and the registry's contract tests). An adapter declares which signals it
provides at each site (`provides`) and computes each one with a provider function beside the state it reads
(`methods/llava.py`'s `FEATURE_PROVIDERS`, `methods/_llm.py`'s `LLM_PROVIDERS`); `check` refuses, in one line, a
reducer whose site, signals or layers an adapter cannot serve, and `runs` says which methods a family runs.

Adding a signal: one `Signal` entry here, one provider in each adapter that can compute it (and its name in that
adapter's `provides`), and a `Tokens` field in `methods/base.py` when it fills a new one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from methods.base import Site, TextTokens, TokenReducer


@dataclass(frozen=True)
class Dims:
    """The sizes of one reducer call that a stand-in or a MACs formula reads; a per-sample size is an int or a
    (B,) tensor where samples differ.

    Attributes:
        batch: B.
        tokens: N, the visual tokens handed to the reducer.
        width: the width the signal is computed at: the vision encoder's hidden size (features site) or the LLM's
            (LLM site).
        seq: features site: the tokens entering the vision layer that makes (or consumes) the features, CLS and
            extras included; LLM site: the real tokens of the sequence before the reduction.
        extra: features site: the tokens a reducer appended to the vision encoder's input (E).
        head_dim: features site: the vision encoder's per-head width.
        feature_width: features site: the channels of the selected features (the feature layers concatenated).
        q_width, kv_width: LLM site: the widths of the query and key projections.
        text: LLM site: the text tokens after the image (M; the real ones, per sample, for MACs).
        image: LLM site: the image's tokens before any LLM-site reduction (N0).
        text_width: features site: the LLM's input-embedding width (the question's tokens, "question").
    """

    batch: int = 1
    tokens: int = 0
    width: int = 0
    seq: int | Tensor = 0
    extra: int = 0
    head_dim: int = 0
    feature_width: int = 0
    q_width: int = 0
    kv_width: int = 0
    text: int | Tensor = 0
    image: int = 0
    text_width: int = 0


@dataclass(frozen=True)
class Signal:
    """One signal an adapter can compute for a reducer.

    Attributes:
        name: as reducers name it in `needs`.
        site: where it is computed.
        fills: the `Tokens` fields it sets, with their shapes; "text.<field>" is a field of `Tokens.text`
            (`TextTokens`), which exists whenever a needed signal fills one of its fields.
        stand_in: (dims, generator) -> {field: tensor} of the right shapes and kinds, random values.
        macs: dims -> the MACs of computing it per sample (None: no matmul-like work).
        together: signals computed in one pass share a name here: their MACs are charged once.
        below: read at the layer below the reducing one (an LLM-site reducer's first layer must then be >= 1).
        question: it depends on the question (the prompt's text): a method that reads one "sees the question"
            (`sees_question`). The image's own tokens come before the question in the prompt, so in a causal LLM their
            keys and hidden states do not.
        requires: what a model must have to provide it, for the refusal of a family that cannot
            ("a vision CLS token").
        also: other sites it is served at (the question is the same before the projector and after it).
    """

    name: str
    site: Site
    fills: dict[str, str]
    stand_in: Callable[[Dims, torch.Generator], dict[str, Tensor]]
    macs: Callable[[Dims], int | Tensor] | None = None
    together: str = ""
    below: bool = False
    question: bool = False
    requires: str = ""
    also: tuple[Site, ...] = ()

    @property
    def sites(self) -> frozenset[Site]:
        """Every site a reducer may read it at."""
        return frozenset((self.site, *self.also))


def _cls_macs(d: Dims) -> int | Tensor:
    """The CLS query (width^2), every token's key ((seq - extra) width^2) and the CLS scores ((seq - extra) width),
    over the tokens the consuming layer sees besides the extras."""
    return d.width * d.width + (d.seq - d.extra) * (d.width * d.width + d.width)


def _query_row_macs(d: Dims) -> int | Tensor:
    """One query row against the cached keys: its query (width q_width) and its scores over `seq` keys."""
    return d.width * d.q_width + d.seq * d.q_width


CLS = "a vision CLS token"
SIGNALS: dict[str, Signal] = {s.name: s for s in (
    # features site: from the vision encoder around the feature layer (LLaVA: CLIP, which has a CLS token)
    Signal("cls_attn", Site.FEATURES, {"cls_attn": "(B, N)"}, together="cls", requires=CLS, macs=_cls_macs,
           stand_in=lambda d, g: {"cls_attn": torch.rand(d.batch, d.tokens, generator=g).softmax(-1)}),
    Signal("keys", Site.FEATURES, {"keys": "(B, N, width)"}, together="cls", requires=CLS, macs=_cls_macs,
           stand_in=lambda d, g: {"keys": torch.randn(d.batch, d.tokens, d.width, generator=g)}),
    Signal("feature_attn", Site.FEATURES, {"feature_attn": "(B, N)"}, requires=CLS,
           macs=lambda d: d.seq * d.width,  # the CLS query against every key, all heads; q and k are the layer's own
           stand_in=lambda d, g: {"feature_attn": torch.rand(d.batch, d.tokens, generator=g).softmax(-1)}),
    Signal("feature_keys", Site.FEATURES, {"feature_keys": "(B, N, head_dim)"}, requires=CLS,
           stand_in=lambda d, g: {"feature_keys": torch.randn(d.batch, d.tokens, d.head_dim, generator=g)}),
    Signal("feature_cls", Site.FEATURES, {"feature_cls": "(B, feature_width)"}, requires=CLS,
           stand_in=lambda d, g: {"feature_cls": torch.randn(d.batch, d.feature_width, generator=g)}),
    Signal("relevant", Site.FEATURES, {"relevant": "(B, N) bool"}, question=True,
           requires="the relevant patches on its own token grid (the tasks record them on LLaVA's)",
           stand_in=lambda d, g: {"relevant": torch.rand(d.batch, d.tokens, generator=g) < 0.1}),
    # the question before the LLM: the LLM's own input embeddings of the text after the image (a lookup, no MACs)
    Signal("question", Site.FEATURES, {"text.embeds": "(B, M, text_width)", "text.valid": "(B, M) bool"},
           question=True, also=(Site.EMBEDDINGS,),
           stand_in=lambda d, g: {"text.embeds": torch.randn(d.batch, d.text, d.text_width, generator=g),
                                  "text.valid": torch.ones(d.batch, d.text, dtype=torch.bool)}),
    # LLM site: from the decoder layers around the reducing one
    Signal("query_attn", Site.LLM, {"query_attn": "(B, N)"}, below=True, question=True, macs=_query_row_macs,
           stand_in=lambda d, g: {"query_attn": torch.rand(d.batch, d.tokens, generator=g)}),
    Signal("query_attn_next", Site.LLM, {"query_attn_next": "(B, N)"}, question=True,
           macs=lambda d: d.width * d.q_width + d.seq * d.width * d.kv_width + d.seq * d.q_width,  # + every key
           stand_in=lambda d, g: {"query_attn_next": torch.rand(d.batch, d.tokens, generator=g)}),
    Signal("key_norms", Site.LLM, {"key_norms": "(B, N)"}, below=True,
           stand_in=lambda d, g: {"key_norms": torch.rand(d.batch, d.tokens, generator=g)}),
    Signal("normed", Site.LLM, {"normed": "(B, N, width)"},
           stand_in=lambda d, g: {"normed": torch.randn(d.batch, d.tokens, d.width, generator=g)}),
    Signal("text", Site.LLM, {"text.normed": "(B, M, width)", "text.key_norms": "(B, M)"}, below=True, question=True,
           stand_in=lambda d, g: {"text.normed": torch.randn(d.batch, d.text, d.width, generator=g),
                                  "text.key_norms": torch.rand(d.batch, d.text, generator=g)}),
    Signal("text_attn", Site.LLM, {"text.attn": "(B, M, N)"}, below=True, question=True,
           macs=lambda d: d.text * _query_row_macs(d),  # every text token's row
           stand_in=lambda d, g: {"text.attn": torch.rand(d.batch, d.text, d.tokens, generator=g)}),
    Signal("embeds", Site.LLM, {"embeds": "(B, N0, width)", "text.embeds": "(B, M, width)"}, question=True,
           stand_in=lambda d, g: {"embeds": torch.randn(d.batch, d.image, d.width, generator=g),
                                  "text.embeds": torch.randn(d.batch, d.text, d.width, generator=g)}),
    # the image after a stand-in system prompt of 35 tokens, the text after it
    Signal("prompt_index", Site.LLM, {"prompt_index": "(B, N) long", "text.prompt_index": "(B, M) long"},
           stand_in=lambda d, g: {"prompt_index": 35 + torch.arange(d.tokens).expand(d.batch, -1),
                                  "text.prompt_index": 35 + d.tokens + torch.arange(d.text).expand(d.batch, -1)}),
)}


def sees_question(needs: frozenset[str]) -> bool:
    """Whether a method that reads the signals `needs` sees the question (`Signal.question`): FastV, PyramidDrop, DART
    and SparseVLM do, inside the LLM; the methods before the LLM that read the image alone do not."""
    return any(SIGNALS[name].question for name in needs)


def provide(needs: frozenset[str], providers: dict[str, Callable[[object], dict[str, Tensor]]],
            state: object) -> dict[str, Tensor]:
    """The `Tokens` fields (as `fills` names them) of every needed signal, each from the adapter's provider for it
    over the adapter's `state` at the reducing point."""
    fields: dict[str, Tensor] = {}
    for name in sorted(needs):
        fields.update(providers[name](state))
    return fields


def tokens_fields(values: dict[str, Tensor], text_valid: Tensor | None = None) -> dict[str, object]:
    """`Tokens` keyword arguments from signal fields as `fills` names them: the "text.*" ones gathered into one
    `TextTokens` when there are any, its mask `text_valid` (B, M) unless a signal filled "text.valid" itself."""
    out = {k: v for k, v in values.items() if not k.startswith("text.")}
    text = {k.removeprefix("text."): v for k, v in values.items() if k.startswith("text.")}
    if text:
        out["text"] = TextTokens(**{"valid": text_valid, **text})
    return out


def stand_ins(needs: frozenset[str], d: Dims, g: torch.Generator) -> dict[str, object]:
    """`Tokens` keyword arguments holding a random stand-in of each needed signal (in name order)."""
    values = {}
    for name in sorted(needs):
        values.update(SIGNALS[name].stand_in(d, g))
    return tokens_fields(values, torch.ones(d.batch, d.text, dtype=torch.bool))  # "question" fills its own mask


def signal_macs(needs: frozenset[str], d: Dims) -> int | Tensor:
    """MACs per sample of computing the needed signals (those computed together counted once)."""
    total, seen = 0, set()
    for name in sorted(needs):
        s = SIGNALS[name]
        if s.macs is not None and (s.together or name) not in seen:
            total = total + s.macs(d)
            seen.add(s.together or name)
    return total


@dataclass(frozen=True)
class Provides:
    """What an adapter serves, declared on its class (`provides`).

    Attributes:
        family: the family's name as users read it ("LLaVA-1.5").
        signals: per site it reduces at, the signals it computes there (a site missing is not served).
        extra_vision_tokens: why a reducer's extra vision-encoder tokens (`TokenReducer.extra_vision_tokens`) cannot
            join its encoder; "" when they can.
    """

    family: str
    signals: dict[Site, frozenset[str]]
    extra_vision_tokens: str = ""


def refusal(cls: type[TokenReducer], provides: Provides) -> str:
    """Why a family cannot run method `cls` at all, read from the class alone (its site, its signals, its extra
    vision tokens), in words that follow "it"; "" when it can."""
    if cls.site not in provides.signals:
        return f"acts at the {cls.site.value} site, which this family's adapter does not reduce at"
    groups: dict[str, list[str]] = {}  # why -> the missing signals it explains
    for name in sorted(cls.needs - provides.signals[cls.site]):
        sig = SIGNALS[name]
        if sig.requires:
            why = f"which require{{s}} {sig.requires}"
        elif cls.site not in sig.sites:
            where = " and ".join(sorted(x.value for x in sig.sites))
            why = f"computed at the {where} site{'s' * (len(sig.sites) > 1)} only"
        else:
            why = "which this family's adapter does not compute"
        groups.setdefault(why, []).append(name)
    if groups:
        return "needs " + ", and ".join(f"{' and '.join(names)}, {why.format(s='s' * (len(names) == 1))}"
                                        for why, names in groups.items())
    if provides.extra_vision_tokens and cls.extra_vision_tokens is not TokenReducer.extra_vision_tokens:
        return provides.extra_vision_tokens
    return ""


def runs(cls: type[TokenReducer], provides: Provides) -> bool:
    """Whether the family that `provides` describes runs method `cls` (at some budget and layers)."""
    return not refusal(cls, provides)


def refuse(cls: type[TokenReducer], provides: Provides) -> None:
    """Raise NotImplementedError, in one line that says why and names the methods the family runs, unless the
    family that `provides` describes runs method `cls` (read from the class alone)."""
    from methods._registry import get_reducer_class, list_reducers  # noqa: PLC0415 - the registry imports methods

    why = refusal(cls, provides)
    if why:
        able = [m for m in list_reducers() if runs(get_reducer_class(m), provides)]
        raise NotImplementedError(f"{cls.name} does not run on {provides.family}: it {why}; these do: "
                                  f"{', '.join(able)}")


def check(r: TokenReducer, provides: Provides, llm_layers: int, image_tokens: int) -> None:
    """Raise, in one line that says why, unless reducer `r` can run on a model of the family `provides` describes,
    whose language model has `llm_layers` layers and whose images carry `image_tokens` visual tokens (the
    largest count where they vary): NotImplementedError for a method the family does not run (`refuse`),
    ValueError for LLM layers out of range or below a signal read at the layer below (saying what to set)."""
    refuse(type(r), provides)
    if r.site is Site.LLM:
        low = 1 if any(SIGNALS[n].below for n in r.needs) else 0
        layers = r.llm_layers(llm_layers, image_tokens)
        if not layers or list(layers) != sorted(set(layers)) or not low <= layers[0] <= layers[-1] < llm_layers:
            where = f"layer {layers[0]}" if len(layers) == 1 else f"layers {list(layers)} (increasing)"
            raise ValueError(
                f"{r.name}: LLM {where} must be in [{low}, {llm_layers - 1}] for this {llm_layers}-layer language "
                f"model; set {r.name}.layer{'s' * (len(layers) > 1)}"
            )
