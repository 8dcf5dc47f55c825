"""Closed-form MACs of the model families, driven by a token trace: LLaVA (CLIP ViT + MLP projector + LLaMA
decoder, `ModelShape`), Qwen2.5-VL (windowed ViT + patch merger + Qwen2 decoder) and Qwen3-VL (ViT + patch merger and
DeepStack mergers + Qwen3 decoder), both `QwenShape`; `model_shape` picks the one for a config.

Conventions (one place, tested):

* 1 MAC = one multiply-add; FLOPs = 2 x MACs. Only matmul-like work is counted (linear layers, the patch-embedding
  convolution, QK^T and PV); norms, activations, softmax, RoPE and residual adds are ignored (< 0.1 %).
* Attention is the dense n x n matrix (no causal discount), as fvcore, FlopCounterMode and the literature count it.
* Vision: as executed. The adapter runs the encoder layers up to the feature layer only (LLaVA-1.5: 23 of 24) and
  the trace records each executed layer's token count (Option A's budget token included), so the count follows
  the trace. Per layer over n tokens: 4 n d^2 + 2 n^2 d + 2 n d m (GELU MLP, two matrices).
* Projector: tokens x (d_v d + d d) for LLaVA's two-layer MLP (d_v x the number of feature layers in).
* Qwen2.5-VL vision, per image of t x h x w patches (the record's `image_grid_thw`): the 3-D patch convolution
  (t h w x c t_p p^2 d); per block over its n = t h w patches 4 n d^2 (qkv, proj) + 3 n d m (SwiGLU MLP) and the
  attention 2 d sum(w_i^2) over the block's attention groups: each frame's h w patches in a full-attention block
  (`fullatt_block_indexes`), the windows of (window_size / patch)^2 patches (clipped at the image's edges)
  elsewhere. Merger: n / s^2 tokens x (s^2 d x s^2 d + s^2 d x D), s = spatial_merge_size.
* Qwen3-VL vision: as Qwen2.5-VL's with every block attending over each whole frame, a GELU MLP of two matrices
  (2 n d m), and one more merger per DeepStack tap (`deepstack_visual_indexes`), each over every patch of the image
  (the taps run before any reduction); the learned position embedding's interpolation and the DeepStack additions
  in the LLM are elementwise (not counted). Its decoder's per-head q/k norms are norms (not counted).
* LLM prefill, per layer over n tokens: 2 n d d_q + 2 n d d_kv (q, o; k, v with grouped-query attention)
  + 2 n^2 d_q (QK^T, PV) + 3 n d m (SwiGLU: gate, up, down); d_q = heads x head_dim, d itself on most models (not on
  Qwen3-VL-4B: 4,096 of 2,560). n is the layer's own token count (FastV drops at K).
* lm_head: d x vocab on the last position in prefill (what `generate` computes) and on every decode step.
* Decode: a sample that generated G tokens ran G - 1 decode steps (the first token comes from the prefill logits).
  Step i feeds one token per layer attending over c_l + i keys, c_l = that layer's prefill length:
  2 d d_q + 2 d d_kv + 2 (c_l + i) d_q + 3 d m, plus lm_head.
* A follow-up turn on the cache (`ask_again`, "prune once"): the cache holds, per layer, c_l + G - 1 keys after a
  first answer of G tokens; the follow-up's T tokens (the last answer token, then the new text) run as one chunk:
  per layer T x (the layer's weights) + 2 T (c_l + G - 1 + T) d (the dense rectangle of T queries over every key),
  lm_head on its last position, then its own decode steps over the grown cache (`follow_up`).
* Reducer: its own matmul-like work (a controller, a cross-attention, similarity and merging matmuls) plus the
  signals the adapter computes for it (CLS query and keys, FastV's ranking row), per sample, as the trace's
  `reducer_macs`; each method states its formula where it computes it (`Reduced.macs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from methods.trace import LlavaLayout


def _llm_fields(tc) -> dict:
    """The LLM widths and depths the counter uses, from a text config (LLaMA or Qwen2)."""
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    kv_heads = getattr(tc, "num_key_value_heads", None) or heads
    return {"width": tc.hidden_size, "mlp": tc.intermediate_size, "kv_width": kv_heads * head_dim,
            "layers": tc.num_hidden_layers, "vocab": tc.vocab_size, "q_width": heads * head_dim}


def model_shape(config) -> ModelShape | QwenShape:
    """The counter's shape of a checkpoint's config: `QwenShape` for Qwen2.5-VL and Qwen3-VL, `ModelShape` for
    LLaVA."""
    if config.model_type in ("qwen2_5_vl", "qwen3_vl"):
        return QwenShape.from_config(config)
    return ModelShape.from_config(config)


@dataclass(frozen=True)
class LLMShape:
    """The language model's widths and depth (both families' decoders are priced alike)."""

    width: int
    mlp: int
    kv_width: int
    layers: int
    vocab: int
    q_width: int = field(default=0, kw_only=True)  # heads x head_dim (0: the width; Qwen3-VL-4B: 4096 of 2560)

    @property
    def queries(self) -> int:
        """The queries' width (q and o projections, QK^T and PV): heads x head_dim, most often the hidden width."""
        return self.q_width or self.width


