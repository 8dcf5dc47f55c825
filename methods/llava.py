"""ReducedLlava: run a Hugging Face LLaVA (llava-hf / LLaVA-1.5 format) with a token reducer at its site.

The forward pass is written out over the model's own submodules (nanoGPT style) instead of patching transformers:
no class attribute is assigned, no hook is installed, so the model is exactly as it was after use. This module and
`methods/_llm.py` (the LLM side it shares with `methods/qwen.py`) are the only code that knows where LLaVA's layers
live, where the image span sits in the prompt, and how positions, masks and the KV cache follow a reduction; the
signals it computes for reducers are declared in `methods/signals.py` and computed here by `FEATURE_PROVIDERS` and
by `_llm.py`'s `LLM_PROVIDERS`.

Prefill of a left-padded batch, one image per prompt:

1. Vision: patch embedding, pre-LayerNorm, then the encoder layers up to the deepest one LLaVA reads its features
   from (`vision_feature_layer`, -2 for LLaVA-1.5). Reference LLaVA also runs the last layer and throws its output
   away; we do not run it, and the token trace says so. VISION site: before encoder layer `reducer.layer`, the
   patch tokens are reduced (CLS is always kept); samples with different counts are padded and masked.
2. Features: the selected hidden state without CLS (`vision_feature_select_strategy="default"`). FEATURES site:
   the reducer runs here, with `cls_attn`/`keys` computed on demand from the q/k projections of the encoder layer
   that consumes these features (the layer PruMerge reads; only those two projections run, never the whole layer).
3. Projector (EMBEDDINGS site: the reducer runs on its outputs, the LLM's input embeddings of the visual tokens,
   as DivPrune does), then the splice: the image span, found in `input_ids` as the processor's run of image tokens
   (never a constant offset), is replaced by each sample's K_i tokens; prompts are re-packed with left padding and
   position ids are contiguous, which is what LLaVA does when it is simply handed fewer tokens.
4. LLM: decoder layers with an explicit additive mask (causal + padding). LLM site: before decoder layer
   `reducer.layer`, the non-kept image tokens are *removed* from the sequence; original position ids are kept
   (RoPE sees the gaps, as in FastV); layers below keep the full KV cache, layers from there on the reduced one.
   A reducer may also return merged tokens (keep -1), each in the place and with the position id of a removed
   token it names (`Reduced.anchor`; SparseVLM's recycled tokens).
   `query_attn` is the head-averaged attention of the last prompt token at layer `layer - 1`, computed from that
   token's query and the layer's cached (post-RoPE) keys: one extra query row, no layer is run twice and the
   model never switches to eager attention.
5. `lm_head` on the last position only.

Decoding is greedy with the KV cache: each step runs every layer on one token; each layer attends over its own
cache with its own padding mask; new positions continue from the original (unreduced) numbering. Steps 4-5 and
decoding live in `methods/_llm.py`, shared with the Qwen2.5-VL adapter (`methods/qwen.py`); this module holds the
vision side, the splice and every piece of LLaVA knowledge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn
from transformers import LlavaForConditionalGeneration
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip.modeling_clip import eager_attention_forward

from methods import signals
from methods._llm import LLM_PROVIDERS, DecodeState, ImageSide, LLMSide, ReducerLog, Seq
from methods._ops import gather_tokens, pack_true, pixel_key, running_index
from methods.base import Reduced, Site, TokenReducer, Tokens
from methods.loading import load_pretrained, template_follow_up
from methods.signals import Dims, Provides, provide, signal_macs, tokens_fields
from methods.trace import Generation, LlavaLayout

SUPPORTED_ATTENTION = ("sdpa", "eager")


def llava_prompt(processor, text: str) -> str:
    """LLaVA-1.5 prompt for one image and `text`, through the checkpoint's chat template when it has one:
    `USER: <image>\\n{text} ASSISTANT:`. An `<image>` already in `text` is moved to the front."""
    text = text.replace("<image>", "").lstrip("\n")
    if getattr(processor, "chat_template", None):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(conv, add_generation_prompt=True)
    return f"USER: <image>\n{text} ASSISTANT:"


def llava_follow_up(processor, text: str) -> str:
    """What follows an answer in LLaVA-1.5's chat format up to the next answer, for a next question `text`: the chat
    template's (llava-hf's: ` USER: {text} ASSISTANT:`), else LLaVA's own conversation format's
    `</s>USER: {text} ASSISTANT:`."""
    text = text.replace("<image>", "").lstrip("\n")
    found = template_follow_up(processor, text)
    return f"</s>USER: {text} ASSISTANT:" if found is None else found


def load_llava(path: str | Path, device: str = "cpu", dtype: str = "auto"):
    """Load a local llava-hf checkpoint and its processor (offline). Returns (model, processor)."""
    model, processor = load_pretrained(path, LlavaForConditionalGeneration, device, dtype)
    complete_processor(processor, model.config)
    return model, processor


def complete_processor(processor, config) -> None:
    """Make the processor expand `<image>` into as many tokens as the model has patches, or say what is wrong.

    Older llava-hf snapshots save no `patch_size` in processor_config.json (transformers then fails deep inside the
    processor): it is filled in from the model config, with CLIP's one extra (CLS) token and the config's feature
    selection strategy, as current llava-hf snapshots have them.
    """
    vc = config.vision_config
    if getattr(processor, "patch_size", None) is None:
        processor.patch_size = vc.patch_size
        processor.num_additional_image_tokens = 1  # CLIP's CLS token
        processor.vision_feature_select_strategy = config.vision_feature_select_strategy
    ip = processor.image_processor
    crop = (getattr(ip, "crop_size", None) or {}) if getattr(ip, "do_center_crop", False) else {}
    if not (crop.get("height") and crop.get("width")):
        return  # no fixed crop: the adapter checks each batch's image span
    tokens = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)
    tokens += processor.num_additional_image_tokens - (processor.vision_feature_select_strategy == "default")
    patches = LlavaLayout.from_config(config).num_patches
    if tokens != patches:
        raise ValueError(
            f"the processor expands <image> into {tokens} tokens but the model has {patches} patches "
            f"(crop {crop['height']}x{crop['width']}, patch_size {processor.patch_size}); set patch_size, "
            "num_additional_image_tokens and vision_feature_select_strategy in the checkpoint's processor_config.json"
        )


@dataclass
class _Features:
    """What the vision side hands on: the selected features of the kept visual tokens, before the projector."""

    x: Tensor  # (B, K, Dv * nf) features (CLS dropped), nf = number of feature layers
    valid: Tensor | None  # (B, K) bool, False on padding; None when every sample keeps K tokens
    src: Tensor  # (B, K) original patch index of each token (-1: a merged token with no single source)
    vision_tokens: Tensor  # (B, Lv) tokens (CLS included) entering each executed encoder layer

    def projector_tokens(self) -> Tensor:
        """(B,) tokens each sample sends through the projector."""
        return self.valid.sum(1) if self.valid is not None else torch.full_like(self.src[:, 0], self.x.size(1))


@dataclass(frozen=True)
class _Prompt:
    """What the embeddings site holds for `EMBEDDING_PROVIDERS`: the prompt."""

    side: ReducedLlava
    prompt: tuple[Tensor, Tensor]  # (input_ids, attention_mask) (B, T)


@dataclass(frozen=True)
class _VisionStage:
    """What the vision side holds when a features-site reducer runs: what `FEATURE_PROVIDERS` read."""

    side: ReducedLlava
    h: Tensor  # (B, S, Dv) the output of the last encoder layer run: CLS, the patches, then E extras
    attn_mask: Tensor | None  # (B, 1, 1, S) additive, when the patches were reduced unevenly
    qk: tuple[Tensor, Tensor, float] | None  # the feature layer's own queries, keys and scale (`KEEPS_QK`)
    hidden: dict[int, Tensor]  # vision hidden states by index (0: the embeddings after the pre-LayerNorm)
    n: int  # N, the patches handed to the reducer
    e: int  # E
    relevant: Tensor | None  # (B, N) bool from the task's records
    prompt: tuple[Tensor, Tensor]  # (input_ids, attention_mask) (B, T), for the question's tokens

    @cached_property
    def consumer(self) -> dict[str, Tensor]:
        """"cls_attn" and "keys", computed together from the layer that consumes the features."""
        return self.side._vision_signals(self.h[:, : self.h.size(1) - self.e], self.attn_mask)


def _question(st: _VisionStage | _Prompt) -> dict[str, Tensor]:
    """(B, M, D) the LLM's input embeddings of the prompt's text after the image (the question and the answer prompt),
    left-packed, and their (B, M) valid mask."""
    ids, mask = st.prompt
    _, start = st.side._image_span(ids)  # (B,) where each image run starts
    t = torch.arange(ids.size(1), device=ids.device)
    idx, valid = pack_true(mask.bool() & (t > (start + st.side.layout.num_patches - 1).unsqueeze(1)))  # (B, M)
    embeds = st.side.model.model.language_model.embed_tokens(ids.gather(1, idx))
    return {"text.embeds": embeds, "text.valid": valid}


def _feature_cls(st: _VisionStage) -> dict[str, Tensor]:
    """(B, Dv * nf) the CLS token's features, as the patches' are selected."""
    lay = st.side.layout
    return {"feature_cls": torch.cat([st.hidden[j][:, 0] for j in lay.feature_layers], dim=-1)}


# signal name (methods/signals.py) -> its `Tokens` fields, computed from the vision encoder's state
FEATURE_PROVIDERS: dict[str, Callable[[_VisionStage], dict[str, Tensor]]] = {
    "cls_attn": lambda st: {"cls_attn": st.consumer["cls_attn"]},
    "keys": lambda st: {"keys": st.consumer["keys"]},
    "feature_attn": lambda st: {"feature_attn": st.side._cls_row(*st.qk, st.attn_mask)[:, : st.n]},  # extras dropped
    "feature_keys": lambda st: {"feature_keys": st.qk[1].mean(1)[:, 1 : 1 + st.n]},  # heads averaged; no extra MACs
    "feature_cls": _feature_cls,
    "relevant": lambda st: {"relevant": st.relevant.to(device=st.h.device, dtype=torch.bool)},  # no compute
    "question": _question,
}
# at the embeddings site (the projector's output): the question, from the prompt (`_Prompt`)
EMBEDDING_PROVIDERS: dict[str, Callable[[_Prompt], dict[str, Tensor]]] = {"question": _question}
KEEPS_QK = frozenset({"feature_attn", "feature_keys"})  # providers that read the feature layer's own q and k


class ReducedLlava(LLMSide):
    """A LLaVA model and one reducer, run together. Holds no state between calls; the model is never modified.

    Args:
        model: a `LlavaForConditionalGeneration` (llava-hf format) with a CLIP-style vision tower and a LLaMA-style
            language model, attention implementation "sdpa" or "eager".
        reducer: the token reducer; its `site` and `layer` say where it acts.
    """

    provides: ClassVar[Provides] = Provides(family="LLaVA-1.5", signals={  # what `methods.signals.check` reads
        Site.VISION: frozenset(), Site.FEATURES: frozenset(FEATURE_PROVIDERS),
        Site.EMBEDDINGS: frozenset(EMBEDDING_PROVIDERS), Site.LLM: frozenset(LLM_PROVIDERS)})

    def __init__(self, model: nn.Module, reducer: TokenReducer) -> None:
        for path in ("model.vision_tower.embeddings", "model.multi_modal_projector", "model.language_model.layers"):
            if _get(model, path) is None:
                raise TypeError(f"expected a llava-hf LlavaForConditionalGeneration, but the model has no `{path}`")
        if not hasattr(model.model.vision_tower, "pre_layrnorm"):
            raise NotImplementedError("only CLIP-style vision towers (with a CLS token and pre-LayerNorm) "
                                      "are supported")
        for part in ("vision_config", "text_config"):
            impl = getattr(model.config, part)._attn_implementation
            if impl not in SUPPORTED_ATTENTION:
                raise ValueError(
                    f"{part} uses attention {impl!r}; load the model with attn_implementation='sdpa' (or 'eager')"
                )
        self.model = model
        self.reducer = reducer
        self.layout = LlavaLayout.from_config(model.config)
        check_reducer(reducer, self.layout)

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor,
        max_new_tokens: int,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int = 0,
        budgets: Tensor | None = None,
        relevant: Tensor | None = None,
        keep_state: bool = False,
    ) -> Generation:
        """Greedy decoding with the KV cache.

        Args:
            input_ids: (B, T) left-padded prompts, each holding one run of `num_patches` image tokens (as the
                llava-hf processor writes them).
            attention_mask: (B, T) 1 on real tokens.
            pixel_values: (B, 3, H, W).
            max_new_tokens: decoding steps at most.
            eos_token_id: id or ids that end a sample.
            pad_token_id: written after a sample has ended.
            budgets: (B,) optional per-sample budgets passed to the reducer.
            relevant: (B, N) bool, each question's relevant patches, for a reducer that needs them (`oracle`).
            keep_state: keep the decoding state (its KV cache) in `Generation.state`, for a follow-up turn
                (`ask_again`); by default it is freed with the call.
        """
        return self._generate(lambda: self.prefill(input_ids, attention_mask, pixel_values, budgets=budgets,
                                                   relevant=relevant),
                              max_new_tokens, eos_token_id, pad_token_id, keep_state)

    def prefill(
        self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, budgets: Tensor | None = None,
        tail: int = 1, relevant: Tensor | None = None,
    ) -> DecodeState:
        """Run the reduced prefill; return the decoding state (cache, masks, last-position logits, token trace).

        Differentiable (no `no_grad` here): training computes a loss on `tail_logits`, the logits of the last `tail`
        positions (with left padding, a teacher-forced answer sits at the end of every row), and reads the
        reducer's `aux`.
        """
        m = self.model
        device = m.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device).bool()
        self._image_span(input_ids)  # fail before any compute
        pixel_values = pixel_values.to(device, m.model.vision_tower.dtype)
        key = pixel_key(pixel_values)  # (B,)
        log = ReducerLog(macs=torch.zeros(pixel_values.size(0), dtype=torch.long, device=device))
        wanted = (len(key), self.layout.num_patches)
        if "relevant" in self.reducer.needs and (relevant is None or tuple(relevant.shape) != wanted):
            raise ValueError(f"{self.reducer.name} needs each question's relevant patches as a (batch, "
                             f"{self.layout.num_patches}) mask; only tasks that record relevant_patches have them")
        feats = self._encode_images(pixel_values, budgets, key, log, relevant, (input_ids, attention_mask))
        projected = m.model.multi_modal_projector(feats.x)  # (B, K, D)
        log.finite.watch("the projector's output", projected, feats.valid)
        valid, src = feats.valid, feats.src
        if self.reducer.site is Site.EMBEDDINGS:  # the trace keeps `feats`: every token went through the projector
            t0 = self._clock()
            st = _Prompt(self, (input_ids, attention_mask))
            sig = tokens_fields(provide(self.reducer.needs, EMBEDDING_PROVIDERS, st))
            red = self.reducer(Tokens(x=projected, grid=self.layout.grid, valid=valid, budget=budgets, sample_key=key,
                                      **sig))
            log.add(red, self._clock() - t0)
            projected, valid, src = self._apply(red, projected, valid, src, budgets)  # (B, K', D)
        seq = self._splice(input_ids, attention_mask, projected, valid, src)  # seq.x (B, T', D)
        image = ImageSide(grid=self.layout.grid, num_patches=self.layout.num_patches,
                          vision_tokens=feats.vision_tokens, projector_tokens=feats.projector_tokens())
        return self._llm_prefill(seq, image, budgets, key, log, tail)

    def _rotary(self, x: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.model.language_model.rotary_emb(x, pos[..., 0])  # LLaMA: one position axis

    # ------------------------------------------------------------------ vision

    def _encode_images(self, pixel_values: Tensor, budgets: Tensor | None, key: Tensor, log: ReducerLog,
                       relevant: Tensor | None, prompt: tuple[Tensor, Tensor]) -> _Features:
        """(B, 3, H, W) -> the features of the visual tokens (VISION and FEATURES sites reduce them here); the
        reducer's MACs and time go into `log`."""
        vt, lay, r = self.model.model.vision_tower, self.layout, self.reducer
        h = vt.embeddings(pixel_values)  # (B, 1+N, Dv)
        b, n = h.size(0), lay.num_patches
        if h.size(1) != 1 + n:
            raise ValueError(f"vision embeddings have {h.size(1)} tokens, expected 1 + {n}; check the image size")
        extra = r.extra_vision_tokens(b, n, budgets)  # (B, E, Dv) or None, e.g. Option A's budget token
        e = 0 if extra is None else extra.size(1)
        if e:
            h = torch.cat([h, extra.to(h.dtype)], 1)  # (B, 1+N+E, Dv): [CLS, P1..PN, extras]
        h = vt.pre_layrnorm(h)
        src = torch.arange(n, device=h.device).expand(b, n)  # (B, N) original patch index of each token
        valid, attn_mask = None, None
        hidden, counts, qk = {0: h}, [], None
        for i, layer in enumerate(vt.encoder.layers[: lay.vision_layers_run]):
            if r.site is Site.VISION and i == r.layer:
                if e:
                    raise NotImplementedError(f"{r.name}: extra vision tokens are supported at the features site only")
                t0 = self._clock()
                red = r(Tokens(x=h[:, 1:], grid=lay.grid, valid=valid, budget=budgets, sample_key=key))
                log.add(red, self._clock() - t0)
                patches, valid, src = self._apply(red, h[:, 1:], valid, src, budgets)
                h = torch.cat([h[:, :1], patches], 1)  # (B, 1+K, Dv): CLS always kept
                if valid is not None:
                    real = torch.cat([valid.new_ones(b, 1), valid], 1)  # (B, 1+K) CLS + kept patches
                    attn_mask = torch.zeros(real.shape, dtype=h.dtype, device=h.device)
                    attn_mask = attn_mask.masked_fill(~real, torch.finfo(h.dtype).min)[:, None, None, :]
            counts.append(h.size(1) if valid is None else 1 + valid.sum(1))
            if KEEPS_QK & r.needs and i == lay.vision_layers_run - 1:  # the layer that makes the features
                h, qk = self._vision_layer_keeping_qk(layer, h, attn_mask)
            else:
                h = layer(h, attn_mask)
            hidden[i + 1] = h
            log.finite.watch(f"vision layer {i}'s output", h, None if valid is None else
                             torch.cat([valid.new_ones(b, 1), valid, valid.new_ones(b, e)], 1))
        # (B, N, Dv*nf)
        feats = torch.cat([hidden[j][:, 1 : hidden[j].size(1) - e] for j in lay.feature_layers], dim=-1)
        extra_out = hidden[max(lay.feature_layers)][:, hidden[max(lay.feature_layers)].size(1) - e :] if e else None
        vision_tokens = torch.stack([torch.as_tensor(c, device=h.device).expand(b) for c in counts], 1)
        if r.site is Site.FEATURES:
            t0 = self._clock()
            st = _VisionStage(self, h, attn_mask, qk, hidden, feats.size(1), e, relevant, prompt)
            sig = tokens_fields(provide(r.needs, FEATURE_PROVIDERS, st))
            log.macs = log.macs + signal_macs(r.needs, Dims(batch=b, tokens=feats.size(1), width=h.size(-1), extra=e,
                                                            seq=torch.as_tensor(counts[-1], device=h.device)))
            red = r(Tokens(x=feats, grid=lay.grid, valid=valid, budget=budgets, sample_key=key, extra=extra_out, **sig))
            log.add(red, self._clock() - t0)
            feats, valid, src = self._apply(red, feats, valid, src, budgets)
        return _Features(x=feats, valid=valid, src=src, vision_tokens=vision_tokens)

    @staticmethod
    def _vision_layer_keeping_qk(layer: nn.Module, h: Tensor, attn_mask: Tensor | None
                                 ) -> tuple[Tensor, tuple[Tensor, Tensor, float]]:
        """One CLIP encoder layer written out as `CLIPEncoderLayer.forward` (the same modules, the same attention
        function), keeping its queries and keys: (B, S, Dv) -> (B, S, Dv) and (q, k, scale), q and k (B, H, S, hd).
        Nothing is computed twice; the CLS row is read from q and k afterwards (`_cls_row`)."""
        att = layer.self_attn
        x = layer.layer_norm1(h)
        heads = (*x.shape[:-1], -1, att.head_dim)
        q, k, v = (proj(x).view(heads).transpose(1, 2) for proj in (att.q_proj, att.k_proj, att.v_proj))
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(att.config._attn_implementation, eager_attention_forward)
        out, _ = attend(att, q, k, v, attn_mask, scaling=att.scale, dropout=0.0)  # (B, S, H, hd)
        h = h + att.out_proj(out.reshape(*x.shape[:-1], -1).contiguous())
        return h + layer.mlp(layer.layer_norm2(h)), (q, k, att.scale)

    @staticmethod
    def _cls_row(q: Tensor, k: Tensor, scale: float, attn_mask: Tensor | None) -> Tensor:
        """(B, N) the CLS query's attention over the patches, softmax per head over CLS and every token (padding
        masked), averaged over heads; q, k (B, H, S, hd) as the layer computed them, S = 1 + N (+ extras)."""
        scores = (q[:, :, :1] @ k.transpose(-1, -2)).float() * scale  # (B, H, 1, S)
        if attn_mask is not None:
            scores = scores + attn_mask.float()
        return scores.softmax(-1).mean(1)[:, 0, 1:]  # (B, S - 1)

    def _vision_signals(self, h: Tensor, attn_mask: Tensor | None) -> dict[str, Tensor]:
        """CLS attention and keys from the q/k projections of the encoder layer that consumes the features.

        As PruMerge's reference computes them: q and k are that layer's projections of LayerNorm(features) before
        any head split or scaling; `cls_attn` = softmax(q_cls . k^T / sqrt(width)) over CLS and every patch, taken
        at the patches (one fused head over the full width, not a head average).
        """
        lay, vt = self.layout, self.model.model.vision_tower
        if lay.vision_layers_run >= lay.vision_layers:
            raise NotImplementedError(
                f"{self.reducer.name} needs CLS attention from the layer after the features, but the features come "
                "from the last vision layer; such signals are defined for vision_feature_layer < -1 (LLaVA-1.5: -2)"
            )
        layer = vt.encoder.layers[lay.vision_layers_run]
        hn = layer.layer_norm1(h)  # (B, S, Dv)
        q = layer.self_attn.q_proj(hn[:, :1])  # (B, 1, Dv): only the CLS query is needed
        k = layer.self_attn.k_proj(hn)  # (B, S, Dv)
        scores = (q @ k.transpose(1, 2)).float() / k.size(-1) ** 0.5  # (B, 1, S)
        if attn_mask is not None:
            scores = scores + attn_mask[:, 0].float()
        return {"cls_attn": scores.softmax(-1)[:, 0, 1:], "keys": k[:, 1:]}  # (B, N), (B, N, Dv)

    def _apply(self, red: Reduced, x_in: Tensor, valid: Tensor | None, src: Tensor, budgets: Tensor | None
               ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Check a reducer's output against its budget and carry the source-patch map through it."""
        r = self.reducer
        if not isinstance(red, Reduced):
            raise TypeError(f"{r.name}.forward must return a Reduced, got {type(red).__name__}")
        if red.keep is None:
            if red.x.size(1) != x_in.size(1):
                raise ValueError(f"{r.name} changed the token count but returned keep=None")
            return red.x, red.valid if red.valid is not None else valid, src
        limit = budgets.clamp(min=1) if budgets is not None else r.budget  # a budget <= 0 still keeps one token
        if limit is not None:
            counts = red.keep.size(1) if red.valid is None else red.valid.sum(1)
            if bool(torch.as_tensor(counts > torch.as_tensor(limit, device=red.keep.device)).any()):
                raise ValueError(f"{r.name} returned more tokens than its budget ({limit})")
        x = red.x
        new_src = torch.where(red.keep >= 0, src.gather(1, red.keep.clamp(min=0)), -1)  # (B, K)
        new_valid = red.valid
        if new_valid is not None:  # drop padding slots now, so later layers and the projector skip them
            idx, new_valid = pack_true(new_valid)  # (B, K')
            x, new_src = gather_tokens(x, idx), new_src.gather(1, idx)
            new_valid = None if bool(new_valid.all()) else new_valid
        return x, new_valid, new_src

    # ------------------------------------------------------------------ splice

    def _splice(self, input_ids: Tensor, attention_mask: Tensor, feats: Tensor, fvalid: Tensor | None, fsrc: Tensor
                ) -> Seq:
        """Replace each prompt's image-token run by its K_i visual tokens (feats (B, K, D), fvalid, fsrc as in
        `_Features`) and re-pack with left padding; position ids are contiguous over the real tokens."""
        n, emb = self.layout.num_patches, self.model.model.language_model.embed_tokens
        is_img, start = self._image_span(input_ids)
        b, t = input_ids.shape
        k = feats.size(1)
        q = torch.arange(t - n + k, device=input_ids.device).unsqueeze(0)  # (1, T2)
        rel = q - start.unsqueeze(1)  # (B, T2) offset into the visual run
        in_vis = (rel >= 0) & (rel < k)
        txt_idx = torch.where(rel < 0, q, q - k + n).clamp(0, t - 1)  # (B, T2)
        vis_idx = rel.clamp(0, k - 1)
        text = emb(input_ids.masked_fill(is_img, 0))  # (B, T, D); image ids are placeholders only
        x = torch.where(in_vis.unsqueeze(-1), gather_tokens(feats, vis_idx), gather_tokens(text, txt_idx))
        fvalid = torch.ones_like(fsrc, dtype=torch.bool) if fvalid is None else fvalid
        keep = torch.where(in_vis, fvalid.gather(1, vis_idx), attention_mask.gather(1, txt_idx))  # (B, T2)
        src = torch.where(in_vis, fsrc.gather(1, vis_idx), -1)
        idx, real = pack_true(keep, right=True)  # (B, T')
        pos = running_index(real)  # contiguous positions, like HF with left padding
        return Seq(x=gather_tokens(x, idx), real=real, pos=pos.unsqueeze(-1), visual=in_vis.gather(1, idx) & real,
                   src=src.gather(1, idx))

    def _image_span(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T) ids -> image-token mask (B, T) and span start (B,); raises unless one run of N per prompt."""
        n = self.layout.num_patches
        is_img = input_ids == self.layout.image_token_id  # (B, T)
        counts = is_img.sum(1)
        start = is_img.int().argmax(1) if input_ids.size(1) else counts  # (B,) first image token
        span = (start.unsqueeze(1) + torch.arange(n, device=input_ids.device)).clamp(max=max(input_ids.size(1) - 1, 0))
        if bool((counts != n).any()) or not bool(is_img.gather(1, span).all()):
            raise ValueError(
                f"each prompt must hold exactly one contiguous run of {n} image tokens (id "
                f"{self.layout.image_token_id}), found counts {counts.tolist()}; build inputs with the model's "
                "processor from a prompt with one <image>"
            )
        return is_img, start


def check_reducer(r: TokenReducer, lay: LlavaLayout) -> None:
    """Raise (saying what to do) unless reducer `r` can act at its site and layer on a model of layout `lay`: the
    signals' check (`methods.signals.check`), then what is LLaVA's own; the runner calls it for every cell before
    any work starts, the adapter again when it is built."""
    if getattr(r, "fraction", None) is not None:
        raise ValueError(f"{r.name}: every LLaVA image has {lay.num_patches} visual tokens; give the budget as a count "
                         f"(fraction {r.fraction} of them: {r.token_budget.tokens(lay.num_patches)})")
    signals.check(r, ReducedLlava.provides, lay.llm_layers, lay.num_patches)
    if r.site is Site.VISION and not 0 <= r.layer < min(lay.feature_layers):
        raise ValueError(
            f"{r.name}: vision layer {r.layer} must be below the feature layer {min(lay.feature_layers)} "
            f"of this {lay.vision_layers}-layer encoder"
        )
    r.check_model(lay.num_patches, lay.feature_width)


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
