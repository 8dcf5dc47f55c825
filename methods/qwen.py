"""ReducedQwen: run a Hugging Face Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) the way `methods/llava.py` runs
LLaVA: prefill and greedy decoding written out over the model's own modules, no patched classes, no hooks.

Issue 18, first step: the family's geometry and the prefill with `full` only. What differs from LLaVA:

* dynamic resolution: each image arrives as its own grid (`image_grid_thw`, rows x cols of 14 px patches; the
  processor flattens every image's patches into one `pixel_values` of (sum of patches, 3 x 2 x 14 x 14)); the vision
  tower (window attention in most blocks, full attention in `fullatt_block_indexes`) ends in a merger that turns each
  2 x 2 group of patches into one LLM token, so an image of t x h x w patches gives t h w / 4 visual tokens;
* no CLS token;
* 3-D rotary positions (M-RoPE): text tokens advance all three axes together, an image's tokens take (t, row, col)
  offsets from the position where the image starts, and the text after an image resumes at the image's start plus its
  largest side. They come from the model's own `get_rope_index`, computed on the full prompt, so that a later reduction
  keeps each survivor's original position; decoding continues from each sample's largest position + 1 (what HF's
  `rope_deltas` amount to).

Prefill of a left-padded batch, one image per prompt: the vision tower (the model's own `visual` module, run once on
the batch's flattened patches) gives each image's tokens; they replace the prompt's image-token run; the decoder layers
run with an explicit additive mask (causal + padding) and the M-RoPE cos/sin of the model's rotary embedding;
`lm_head` on the last position. Reducers other than `full` are refused until the features and LLM sites land here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from methods._ops import additive_mask
from methods.base import TokenReducer


@dataclass(frozen=True)
class QwenLayout:
    """Geometry of a Qwen2.5-VL checkpoint, read from its config.

    Attributes:
        image_token_id: id of the image placeholder token in `input_ids` (one per visual token after the merger).
        patch_size: side of a vision patch in pixels (14).
        merge: the merger's side (2: each 2 x 2 group of patches is one LLM token).
        vision_layers: encoder blocks; full_attention_blocks: the ones that attend over the whole image.
        llm_layers: decoder layers of the language model.
        width: the LLM's hidden size (the merger's output).
    """

    image_token_id: int
    patch_size: int
    merge: int
    vision_layers: int
    full_attention_blocks: tuple[int, ...]
    llm_layers: int
    width: int

    @classmethod
    def from_config(cls, config) -> QwenLayout:
        vc, tc = config.vision_config, config.text_config
        return cls(image_token_id=config.image_token_id, patch_size=vc.patch_size, merge=vc.spatial_merge_size,
                   vision_layers=vc.depth, full_attention_blocks=tuple(vc.fullatt_block_indexes),
                   llm_layers=tc.num_hidden_layers, width=tc.hidden_size)

    def tokens(self, grid_thw: Tensor) -> Tensor:
        """(I, 3) patch grids -> (I,) LLM tokens per image."""
        return grid_thw.prod(-1) // (self.merge * self.merge)


@dataclass
class QwenDecodeState:
    """Decoding state after prefill: cache, real-key mask, each sample's next position id, last logits."""

    cache: object
    key_mask: Tensor  # (B, S) bool, True on real keys
    next_pos: Tensor  # (B,) position id of the next token (the same on the three M-RoPE axes)
    logits: Tensor  # (B, V) logits of the last prompt position