@dataclass(frozen=True)
class ModelShape(LLMShape):
    """The widths and depths that determine the MACs, read from a LLaVA config."""

    num_patches: int
    vision_width: int
    vision_mlp: int
    vision_channels: int
    patch: int
    feature_layers: int  # how many vision layers' outputs the projector concatenates

    @classmethod
    def from_config(cls, config) -> ModelShape:
        vc = config.vision_config
        lay = LlavaLayout.from_config(config)
        return cls(num_patches=lay.num_patches, vision_width=lay.vision_width, vision_mlp=vc.intermediate_size,
                   vision_channels=vc.num_channels, patch=vc.patch_size, feature_layers=len(lay.feature_layers),
                   **_llm_fields(config.text_config))

    def vision_parts(self, record: dict) -> tuple[int, list[int]]:
        """MACs of the patch embedding and of each executed vision layer."""
        embed = self.num_patches * self.vision_channels * self.patch * self.patch * self.vision_width  # the conv
        return embed, [vision_layer_macs(n, self) for n in record["vision_tokens_per_layer"]]

    def vision_macs(self, record: dict) -> int:
        embed, layers = self.vision_parts(record)
        return embed + sum(layers)

    def projector_macs(self, record: dict) -> int:
        return record["projector_tokens"] * (self.vision_width * self.feature_layers * self.width + self.width ** 2)

    def image_tokens(self, record: dict) -> int:
        """Visual tokens of the record's image before any reduction."""
        return self.num_patches


