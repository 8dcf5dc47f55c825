"""Closed-form MACs of a LLaVA-style model (CLIP ViT + MLP projector + LLaMA decoder), driven by a token trace.

Conventions (one place, tested):

* 1 MAC = one multiply-add; FLOPs = 2 x MACs. Only matmul-like work is counted (linear layers, the patch-embedding
  convolution, QK^T and PV); norms, activations, softmax, RoPE and residual adds are ignored (< 0.1 %).
* Attention is the dense n x n matrix (no causal discount), as fvcore, FlopCounterMode and the literature count it.
* Vision: as executed. The adapter runs the encoder layers up to the feature layer only (LLaVA-1.5: 23 of 24) and
  the trace records each executed layer's token count (Option A's budget token included), so the count follows
  the trace. Per layer over n tokens: 4 n d^2 + 2 n^2 d + 2 n d m (GELU MLP, two matrices).
* Projector: tokens x (d_v d + d d) for LLaVA's two-layer MLP (d_v x the number of feature layers in).
* LLM prefill, per layer over n tokens: 2 n d^2 + 2 n d d_kv (q, o; k, v with grouped-query attention)
  + 2 n^2 d (QK^T, PV) + 3 n d m (SwiGLU: gate, up, down). n is the layer's own token count (FastV drops at K).
* lm_head: d x vocab on the last position in prefill (what `generate` computes) and on every decode step.
* Decode: a sample that generated G tokens ran G - 1 decode steps (the first token comes from the prefill logits).
  Step i feeds one token per layer attending over c_l + i keys, c_l = that layer's prefill length:
  2 d^2 + 2 d d_kv + 2 (c_l + i) d + 3 d m, plus lm_head.
* Reducer: its own matmul-like work (a controller, a cross-attention, similarity and merging matmuls) plus the
  signals the adapter computes for it (CLS query and keys, FastV's ranking row), per sample, as the trace's
  `reducer_macs`; each method states its formula where it computes it (`Reduced.macs`).
"""

from __future__ import annotations

from dataclasses import dataclass

from methods.trace import LlavaLayout


@dataclass(frozen=True)
class ModelShape:
    """The widths and depths that determine the MACs, read from a LLaVA config."""

    num_patches: int
    vision_width: int
    vision_mlp: int
    vision_channels: int
    patch: int
    feature_layers: int  # how many vision layers' outputs the projector concatenates
    width: int
    mlp: int
    kv_width: int
    layers: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> ModelShape:
        vc, tc = config.vision_config, config.text_config
        heads = tc.num_attention_heads
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
        kv_heads = getattr(tc, "num_key_value_heads", None) or heads
        lay = LlavaLayout.from_config(config)
        return cls(
            num_patches=lay.num_patches, vision_width=lay.vision_width,
            vision_mlp=vc.intermediate_size, vision_channels=vc.num_channels,
            patch=vc.patch_size, feature_layers=len(lay.feature_layers), width=tc.hidden_size,
            mlp=tc.intermediate_size, kv_width=kv_heads * head_dim, layers=tc.num_hidden_layers, vocab=tc.vocab_size,
        )


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


def llm_layer_macs(n: int, s: ModelShape) -> int:
    d = s.width
    return 2 * n * d * d + 2 * n * d * s.kv_width + 2 * n * n * d + 3 * n * d * s.mlp


def count(record: dict, s: ModelShape) -> MacReport:
    """MACs of one sample from its token trace (a `TokenTrace.sample` record: `vision_tokens_per_layer`,
    `projector_tokens`, `llm_tokens_per_layer`, `reducer_macs`, `generated_tokens`)."""
    embed = s.num_patches * s.vision_channels * s.patch * s.patch * s.vision_width  # the patch convolution
    vision = embed + sum(vision_layer_macs(n, s) for n in record["vision_tokens_per_layer"])
    projector = record["projector_tokens"] * (s.vision_width * s.feature_layers * s.width + s.width * s.width)
    lengths = record["llm_tokens_per_layer"]
    prefill = sum(llm_layer_macs(n, s) for n in lengths)
    head = s.width * s.vocab
    steps = max((record.get("generated_tokens") or 1) - 1, 0)
    d = s.width
    per_step_fixed = s.layers * (2 * d * d + 2 * d * s.kv_width + 3 * d * s.mlp) + head
    attention = sum(2 * d * (c + i) for c in lengths for i in range(1, steps + 1))
    return MacReport(vision=vision, reducer=int(record.get("reducer_macs") or 0), projector=projector,
                     llm_prefill=prefill, lm_head_prefill=head, decode=steps * per_step_fixed + attention)