class ReducedQwen:
    """A Qwen2.5-VL model and one reducer, run together. Holds no state between calls; the model is never modified.

    Args:
        model: a `Qwen2_5_VLForConditionalGeneration`, attention "sdpa" or "eager".
        reducer: the token reducer; only `full` in this first step.
    """

    def __init__(self, model: nn.Module, reducer: TokenReducer) -> None:
        inner = getattr(model, "model", None)
        if not (hasattr(inner, "visual") and hasattr(inner, "language_model") and hasattr(inner, "get_rope_index")):
            raise TypeError("expected a Qwen2_5_VLForConditionalGeneration (model.model.visual, .language_model)")
        if reducer.name != "full":
            raise NotImplementedError(f"{reducer.name} does not run on Qwen2.5-VL yet (only full does); see issue 18")
        self.model, self.reducer = model, reducer
        self.layout = QwenLayout.from_config(model.config)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, image_grid_thw: Tensor,
                 max_new_tokens: int, eos_token_id: int | list[int] | None = None, pad_token_id: int = 0
                 ) -> tuple[Tensor, Tensor]:
        """Greedy decoding with the KV cache: (B, S) generated ids (pad after a sample's end) and (B,) lengths,
        end-of-sequence included."""
        state = self.prefill(input_ids, attention_mask, pixel_values, image_grid_thw)
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                           device=input_ids.device)
        b = input_ids.size(0)
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        lengths = torch.zeros(b, dtype=torch.long, device=input_ids.device)
        out, logits = [], state.logits
        for step in range(max_new_tokens):
            tok = logits.argmax(-1).masked_fill(done, pad_token_id)  # (B,)
            out.append(tok)
            lengths += (~done).long()
            done |= torch.isin(tok, eos)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = self._decode_step(state, tok)
        return (torch.stack(out, 1) if out else input_ids.new_zeros(b, 0)), lengths

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, image_grid_thw: Tensor
                ) -> QwenDecodeState:
        """The prefill of a left-padded batch with one image per prompt: decoding state and last-position logits."""
        m, lay = self.model, self.layout
        device = m.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device).bool()
        grid = image_grid_thw.to(device)
        is_img = input_ids == lay.image_token_id  # (B, T)
        want = lay.tokens(grid)  # (B,)
        if grid.size(0) != input_ids.size(0) or bool((is_img.sum(1) != want).any()):
            raise ValueError(f"each prompt must hold one image's run of image tokens (id {lay.image_token_id}); found "
                             f"{is_img.sum(1).tolist()} for grids giving {want.tolist()}; build inputs with the "
                             "model's processor, one image per prompt")
        pos, _ = m.model.get_rope_index(input_ids, is_img.int(), image_grid_thw=grid,
                                        attention_mask=attention_mask)  # (3, B, T) M-RoPE positions
        feats = m.model.visual(pixel_values.to(device, m.model.visual.dtype), grid_thw=grid).pooler_output  # (sum, D)
        lm = m.model.language_model
        x = lm.embed_tokens(input_ids.masked_fill(is_img, 0))  # (B, T, D); image ids are placeholders only
        x = x.masked_scatter(is_img.unsqueeze(-1), feats.to(x.dtype))  # each image's tokens in its run, in order
        cache = DynamicCache(config=lm.config)
        cos_sin = lm.rotary_emb(x, pos)
        mask = additive_mask(attention_mask, x.size(1), x.dtype)
        for layer in lm.layers:
            x = layer(x, attention_mask=mask, position_ids=None, past_key_values=cache, use_cache=True,
                      position_embeddings=cos_sin)  # (B, T, D)
        logits = m.lm_head(lm.norm(x[:, -1]))  # (B, V)
        next_pos = pos.masked_fill(~attention_mask, -1).amax((0, 2)) + 1  # (B,)
        return QwenDecodeState(cache=cache, key_mask=attention_mask, next_pos=next_pos, logits=logits)

    def _decode_step(self, state: QwenDecodeState, tok: Tensor) -> Tensor:
        """Feed one token per sample through every layer; return the next logits (B, V)."""
        lm = self.model.model.language_model
        x = lm.embed_tokens(tok.unsqueeze(1))  # (B, 1, D)
        pos = state.next_pos.view(1, -1, 1).expand(3, -1, 1)  # (3, B, 1): text advances the three axes together
        cos_sin = lm.rotary_emb(x, pos)
        state.key_mask = torch.cat([state.key_mask, state.key_mask.new_ones(state.key_mask.size(0), 1)], 1)
        mask = additive_mask(state.key_mask, 1, x.dtype)
        for layer in lm.layers:
            x = layer(x, attention_mask=mask, position_ids=None, past_key_values=state.cache, use_cache=True,
                      position_embeddings=cos_sin)
        state.next_pos = state.next_pos + 1
        return self.model.lm_head(lm.norm(x))[:, 0]