@dataclass(frozen=True)
class QwenShape(LLMShape):
    """The widths and depths that determine the MACs, read from a Qwen2.5-VL or Qwen3-VL config; the image's own size
    comes with each record (`image_grid_thw`)."""

    vision_width: int
    vision_mlp: int
    vision_channels: int
    patch: int
    temporal_patch: int
    merge: int
    window: int | None  # side of an attention window, in patches (None: no windows, Qwen3-VL)
    full_blocks: tuple[int, ...]
    vision_mlp_matrices: int = 3  # Qwen2.5-VL's SwiGLU (gate, up, down); Qwen3-VL's GELU MLP has 2
    mergers: int = 1  # the patch merger, and Qwen3-VL's DeepStack mergers

    @classmethod
    def from_config(cls, config) -> QwenShape:
        vc = config.vision_config
        if config.model_type == "qwen3_vl":
            geometry = {"window": None, "full_blocks": tuple(range(vc.depth)), "vision_mlp_matrices": 2,
                        "mergers": 1 + len(vc.deepstack_visual_indexes or ())}
        else:
            geometry = {"window": vc.window_size // vc.patch_size, "full_blocks": tuple(vc.fullatt_block_indexes)}
        return cls(vision_width=vc.hidden_size, vision_mlp=vc.intermediate_size, vision_channels=vc.in_channels,
                   patch=vc.patch_size, temporal_patch=vc.temporal_patch_size, merge=vc.spatial_merge_size,
                   **geometry, **_llm_fields(config.text_config))

    def attention_groups(self, grid_thw) -> tuple[list[int], list[int]]:
        """Patches per attention group of an image: (each frame whole, each window); windows are whole merge
        units, clipped at the image's bottom and right edges."""
        t, h, w = grid_thw
        frames = [h * w] * t
        if self.window is None:
            return frames, frames
        side = self.window // self.merge  # window side in merged tokens
        rows, cols = h // self.merge, w // self.merge
        sizes = [min(side, rows - i) * min(side, cols - j) * self.merge ** 2
                 for i in range(0, rows, side) for j in range(0, cols, side)]
        return frames, sizes * t

    def vision_parts(self, record: dict) -> tuple[int, list[int]]:
        """MACs of the patch embedding and of each vision block."""
        t, h, w = record["image_grid_thw"]
        d, m = self.vision_width, self.vision_mlp
        embed = t * h * w * self.vision_channels * self.temporal_patch * self.patch ** 2 * d
        frames, windows = self.attention_groups((t, h, w))
        blocks = []
        for block, n in enumerate(record["vision_tokens_per_layer"]):
            if n != t * h * w:
                raise ValueError(f"the counter prices Qwen vision blocks over the whole image ({t * h * w} "
                                 f"patches), not {n}")
            groups = frames if block in self.full_blocks else windows
            blocks.append(4 * n * d * d + self.vision_mlp_matrices * n * d * m + 2 * d * sum(g * g for g in groups))
        return embed, blocks

    def vision_macs(self, record: dict) -> int:
        embed, blocks = self.vision_parts(record)
        return embed + sum(blocks)

    def projector_macs(self, record: dict) -> int:
        wide = self.merge ** 2 * self.vision_width  # s^2 patches side by side per merged token
        return self.mergers * (record["projector_tokens"] // self.merge ** 2 * (wide * wide + wide * self.width))

    def image_tokens(self, record: dict) -> int:
        t, h, w = record["image_grid_thw"]
        return t * h * w // self.merge ** 2


@dataclass(frozen=True)
class MacReport:
    """MACs of one sample, by part. `flops` = 2 x MACs."""

    vision: int
    reducer: int
    projector: int
    llm_prefill: int
    lm_head_prefill: int
    decode: int

    @property
    def prefill(self) -> int:
        """Everything up to the first generated token: vision + reducer + projector + LLM prefill + lm_head."""
        return self.vision + self.reducer + self.projector + self.llm_prefill + self.lm_head_prefill

    @property
    def total(self) -> int:
        return self.prefill + self.decode


def vision_layer_macs(n: int, s: ModelShape) -> int:
    d, m = s.vision_width, s.vision_mlp
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def llm_layer_weights(s: LLMShape) -> int:
    """Weights of one decoder layer's matrices (q, o; k, v; gate, up, down), = its MACs per token outside attention."""
    d = s.width
    return 2 * d * s.queries + 2 * d * s.kv_width + 3 * d * s.mlp


def llm_layer_macs(n: int, s: LLMShape) -> int:
    return n * llm_layer_weights(s) + 2 * n * n * s.queries


def kv_cache_bytes(record: dict, s: LLMShape, bytes_per_value: int,
                   follow_ups: tuple[tuple[int, int], ...] = ()) -> int:
    """Bytes of one sample's KV cache when its generation ends: each layer holds keys and values (`kv_width` each)
    for the c_l tokens that entered it in prefill plus one per decoding step (a sample that generated G tokens fed
    G - 1 of them back), so 2 x kv_width x sum_l (c_l + G - 1) values; each follow-up turn on that cache
    (`follow_ups`: its tokens T and generated tokens G', as `follow_up` prices it) adds T + G' - 1 per layer. Batch
    padding is not counted (the sample's own cache, as the analytic MACs)."""
    steps = max((record.get("generated_tokens") or 1) - 1, 0)
    steps += sum(t + max(g - 1, 0) for t, g in follow_ups)
    return 2 * s.kv_width * sum(c + steps for c in record["llm_tokens_per_layer"]) * bytes_per_value


def count(record: dict, s: ModelShape | QwenShape) -> MacReport:
    """MACs of one sample from its token trace (a `TokenTrace.sample` record: `vision_tokens_per_layer`,
    `projector_tokens`, `llm_tokens_per_layer`, `reducer_macs`, `generated_tokens`; Qwen2.5-VL's also
    `image_grid_thw`)."""
    vision, projector = s.vision_macs(record), s.projector_macs(record)
    lengths = record["llm_tokens_per_layer"]
    prefill = sum(llm_layer_macs(n, s) for n in lengths)
    head = s.width * s.vocab
    steps = max((record.get("generated_tokens") or 1) - 1, 0)
    d = s.queries
    per_step_fixed = s.layers * llm_layer_weights(s) + head
    attention = sum(2 * d * (c + i) for c in lengths for i in range(1, steps + 1))
    return MacReport(vision=vision, reducer=int(record.get("reducer_macs") or 0), projector=projector,
                     llm_prefill=prefill, lm_head_prefill=head, decode=steps * per_step_fixed + attention)


def follow_up(record: dict, s: LLMShape, tokens: int, generated: int,
              before: tuple[tuple[int, int], ...] = ()) -> MacReport:
    """MACs of one sample's follow-up turn on the cache its earlier turns left (`methods._llm.LLMSide.ask_again`):
    its `tokens` (T, the last answer token included) prefilled over every cached key of each layer, then `generated`
    tokens answered. `record` is the first turn's (`llm_tokens_per_layer`, `generated_tokens`); `before`, the (T, G)
    of follow-ups asked before this one on the same cache (each left T + G - 1 more keys per layer); vision, reducer
    and projector do not run again (0)."""
    d, head = s.queries, s.width * s.vocab
    earlier = max((record.get("generated_tokens") or 1) - 1, 0) + sum(t + max(g - 1, 0) for t, g in before)
    cached = [c + earlier for c in record["llm_tokens_per_layer"]]
    prefill = sum(tokens * llm_layer_weights(s) + 2 * tokens * (c + tokens) * d for c in cached)
    steps = max(generated - 1, 0)
    attention = sum(2 * d * (c + tokens + i) for c in cached for i in range(1, steps + 1))
    return MacReport(vision=0, reducer=0, projector=0, llm_prefill=prefill, lm_head_prefill=head,
                     decode=steps * (s.layers * llm_layer_weights(s) + head) + attention)


def later_turns(record: dict, s: ModelShape | QwenShape) -> list[MacReport]:
    """MACs of each later turn of a conversation (a record's `follow_ups`, as `benchmarks.lmms_model` writes them):
    a turn asked on the cache (prune once: its `tokens` and `generated_tokens`) as `follow_up` prices it after the
    turns before it; a turn prefilled again from the full image (re-prune: a whole token trace) as `count` does."""
    out, asked = [], []
    for turn in record.get("follow_ups") or []:
        if "llm_tokens_per_layer" in turn:
            out.append(count(turn, s))
        else:
            out.append(follow_up(record, s, turn["tokens"], turn["generated_tokens"], tuple(asked)))
            asked.append((turn["tokens"], turn["generated_tokens"]))
    return out


def conversation_kv_bytes(record: dict, s: LLMShape, bytes_per_value: int) -> int:
    """Bytes of one sample's KV cache after its last turn: the first turn's cache grown by every turn asked on it
    (`kv_cache_bytes` with `follow_ups`), or, when the last turn was prefilled again (re-prune), that prefill's."""
    turns = record.get("follow_ups") or []
    if turns and "llm_tokens_per_layer" in turns[-1]:
        return kv_cache_bytes(turns[-1], s, bytes_per_value)
    return kv_cache_bytes(record, s, bytes_per_value,
                          follow_ups=tuple((t["tokens"], t["generated_tokens"]) for t in turns))

