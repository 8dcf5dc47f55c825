"""The LLM side of a reduced prefill, shared by the adapters (`methods/llava.py`, `methods/qwen.py`): the decoder
layers over a left-padded sequence, the LLM-site reductions before the reducer's layers (tokens removed, not masked;
original position ids and a merged token in a removed token's place, or, for a reducer whose `positions` renumber,
positions 0..T'-1 after each stage with merged tokens after the kept image tokens), the signals computed for them
from what the prefill already has, the token trace, and greedy decoding steps over the KV cache (with renumbered
positions each layer decodes on from its own prompt length, as the reference code's layers do).

An adapter builds the spliced `Seq` (hidden states, real and visual masks, position ids on its rotary axes, source
patch indices) and an `ImageSide` (the image's geometry and vision-side counts), inherits `LLMSide`, and says how its
language model turns position ids into rotary cos/sin (`_rotary`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from torch import Tensor
from transformers import DynamicCache

from methods._ops import additive_mask, gather_tokens, pack_true, running_index
from methods.base import Reduced, Site, Tokens
from methods.signals import Dims, provide, signal_macs, tokens_fields
from methods.trace import Generation, Timing, TokenTrace


@dataclass
class DecodeState:
    """Decoding state after prefill: cache, one padding mask per group of layers, next positions; and what the
    prefill produced for its caller (logits, token trace, the reducer's time and training-time extras)."""

    cache: object
    key_masks: list[Tensor]  # per segment: (B, S) bool, True on real keys
    layer_segment: list[int]  # per LLM layer: index into key_masks
    next_pos: Tensor  # (B,) position id of the next token
    logits: Tensor  # (B, V) logits of the last position
    trace: TokenTrace
    tail_logits: Tensor | None = None  # (B, m, V) logits of the last m positions, when prefill was asked for them
    segment_pos: Tensor | None = None  # (S, B) when positions were renumbered: each segment of layers' own next
    aux: dict[str, Tensor] = field(default_factory=dict)  # the reducer's training-time extras (`Reduced.aux`)
    reducer_s: float = 0.0  # prefill time in the reducer and the signals computed for it (`Timing.reducer_s`)


class NonFiniteError(ValueError):
    """The model's numbers went bad (NaN or Inf) during a prefill or decoding: no result may come of them."""


@dataclass
class FiniteCheck:
    """Watches the tensors of one prefill or decoding for NaN and Inf: each watched tensor adds a (2,) flag on its
    device, and `check` looks at all of them at once (one device sync), so that a damaged model stops the cell
    before any result while a healthy one pays a few elementwise passes."""

    names: list[str] = field(default_factory=list)
    flags: list[Tensor] = field(default_factory=list)  # per watched tensor: (2,) bool, (holds NaN, holds Inf)

    def watch(self, where: str, x: Tensor, real: Tensor | None = None) -> None:
        """Flag `x` (..., D); `real` (...) bool limits the check to real positions (padding may hold anything)."""
        x = x.detach()
        nan, inf = torch.isnan(x), torch.isinf(x)
        if real is not None:
            nan, inf = nan & real[..., None], inf & real[..., None]
        self.names.append(where)
        self.flags.append(torch.stack([nan.any(), inf.any()]))

    def check(self, model: str) -> None:
        """Raise `NonFiniteError` naming `model` and the first watched tensor that holds NaN or Inf."""
        if not self.flags:
            return
        hit = torch.stack(self.flags).cpu()  # (n, 2)
        names, self.names, self.flags = self.names, [], []
        bad = hit.any(1).nonzero().flatten()
        if len(bad):
            i = int(bad[0])
            what = " and ".join(k for k, f in zip(("NaN", "Inf"), hit[i].tolist(), strict=True) if f)
            raise NonFiniteError(f"{model}: {names[i]} holds {what}; its weights are damaged or its dtype overflows "
                                 "(try --dtype float32): no result is written")


@dataclass
class ReducerLog:
    """What one prefill accumulates: `prefill` creates it, the call sites add the reducer's calls to it, and the
    model's tensors to its `finite` check."""

    macs: Tensor  # (B,) long: the reducer's own `Reduced.macs` plus the signals computed for it
    seconds: float = 0.0  # synchronised wall time in the reducer and its signals
    aux: dict[str, Tensor] = field(default_factory=dict)  # the reducer's `Reduced.aux`, handed on unchanged
    finite: FiniteCheck = field(default_factory=FiniteCheck)  # NaN / Inf in the model's tensors, checked at the end

    def add(self, red: Reduced, seconds: float) -> None:
        """Record one reducer call: its MACs, the `seconds` it (and its signals) took, its training extras."""
        self.macs = self.macs + (0 if red.macs is None else red.macs)
        self.seconds += seconds
        self.aux = red.aux


@dataclass
class Seq:
    """The LLM-side prefill sequence of a left-padded batch."""

    x: Tensor  # (B, T', D) hidden states
    real: Tensor  # (B, T') bool, True on real (unpadded) tokens
    pos: Tensor  # (B, T', P) long position ids on P rotary axes (LLaMA: 1; Qwen2.5-VL's M-RoPE: 3)
    visual: Tensor  # (B, T') bool, True on real visual tokens
    src: Tensor  # (B, T') long original patch index of visual tokens (-1 elsewhere)

    def take(self, idx: Tensor, valid: Tensor) -> Seq:
        """Every field gathered at `idx` (B, T'') along the sequence; slots where `valid` (B, T'') is False (the
        padding slots `pack_true` returns) become padding, whatever they point at."""
        real = self.real.gather(1, idx) & valid
        return Seq(x=gather_tokens(self.x, idx), real=real, pos=gather_tokens(self.pos, idx),
                   visual=self.visual.gather(1, idx) & real, src=self.src.gather(1, idx))

    def keep_visual(self, at: Tensor, valid: Tensor, x: Tensor, merged: Tensor | None = None,
                    renumber: bool = False) -> Seq:
        """Every real text token and only the visual tokens at sequence positions `at` (B, K) where `valid`, with
        the values `x` (B, K, D) a reducer returned for them (a merged token, where `merged`, takes the place of the
        removed token at its position and has no source patch); re-packed with left padding, positions kept.
        `renumber`: the merged tokens move to just after the last kept visual token, in the reducer's order, and
        the positions become 0..T''-1 over the real tokens (1-D positions only)."""
        x_all = self.x.scatter(1, at.unsqueeze(-1).expand(-1, -1, x.size(-1)), x)
        src = self.src if merged is None else self.src.scatter(1, at, torch.where(merged, -1, self.src.gather(1, at)))
        text = self.real & ~self.visual
        chosen = text.scatter(1, at, valid) | text  # (B, T')
        if not renumber:
            idx, packed = pack_true(chosen, right=True)  # (B, T'')
            return replace(self, x=x_all, src=src).take(idx, packed)
        perm = torch.arange(self.x.size(1), device=at.device).expand_as(chosen)  # (B, T') the new order
        if merged is not None:  # between the last visual token (kept or not) and the text after it
            order = perm.double()
            last = torch.where(self.visual, order, -1.0).amax(1, keepdim=True)  # (B, 1)
            rank = merged.long().cumsum(1).double()  # (B, K) 1, 2, ... over the merged tokens
            order = order.scatter(1, at, torch.where(merged, last + rank / (merged.size(1) + 1), order.gather(1, at)))
            perm = order.argsort(dim=1, stable=True)
        idx, packed = pack_true(chosen.gather(1, perm), right=True)  # (B, T'') into the new order
        out = replace(self, x=x_all, src=src).take(perm.gather(1, idx), packed)
        pos = running_index(out.real)  # (B, T'') contiguous over the real tokens
        return replace(out, pos=pos.unsqueeze(-1).expand_as(out.pos).contiguous())


def add_deepstack(seq: Seq, level: Tensor) -> Tensor:
    """(B, T', D) the hidden states `seq.x` with `level` (B, N, D), one row per image token, added at the visual tokens
    that have a source image token (`seq.src`), each its own row (what HF's `_deepstack_process` adds at every visual
    position of the unpruned prompt)."""
    has = seq.visual & (seq.src >= 0)  # (B, T')
    rows = gather_tokens(level.to(seq.x.dtype), seq.src.clamp(min=0))  # (B, T', D)
    return seq.x + rows * has.unsqueeze(-1)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding as in LLaMA: x (B, H, T, hd), cos/sin (B, T, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass
class ImageSide:
    """What the LLM side needs from the image side of one batch.

    Attributes:
        grid: the patch grid (rows, cols) reducers see as `Tokens.grid`.
        num_patches: visual tokens per image before any LLM-site reduction (for `llm_layers`).
        vision_tokens: (B, Lv) tokens entering each executed vision layer (the trace's).
        projector_tokens: (B,) tokens through the projector (the trace's).
        image_tokens: (B,) visual tokens of each image when images differ in size (`Tokens.image_tokens`).
        image_grid: (B, 3) each image's patch grid (t, h, w) then, for the trace.
        deepstack: Qwen3-VL's DeepStack features, one (B, N, D) tensor per level (N: the batch's largest image's
            tokens, by each token's index in its image): level j is added to the visual tokens' hidden states after
            decoder layer j, to each token its own image token's row (`Seq.src`), so whatever a reduction kept, before
            the LLM or inside it, gets its own features (a merged token, with no source, gets none).
    """

    grid: tuple[int, int]
    num_patches: int
    vision_tokens: Tensor
    projector_tokens: Tensor
    image_tokens: Tensor | None = None
    image_grid: Tensor | None = None
    deepstack: tuple[Tensor, ...] = ()


@dataclass(frozen=True)
class Stage:
    """What the LLM side holds before decoder layer `j` when a reducer runs there: what the signal providers
    (`LLM_PROVIDERS`) read. Pieces several providers share are computed once, on first use."""

    side: LLMSide
    seq: Seq  # the sequence entering layer j
    spliced: Seq  # the sequence as spliced, before any LLM-site reduction
    h_prev: Tensor  # (B, T', D) the input of layer j - 1, over the same tokens as `seq`
    j: int
    cache: DynamicCache  # the layers below j have run
    cos_sin: tuple[Tensor, Tensor]  # each (B, T', hd) at `seq`'s positions

    @cached_property
    def image(self) -> tuple[Tensor, Tensor]:
        """(B, N) sequence positions of the visual tokens, in order, and their valid mask."""
        return pack_true(self.seq.visual & self.seq.real)

    @cached_property
    def text(self) -> tuple[Tensor, Tensor]:
        """(B, M) sequence positions of the real tokens after each sample's last visual token, and their valid mask."""
        return self.side._text_after_image(self.seq)

    @cached_property
    def key_norms(self) -> Tensor:
        """(B, T') L1 norm of every token's key at layer j - 1 (after RoPE, key/value heads concatenated)."""
        return self.cache.layers[self.j - 1].keys.abs().sum((1, 3)).float()  # keys (B, Hkv, T', hd)

    @cached_property
    def normed(self) -> Tensor:
        """(B, T', D) every token's hidden state entering layer j, through the LLM's final norm."""
        return self.side.model.model.language_model.norm(self.seq.x)

    def at_image(self, row: Tensor) -> Tensor:
        """A row over the sequence, (B, T') or (B, T', D), at the image tokens: (B, N) (0 on padding) or (B, N, D)."""
        vidx, vvalid = self.image
        return gather_tokens(row, vidx) if row.dim() == 3 else row.gather(1, vidx).masked_fill(~vvalid, 0)

    def attention(self, layer: int, rows: Tensor, cached: bool) -> Tensor:
        """(B, R, T') head-averaged attention of the tokens at sequence positions `rows` (B, R) at decoder `layer`:
        j - 1 from its cached keys (`cached`), or j from its own k projection before it runs."""
        h_in = self.h_prev if cached else self.seq.x
        keys = self.cache.layers[layer].keys if cached else None
        return self.side._query_attention(layer, h_in, self.seq.real, self.cos_sin, rows, keys)

    def dims(self, text: bool) -> Dims:
        """The sizes the signals' MACs read (`text`: count the text tokens after the image)."""
        att = self.side.model.model.language_model.layers[self.j].self_attn
        return Dims(batch=self.seq.x.size(0), tokens=self.image[0].size(1), width=self.seq.x.size(-1),
                    seq=self.seq.real.sum(1), q_width=att.q_proj.out_features, kv_width=att.k_proj.out_features,
                    text=self.text[1].sum(1) if text else 0)


def _last(st: Stage) -> Tensor:
    """(B, 1) the last position of the sequence: the prompt's last token (left padding)."""
    return st.seq.real.new_full((st.seq.x.size(0), 1), st.seq.x.size(1) - 1, dtype=torch.long)


def _text_attn(st: Stage) -> dict[str, Tensor]:
    """Every text token's row at layer j - 1 (SparseVLM's raters choose among them), at the image tokens' columns."""
    attn = st.attention(st.j - 1, st.text[0], cached=True)  # (B, M, T')
    vidx, vvalid = st.image
    cols = vidx.unsqueeze(1).expand(-1, attn.size(1), -1)
    return {"text.attn": attn.gather(2, cols).masked_fill(~vvalid.unsqueeze(1), 0.0)}  # (B, M, N)


def _embeds(st: Stage) -> dict[str, Tensor]:
    """The LLM input embeddings of the image's tokens and of the text after it, as spliced (nothing removed)."""
    image, text = st.side._input_embeds(st.spliced)
    return {"embeds": image, "text.embeds": text}


def _prompt_index(st: Stage) -> dict[str, Tensor]:
    """Each token's index in its sample's unpadded sequence as it stands, at the image and the text tokens."""
    index = running_index(st.seq.real)  # (B, T')
    return {"prompt_index": st.at_image(index), "text.prompt_index": index.gather(1, st.text[0])}


# signal name (methods/signals.py) -> its `Tokens` fields, computed from the prefill's state at a reducing layer
LLM_PROVIDERS: dict[str, Callable[[Stage], dict[str, Tensor]]] = {
    "query_attn": lambda st: {"query_attn": st.at_image(st.attention(st.j - 1, _last(st), cached=True)[:, 0])},
    "query_attn_next": lambda st: {"query_attn_next": st.at_image(st.attention(st.j, _last(st), cached=False)[:, 0])},
    "key_norms": lambda st: {"key_norms": st.at_image(st.key_norms)},
    "normed": lambda st: {"normed": st.at_image(st.normed)},
    "text": lambda st: {"text.normed": gather_tokens(st.normed, st.text[0]),
                        "text.key_norms": st.key_norms.gather(1, st.text[0])},
    "text_attn": _text_attn,
    "embeds": _embeds,
    "prompt_index": _prompt_index,
}


class LLMSide:
    """The LLM-side prefill and decoding of an adapter. The adapter sets `model` (a model with
    `model.language_model` and `lm_head`) and `reducer`, and defines `_rotary` and `_rotary_axes`."""

    _rotary_axes = 1  # P: position-id axes (LLaMA 1, M-RoPE 3)

    def _rotary(self, x: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """(cos, sin), each (B, T, hd), for position ids `pos` (B, T, P)."""
        raise NotImplementedError

    def _generate(self, prefill: Callable[[], DecodeState], max_new_tokens: int, eos_token_id: int | list[int] | None,
                  pad_token_id: int, keep_state: bool = False) -> Generation:
        """Greedy decoding with the KV cache after `prefill()` (the adapter's prefill of the batch), timed; the state
        stays in `Generation.state` only with `keep_state`."""
        t0 = self._clock()
        state = prefill()
        gen = self._decode(state, t0, self._clock(), max_new_tokens, eos_token_id, pad_token_id)
        gen.state = gen.state if keep_state else None
        return gen

    @torch.no_grad()
    def ask_again(self, state: DecodeState, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                  eos_token_id: int | list[int] | None = None, pad_token_id: int = 0) -> Generation:
        """A follow-up turn on the conversation a `Generation.state` holds ("prune once"): `input_ids` (B, T), left-
        padded (`attention_mask` 1 on real tokens), the text to append after everything the cache holds (the end of
        the previous answer, the turn separators and the new question, in the model's chat format) is prefilled on
        top of the cache, with the visual tokens the first turn's reduction left, and answered greedily. The image is
        not encoded again and the reducer does not run; `state` is advanced and kept in the result's `state`, so a
        third turn can follow. The returned trace is the first turn's token counts with this turn's
        `generated_tokens`; `timing.prefill_s` is this turn's prefill.
        The first turn must have kept its state (`generate(..., keep_state=True)`)."""
        if state is None:
            raise ValueError("ask_again needs the first turn's decoding state: call generate(..., keep_state=True)")
        state.trace = replace(state.trace)  # this turn's generated_tokens, the first turn's record left as it was
        t0 = self._clock()
        state.logits = self._extend(state, input_ids.to(state.next_pos.device),
                                    attention_mask.to(state.next_pos.device).bool())
        return self._decode(state, t0, self._clock(), max_new_tokens, eos_token_id, pad_token_id)

    def _decode(self, state: DecodeState, t0: float, t1: float, max_new_tokens: int,
                eos_token_id: int | list[int] | None, pad_token_id: int) -> Generation:
        """Greedy decoding from `state.logits` (a prefill's, begun at t0 and done at t1), timed. Every generated token
        of a sample but its last (its end-of-sequence token, or the last one `max_new_tokens` allows) goes through
        the cache as a real key; later steps cache padding keys that nothing attends to. The state stays in
        `Generation.state` for a follow-up turn, whose text starts with each sample's last generated token."""
        device = state.logits.device
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), device=device)
        b = state.logits.size(0)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        lengths = torch.zeros(b, dtype=torch.long, device=device)
        out, logits, finite = [], state.logits, FiniteCheck()
        for step in range(max_new_tokens):
            tok = logits.argmax(-1).masked_fill(done, pad_token_id)  # (B,)
            out.append(tok)
            lengths += (~done).long()
            done |= torch.isin(tok, eos)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = self._decode_step(state, tok, real=~done)  # an ended sample's last token waits, as at the end
            finite.watch(f"decoding step {step + 1}'s logits", logits)
        finite.check(self._model_name())
        state.trace.generated_tokens = lengths
        tokens = torch.stack(out, 1) if out else torch.zeros(b, 0, dtype=torch.long, device=device)
        timing = Timing(prefill_s=t1 - t0, decode_s=self._clock() - t1, decode_steps=max(len(out) - 1, 0),
                        reducer_s=state.reducer_s)
        return Generation(tokens=tokens, lengths=lengths, trace=state.trace, first_logits=state.logits.float(),
                          timing=timing, state=state)

    def _renumbers(self) -> bool:
        """Whether the reducer's LLM-site reductions renumber positions (`TokenReducer.positions`; "reference": where
        the positions are 1-D)."""
        p = self.reducer.positions
        return p == "renumber" or (p == "reference" and self._rotary_axes == 1)

    def _model_name(self) -> str:
        """The checkpoint's path or hub name, for messages."""
        return getattr(self.model.config, "name_or_path", "") or type(self.model).__name__

    def _clock(self) -> float:
        """perf_counter after the device's queued work is done (CUDA kernels run asynchronously)."""
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        return time.perf_counter()

    def _llm_prefill(self, seq: Seq, image: ImageSide, budgets: Tensor | None, key: Tensor, log: ReducerLog,
                     tail: int) -> DecodeState:
        """Run the decoder layers over `seq` (LLM site: reduce it before the reducer's layers), then `lm_head` on
        the last `tail` positions; `image` gives the reducer the image's geometry and the trace its vision and
        projector counts, `log` its MACs."""
        lm, r = self.model.model.language_model, self.reducer
        cache = DynamicCache(config=lm.config)
        key_masks, layer_segment = [seq.real], []
        llm_tokens, visual_tokens = [], []
        cos_sin = self._rotary(seq.x, seq.pos)
        mask = additive_mask(seq.real, seq.x.size(1), seq.x.dtype)
        h_prev = seq.x
        stages = r.llm_layers(len(lm.layers), image.num_patches) if r.site is Site.LLM else ()
        spliced = replace(seq)  # the sequence as spliced (below, `seq.x` is overwritten layer by layer)
        for j, layer in enumerate(lm.layers):
            if j in stages:
                t0 = self._clock()  # the reducer's time includes the signals computed for it
                st = Stage(self, seq, spliced, h_prev, j, cache, cos_sin)
                fields = provide(r.needs, LLM_PROVIDERS, st)  # `Tokens` fields at the image tokens
                text = any(k.startswith("text.") for k in fields)
                log.macs = log.macs + signal_macs(r.needs, st.dims(text))
                sig = tokens_fields(fields, st.text[1] if text else None)
                seq, red, t_end = self._reduce_in_llm(st, sig, stages.index(j), budgets, key, image)
                log.add(red, t_end - t0)
                key_masks.append(seq.real)
                cos_sin = self._rotary(seq.x, seq.pos)
                mask = additive_mask(seq.real, seq.x.size(1), seq.x.dtype)
            llm_tokens.append(seq.real.sum(1))
            visual_tokens.append((seq.visual & seq.real).sum(1))
            layer_segment.append(len(key_masks) - 1)
            h_prev = seq.x
            seq.x = layer(seq.x, attention_mask=mask, position_ids=None, past_key_values=cache, use_cache=True,
                          position_embeddings=cos_sin)  # (B, T', D)
            if j < len(image.deepstack):  # Qwen3-VL: the vision tower's level-j features join the visual tokens
                seq.x = add_deepstack(seq, image.deepstack[j])
            log.finite.watch(f"LLM layer {j}'s output", seq.x, seq.real)
        logits = self.model.lm_head(lm.norm(seq.x[:, -tail:]))  # (B, tail, V): the last position(s) only
        log.finite.watch("the prefill's logits", logits)
        log.finite.check(self._model_name())
        kept, kept_valid = pack_true(seq.visual & seq.real)
        trace = TokenTrace(
            vision_tokens=image.vision_tokens,
            projector_tokens=image.projector_tokens,
            llm_tokens=torch.stack(llm_tokens, 1),
            visual_tokens=torch.stack(visual_tokens, 1),
            kept=seq.src.gather(1, kept),
            kept_valid=kept_valid,
            reducer_macs=log.macs,
            image_grid=image.image_grid,
        )
        next_pos = seq.pos[:, -1].amax(-1) + 1  # (B,) the last prompt token is real and has the largest position
        # renumbered: each segment's layers cached positions 0..T_s-1 and go on from T_s (the reference's layers
        # take their own cache length); segment 0 holds the spliced prompt, whose positions were contiguous too
        segment_pos = torch.stack([km.sum(1) for km in key_masks]) if len(key_masks) > 1 and self._renumbers() \
            else None
        return DecodeState(cache=cache, key_masks=key_masks, layer_segment=layer_segment, next_pos=next_pos,
                           segment_pos=segment_pos,
                           logits=logits[:, -1], trace=trace, tail_logits=logits if tail > 1 else None, aux=log.aux,
                           reducer_s=log.seconds)

    def _reduce_in_llm(self, st: Stage, sig: dict, stage: int, budgets: Tensor | None, key: Tensor,
                       image: ImageSide) -> tuple[Seq, Reduced, float]:
        """Remove the non-kept image tokens from the sequence `st.seq` before a decoder layer (LLM site; call `stage`
        of the reducer's `llm_layers`); return the shorter sequence, what the reducer returned and the `_clock()`
        reading when it returned (for the caller's log). `sig` holds the `Tokens` fields of the signals it needs."""
        r, seq = self.reducer, st.seq
        vidx, vvalid = st.image  # (B, N) positions of the visual tokens, in order
        tokens = Tokens(x=gather_tokens(seq.x, vidx), grid=image.grid,
                        valid=None if bool(vvalid.all()) else vvalid, budget=budgets, sample_key=key, stage=stage,
                        depth=len(self.model.model.language_model.layers), image_tokens=image.image_tokens, **sig)
        red = r(tokens)
        t_end = self._clock()
        merged = red.keep < 0 if red.keep is not None else None  # (B, K) tokens standing in a removed one's place
        if red.keep is None or (bool(merged.any()) and red.anchor is None):
            raise ValueError(f"{r.name} acts inside the LLM and must return a subset of the image tokens (keep >= 0), "
                             "with an anchor for each merged token (keep -1)")
        at = torch.where(merged, red.anchor, red.keep) if red.anchor is not None else red.keep  # (B, K) into N
        kvalid = red.valid if red.valid is not None else torch.ones_like(red.keep, dtype=torch.bool)
        kvalid = kvalid & vvalid.gather(1, at)
        hits = torch.zeros_like(vvalid, dtype=torch.long).scatter_add(1, at, kvalid.long())
        if bool((hits > 1).any()):
            raise ValueError(f"{r.name} returned two tokens for one place (a merged token's anchor must be a removed "
                             "token, each used once)")
        # a reducer may update the values of the tokens it keeps; a merged token overwrites its anchor
        return seq.keep_visual(vidx.gather(1, at), kvalid, red.x, merged, self._renumbers()), red, t_end

    def _query_attention(self, layer_idx: int, h_in: Tensor, real: Tensor, cos_sin, rows: Tensor,
                         keys: Tensor | None = None) -> Tensor:
        """(B, R, T) head-averaged attention of the tokens at sequence positions `rows` (B, R) at decoder layer
        `layer_idx`, each over the real keys up to its own position (causal; a row always sees itself).

        `h_in` (B, T, D) is that layer's input, `real` (B, T) marks the real keys; only the rows' queries are
        computed. `keys` (B, Hkv, T, hd) are the layer's cached post-RoPE keys once it has run (FastV's and
        SparseVLM's rows); None computes them from the layer's own k projection of `h_in`, before it runs
        (PyramidDrop's row).
        """
        layer = self.model.model.language_model.layers[layer_idx]
        att = layer.self_attn
        b, t, _ = h_in.shape
        cos, sin = cos_sin
        q_norm, k_norm = (getattr(att, n, None) or (lambda v: v) for n in ("q_norm", "k_norm"))  # Qwen3-VL: per head
        if keys is None:
            hn = layer.input_layernorm(h_in)  # (B, T, D)
            keys = k_norm(att.k_proj(hn).view(b, t, -1, att.head_dim)).transpose(1, 2)  # (B, Hkv, T, hd)
            keys = rope(keys, cos, sin)
            hq = gather_tokens(hn, rows)
        else:
            hq = layer.input_layernorm(gather_tokens(h_in, rows))  # (B, R, D)
        q = q_norm(att.q_proj(hq).view(b, rows.size(1), -1, att.head_dim)).transpose(1, 2)  # (B, H, R, hd)
        q = rope(q, gather_tokens(cos, rows), gather_tokens(sin, rows))
        k = keys.repeat_interleave(q.size(1) // keys.size(1), dim=1)  # (B, H, T, hd)
        scores = (q @ k.transpose(-1, -2)).float() * att.scaling  # (B, H, R, T)
        kj = torch.arange(t, device=h_in.device).view(1, 1, t)
        allowed = (real.unsqueeze(1) & (kj <= rows.unsqueeze(-1))) | (kj == rows.unsqueeze(-1))  # (B, R, T)
        scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        return scores.softmax(-1).mean(1)  # (B, R, T)

    @staticmethod
    def _text_after_image(seq: Seq) -> tuple[Tensor, Tensor]:
        """(B, M) sequence positions of the real tokens after each sample's last visual token, and their valid mask
        (`pack_true`'s padding slots are False)."""
        t = torch.arange(seq.x.size(1), device=seq.x.device)
        last = torch.where(seq.visual, t, -1).amax(1, keepdim=True)  # (B, 1) last visual position
        return pack_true(seq.real & ~seq.visual & (t > last))

    def _input_embeds(self, seq: Seq) -> tuple[Tensor, Tensor]:
        """The LLM input embeddings of the image's tokens (B, N, D) and of the text after it (B, M, D), from the
        sequence as spliced (before any LLM-site reduction)."""
        vidx, _ = pack_true(seq.visual & seq.real)
        tidx, _ = self._text_after_image(seq)
        return gather_tokens(seq.x, vidx), gather_tokens(seq.x, tidx)

    def _decode_step(self, state: DecodeState, tok: Tensor, real: Tensor | None = None) -> Tensor:
        """Feed one token per sample through every layer; return the next logits (B, V). `real` (B,) bool: False
        for a sample whose answer has ended (its token is padding: cached, never attended to, no position used)."""
        return self._extend(state, tok.unsqueeze(1), None if real is None else real.unsqueeze(1))

    def _extend(self, state: DecodeState, ids: Tensor, real: Tensor | None = None) -> Tensor:
        """Feed a chunk of text tokens per sample, `ids` (B, T) left-padded (`real` (B, T) bool, None: all real),
        through every layer on top of the cache: a decoding step (T = 1) or a follow-up turn appended to the
        conversation the cache holds (its image is not encoded again). Each sample's real tokens take the positions
        after its last one (text: every M-RoPE axis alike); returns the logits of the last position (B, V) and
        advances `state` (cache, key masks, next positions)."""
        lm = self.model.model.language_model
        real = torch.ones_like(ids, dtype=torch.bool) if real is None else real.to(ids.device).bool()
        x = lm.embed_tokens(ids)  # (B, T, D)
        step = (real.long().cumsum(1) - 1).clamp(min=0)  # (B, T) each real token's offset after the cache's last
        nexts = [state.next_pos] if state.segment_pos is None else list(state.segment_pos)  # each (B,)
        cos_sin = [self._rotary(x, (p.view(-1, 1) + step).unsqueeze(-1).expand(-1, -1, self._rotary_axes))
                   for p in nexts]
        state.key_masks = [torch.cat([km, real], 1) for km in state.key_masks]
        masks = [additive_mask(km, ids.size(1), x.dtype) for km in state.key_masks]
        for j, layer in enumerate(lm.layers):
            seg = state.layer_segment[j]
            x = layer(x, attention_mask=masks[seg], position_ids=None, past_key_values=state.cache, use_cache=True,
                      position_embeddings=cos_sin[seg if state.segment_pos is not None else 0])
        added = real.sum(1)  # (B,)
        state.next_pos = state.next_pos + added
        if state.segment_pos is not None:
            state.segment_pos = state.segment_pos + added
        return self.model.lm_head(lm.norm(x[:, -1:]))[:, 0]
