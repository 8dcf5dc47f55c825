"""What a run is measured on and what it records: a checkpoint's geometry (`LlavaLayout`, `QwenLayout`: the one
answer to "how many patches, how wide, how deep" for the adapters, the runner, the trainer, the FLOPs counter and the
speed benchmark), each batch's token counts (`TokenTrace`), times (`Timing`) and output (`Generation`). It imports
nothing heavy; `flops/` reads the geometry here, never from the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the geometry is read without torch
    from torch import Tensor


@dataclass(frozen=True)
class LlavaLayout:
    """Geometry of a LLaVA checkpoint, read from its config.

    Attributes:
        image_token_id: id of the image placeholder token in `input_ids`.
        image_size: side of the square image the vision encoder takes, in pixels (LLaVA-1.5: 336).
        grid: patch grid (rows, cols) (LLaVA-1.5: 24 x 24 = 576 patches).
        vision_layers: encoder layers in the checkpoint.
        feature_layers: indices into the vision hidden states (0 = embeddings after the pre-LayerNorm, i = output of
            layer i - 1) that LLaVA concatenates into its features.
        llm_layers: decoder layers of the language model.
        vision_width: hidden size of the vision encoder.
        llm_width: hidden size of the language model (its input embeddings: the question's tokens, `text_width`).
    """

    image_token_id: int
    image_size: int
    grid: tuple[int, int]
    vision_layers: int
    feature_layers: tuple[int, ...]
    llm_layers: int
    vision_width: int
    llm_width: int = 0

    @property
    def text_width(self) -> int:
        """Width of the question's tokens a features-site reducer receives (the LLM's input embeddings)."""
        return self.llm_width

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def feature_width(self) -> int:
        """Channels of the features a features-site reducer receives (the selected layers concatenated)."""
        return self.vision_width * len(self.feature_layers)

    @property
    def vision_layers_run(self) -> int:
        """Encoder layers that must run to produce the features (the rest are skipped)."""
        return max(self.feature_layers)

    @classmethod
    def from_config(cls, config) -> LlavaLayout:
        vc, tc = config.vision_config, config.text_config
        if getattr(config, "vision_feature_select_strategy", "default") != "default":
            raise NotImplementedError(
                f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} is not supported; "
                "LLaVA-1.5 checkpoints use 'default' (CLS dropped)."
            )
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        n = vc.num_hidden_layers
        idx = tuple(i if i >= 0 else n + 1 + i for i in layers)
        if not all(0 <= i <= n for i in idx):
            raise ValueError(f"vision_feature_layer {layers} is out of range for a {n}-layer vision encoder")
        side = vc.image_size // vc.patch_size
        return cls(
            image_token_id=config.image_token_id,
            image_size=vc.image_size,
            grid=(side, side),
            vision_layers=n,
            feature_layers=idx,
            llm_layers=tc.num_hidden_layers,
            vision_width=vc.hidden_size,
            llm_width=tc.hidden_size,
        )


@dataclass(frozen=True)
class QwenLayout:
    """Geometry of a Qwen2.5-VL checkpoint, read from its config.

    Attributes:
        image_token_id: id of the image placeholder token in `input_ids` (one per visual token after the merger).
        patch_size: side of a vision patch in pixels (14).
        merge: the merger's side (2: each 2 x 2 group of patches is one LLM token).
        vision_layers: encoder blocks; full_attention_blocks: the ones that attend over the whole image (Qwen3-VL:
            every one).
        llm_layers: decoder layers of the language model.
        width: the LLM's hidden size (the merger's output).
        deepstack: Qwen3-VL's DeepStack taps: the encoder blocks whose outputs, each through its own merger, are
            added to the visual tokens after decoder layers 0, 1, ... (empty on Qwen2.5-VL).
    """

    image_token_id: int
    patch_size: int
    merge: int
    vision_layers: int
    full_attention_blocks: tuple[int, ...]
    llm_layers: int
    width: int
    deepstack: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, config) -> QwenLayout:
        vc, tc = config.vision_config, config.text_config
        full = getattr(vc, "fullatt_block_indexes", None)
        return cls(image_token_id=config.image_token_id, patch_size=vc.patch_size, merge=vc.spatial_merge_size,
                   vision_layers=vc.depth, full_attention_blocks=tuple(range(vc.depth) if full is None else full),
                   llm_layers=tc.num_hidden_layers, width=tc.hidden_size,
                   deepstack=tuple(getattr(vc, "deepstack_visual_indexes", None) or ()))

    @property
    def feature_width(self) -> int:
        """Channels of the tokens a features-site reducer receives: the merger's output, the LLM's width."""
        return self.width

    @property
    def text_width(self) -> int:
        """Width of the question's tokens a features-site reducer receives (the LLM's input embeddings)."""
        return self.width

    def tokens(self, grid_thw: Tensor) -> Tensor:
        """(I, 3) patch grids -> (I,) LLM tokens per image."""
        return grid_thw.prod(-1) // (self.merge * self.merge)


@dataclass
class TokenTrace:
    """Per-sample token counts of one batch of B samples: what `flops/` needs and what result rows record.

    Attributes:
        vision_tokens: (B, Lv) tokens (CLS included) entering each executed vision encoder layer.
        projector_tokens: (B,) tokens through the projector.
        llm_tokens: (B, L) real (unpadded) prefill tokens entering each LLM decoder layer.
        visual_tokens: (B, L) how many of those are visual tokens.
        kept: (B, M) original patch index of each visual token that reaches the last LLM layer (-1: a merged
            token with no single source), valid where `kept_valid`.
        kept_valid: (B, M) bool.
        reducer_macs: (B,) MACs of the reducer's own work: its `Reduced.macs` plus the signals computed for it.
        generated_tokens: (B,) tokens produced by decoding (end-of-sequence included), set by `generate`.
        image_grid: (B, 3) each image's patch grid (t, h, w) when images differ in size (Qwen2.5-VL), else None.
    """

    vision_tokens: Tensor
    projector_tokens: Tensor
    llm_tokens: Tensor
    visual_tokens: Tensor
    kept: Tensor
    kept_valid: Tensor
    reducer_macs: Tensor
    generated_tokens: Tensor | None = None
    image_grid: Tensor | None = None

    def sample(self, i: int, num_patches: int) -> dict:
        """Plain-Python record of sample i. `kept_indices` is None when every patch reached the LLM unchanged;
        `image_grid_thw` is there when images differ in size (`num_patches`: that image's visual tokens)."""
        kept = self.kept[i][self.kept_valid[i]].tolist()
        subset = sorted(k for k in kept if k >= 0)
        all_kept = len(kept) == num_patches and subset == list(range(num_patches))
        grid = {} if self.image_grid is None else {"image_grid_thw": self.image_grid[i].tolist()}
        return {
            "visual_tokens": int(self.visual_tokens[i, 0]),
            "visual_tokens_per_layer": self.visual_tokens[i].tolist(),
            "llm_tokens_per_layer": self.llm_tokens[i].tolist(),
            "vision_tokens_per_layer": self.vision_tokens[i].tolist(),
            "projector_tokens": int(self.projector_tokens[i]),
            "reducer_macs": int(self.reducer_macs[i]),
            "generated_tokens": None if self.generated_tokens is None else int(self.generated_tokens[i]),
            "kept_indices": None if all_kept else subset,
            **grid,
        }


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of one batch (synchronised on CUDA before each reading).

    Attributes:
        prefill_s: everything up to the first generated token (vision, reducer, projector, LLM prefill, lm_head).
        decode_s: the decoding steps after it.
        decode_steps: how many steps that was (the longest sample's length - 1).
        reducer_s: the part of `prefill_s` spent in the reducer and the signals computed for it.
    """

    prefill_s: float
    decode_s: float
    decode_steps: int
    reducer_s: float


@dataclass
class Generation:
    """Output of `ReducedLlava.generate`.

    Attributes:
        tokens: (B, S) generated ids; after a sample's end-of-sequence token, `pad_token_id`.
        lengths: (B,) generated tokens per sample, end-of-sequence included.
        trace: token counts of the batch.
        first_logits: (B, V) logits of the last prompt position (float32), for consistency checks.
        timing: wall-clock times of the batch.
        state: the decoding state after the answer (`methods._llm.DecodeState`: cache, masks, positions), for a
            follow-up turn (`ask_again`); the last generated token is not in its cache yet.
    """

    tokens: Tensor
    lengths: Tensor
    trace: TokenTrace
    first_logits: Tensor
    timing: Timing
    state: object = None
