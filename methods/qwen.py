"""ReducedQwen: run a Hugging Face Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) the way `methods/llava.py` runs
LLaVA: prefill and greedy decoding written out over the model's own modules, no patched classes, no hooks.

What differs from LLaVA:

* dynamic resolution: each image arrives as its own grid (`image_grid_thw`, rows x cols of 14 px patches; the
  processor flattens every image's patches into one `pixel_values` of (sum of patches, 3 x 2 x 14 x 14)); the vision
  tower (window attention in most blocks, full attention in `fullatt_block_indexes`) ends in a merger that turns each
  2 x 2 group of patches into one LLM token, so an image of t x h x w patches gives t h w / 4 visual tokens;
* no CLS token;
* 3-D rotary positions (M-RoPE): text tokens advance all three axes together, an image's tokens take (t, row, col)
  offsets from the position where the image starts, and the text after an image resumes at the image's start plus its
  largest side. They come from the model's own `get_rope_index`, computed on the full prompt, so that a reduction
  keeps each survivor's original 3-D position; decoding continues from each sample's largest position + 1 (what HF's
  `rope_deltas` amount to).

Prefill of a left-padded batch, one image per prompt: the vision tower (the model's own `visual` module, run once on the
batch's flattened patches) gives each image's tokens; they replace the prompt's image-token run; the LLM side
(`methods/_llm.py`, shared with LLaVA) runs the decoder layers with an explicit additive mask (causal + padding), the
model's M-RoPE cos/sin, and the LLM-site reductions. Sites: `features` / `embeddings` = after the merger, each image's
tokens padded to the batch's largest with a validity mask, a budget = at most that many tokens per image or a fraction
of each image's (`TokenReducer.fraction`: floor(f x tokens), at least 1, passed as per-sample budgets) (`random`,
`divprune`, and the learned controllers `adaptive_b` and `budget_blind`, trained for this family by
`benchmarks/tools/train_adaptive.py`: they score each token and read the budget as a share of each image's tokens, so
one controller serves every image size); `llm` (`fastv`, `dart`, `pdrop`, `sparsevlm`; the last two schedule each image
by its own token count, `Tokens.image_tokens`). The rest are refused with one line (`check_reducer`, from what the
adapter `provides`): PruMerge(+), VisionZip, VisPruner and FasterVLM need CLS-attention signals, which this family
cannot give (no CLS token), and `adaptive_a`'s budget token would have to run through the vision encoder's window
attention (not ported).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

from methods import signals
from methods._llm import LLM_PROVIDERS, DecodeState, ImageSide, LLMSide, ReducerLog, Seq
from methods._ops import gather_tokens, pack_true, pixel_key, running_index
from methods.base import Site, TokenReducer, Tokens
from methods.budget import Budget
from methods.loading import load_pretrained, template_follow_up
from methods.signals import Provides, provide, tokens_fields
from methods.trace import Generation, QwenLayout

QWEN_TURN = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
             "<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n")


def qwen_prompt(processor, text: str) -> str:
    """Qwen2.5-VL-Instruct prompt for one image and `text`, through the checkpoint's chat template when it has one
    (the image first, then the text, as lmms-eval's `qwen2_5_vl` sends them); an `<image>` in `text` is dropped."""
    text = text.replace("<image>", "").lstrip("\n")
    if getattr(processor, "chat_template", None):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(conv, add_generation_prompt=True)
    return QWEN_TURN.format(text=text)


def qwen_follow_up(processor, text: str) -> str:
    """What follows an answer in Qwen2.5-VL-Instruct's chat format up to the next answer, for a next question `text`
    (the end of the assistant turn, the user turn, the generation prompt), through the chat template when there is
    one."""
    text = text.replace("<image>", "").lstrip("\n")
    found = template_follow_up(processor, text)
    return f"<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n" if found is None else found


def load_qwen(path: str | Path, device: str = "cpu", dtype: str = "auto"):
    """Load a local Qwen2.5-VL checkpoint folder (e.g. Qwen/Qwen2.5-VL-7B-Instruct) and its processor, offline.
    Returns (model, processor)."""
    return load_pretrained(path, Qwen2_5_VLForConditionalGeneration, device, dtype)


def load_qwen3(path: str | Path, device: str = "cpu", dtype: str = "auto"):
    """Load a local Qwen3-VL checkpoint folder (e.g. Qwen/Qwen3-VL-8B-Instruct) and its processor, offline.
    Returns (model, processor)."""
    return load_pretrained(path, Qwen3VLForConditionalGeneration, device, dtype)


def _question(seq: Seq) -> dict[str, Tensor]:
    """(B, M, D) the LLM input embeddings of the text after the image (the spliced sequence holds them) and their
    (B, M) valid mask."""
    idx, valid = LLMSide._text_after_image(seq)
    return {"text.embeds": gather_tokens(seq.x, idx), "text.valid": valid}


# signal name (methods/signals.py) -> its `Tokens` fields, at the features and embeddings sites (the merger's output)
FEATURE_PROVIDERS: dict[str, Callable[[Seq], dict[str, Tensor]]] = {"question": _question}


class ReducedQwen(LLMSide):
    """A Qwen2.5-VL model and one reducer, run together. Holds no state between calls; the model is never modified.

    Args:
        model: a `Qwen2_5_VLForConditionalGeneration`, attention "sdpa" or "eager".
        reducer: the token reducer, one this family runs (`provides`; `methods.signals.check`).
    """

    _rotary_axes = 3
    provides: ClassVar[Provides] = Provides(  # no CLS token; before the LLM, the question only
        family="Qwen2.5-VL", signals={Site.FEATURES: frozenset(FEATURE_PROVIDERS),
                                      Site.EMBEDDINGS: frozenset(FEATURE_PROVIDERS),
                                      Site.LLM: frozenset(LLM_PROVIDERS)},
        extra_vision_tokens="appends tokens to the vision encoder's input, which would have to join its window "
                            "attention (not ported)")

    def __init__(self, model: nn.Module, reducer: TokenReducer) -> None:
        inner = getattr(model, "model", None)
        if not (hasattr(inner, "visual") and hasattr(inner, "language_model") and hasattr(inner, "get_rope_index")):
            raise TypeError(f"expected a {self.provides.family} model (model.model.visual, .language_model)")
        self.model, self.reducer = model, reducer
        self.layout = QwenLayout.from_config(model.config)
        # images vary in size: budgets a stage cannot meet are refused per batch
        check_reducer(reducer, self.layout, provides=self.provides)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, image_grid_thw: Tensor,
                 max_new_tokens: int, eos_token_id: int | list[int] | None = None, pad_token_id: int = 0,
                 budgets: Tensor | None = None, keep_state: bool = False) -> Generation:
        """Greedy decoding with the KV cache (as `ReducedLlava.generate`; `image_grid_thw` (B, 3) as the processor
        writes it)."""
        return self._generate(lambda: self.prefill(input_ids, attention_mask, pixel_values, image_grid_thw, budgets),
                              max_new_tokens, eos_token_id, pad_token_id, keep_state)

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, image_grid_thw: Tensor,
                budgets: Tensor | None = None, tail: int = 1) -> DecodeState:
        """The prefill of a left-padded batch with one image per prompt: decoding state and the logits of the last
        `tail` positions. Differentiable, as `ReducedLlava.prefill` (training a controller needs the graph)."""
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
        if budgets is None and self.reducer.fraction is not None:  # a fraction: each image's own count
            budgets = fraction_counts(self.reducer.fraction, want)
        pos, _ = m.model.get_rope_index(input_ids, is_img.int(), image_grid_thw=grid,
                                        attention_mask=attention_mask)  # (3, B, T) M-RoPE positions
        pixel_values = pixel_values.to(device, m.model.visual.dtype)
        out = m.model.visual(pixel_values, grid_thw=grid)
        feats = out.pooler_output  # (sum of tokens, D), image after image
        counts = want.tolist()
        deepstack = tuple(pad_sequence(level.split(counts), batch_first=True)  # Qwen3-VL: (B, N, D) per level
                          for level in getattr(out, "deepstack_features", None) or ())
        lm = m.model.language_model
        x = lm.embed_tokens(input_ids.masked_fill(is_img, 0))  # (B, T, D); image ids are placeholders only
        x = x.masked_scatter(is_img.unsqueeze(-1), feats.to(x.dtype))  # each image's tokens in its run, in order
        nth = running_index(is_img)  # (B, T) index of each image token within its image
        seq = Seq(x=x, real=attention_mask, pos=pos.permute(1, 2, 0), visual=is_img & attention_mask,
                  src=torch.where(is_img, nth, -1))
        patches = grid.prod(-1)  # (B,) patches through every vision block and the merger
        image = ImageSide(grid=(1, int(want.max())), num_patches=int(want.max()),
                          vision_tokens=patches.unsqueeze(1).expand(-1, lay.vision_layers), projector_tokens=patches,
                          image_tokens=want, image_grid=grid, deepstack=deepstack)
        key = torch.cat([pixel_key(p.reshape(1, -1, 1, 1)) for p in pixel_values.split(patches.tolist())])  # (B,)
        log = ReducerLog(macs=torch.zeros(input_ids.size(0), dtype=torch.long, device=device))
        log.finite.watch("the vision tower's output (after the merger)", feats)
        if self.reducer.site in (Site.FEATURES, Site.EMBEDDINGS):  # after the merger: the LLM's input embeddings
            seq = self._reduce_image(seq, want, budgets, key, log)
        return self._llm_prefill(seq, image, budgets, key, log, tail)

    def _reduce_image(self, seq: Seq, counts: Tensor, budgets: Tensor | None, key: Tensor, log: ReducerLog) -> Seq:
        """The reducer on each image's merged tokens (padded to the batch's largest image, `counts` (B,) real);
        the image tokens it does not keep leave the sequence, the rest keep their place and M-RoPE positions."""
        r = self.reducer
        t0 = self._clock()
        vidx, vvalid = pack_true(seq.visual)  # (B, N) each image's tokens in order
        fields = provide(r.needs, FEATURE_PROVIDERS, seq)
        red = r(Tokens(x=gather_tokens(seq.x, vidx), grid=(1, vidx.size(1)),
                       valid=None if bool(vvalid.all()) else vvalid, budget=budgets, sample_key=key,
                       **tokens_fields(fields)))
        log.add(red, self._clock() - t0)
        if red.keep is None:
            return seq
        if bool((red.keep < 0).any()):
            raise NotImplementedError(f"{r.name} merges tokens; merged tokens are not placed on "
                                      f"{self.provides.family} yet")
        kvalid = (red.valid if red.valid is not None else torch.ones_like(red.keep, dtype=torch.bool))
        kvalid = kvalid & vvalid.gather(1, red.keep)
        limit = counts.clamp(max=r.budget if budgets is None else budgets.clamp(min=1)) if r.uses_budget else counts
        if bool((kvalid.sum(1) > limit).any()):
            raise ValueError(f"{r.name} returned more tokens than its budget ({limit.tolist()})")
        return seq.keep_visual(vidx.gather(1, red.keep), kvalid, red.x)  # a reducer may update the tokens it keeps

    def _rotary(self, x: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.model.language_model.rotary_emb(x, pos.permute(2, 0, 1))  # M-RoPE: (3, B, T)


def fraction_counts(fraction: float, tokens: Tensor) -> Tensor:
    """(B,) tokens kept of images of `tokens` (B,) visual tokens at a fraction budget (`Budget.tokens`: floor(f x
    tokens), at least 1)."""
    share = Budget.fraction(fraction)
    return torch.tensor([share.tokens(n) for n in tokens.tolist()], device=tokens.device)


def check_reducer(r: TokenReducer, lay: QwenLayout, image_tokens: int = 1, provides: Provides | None = None) -> None:
    """Raise (saying why, in one line) unless reducer `r` runs on Qwen2.5-VL or Qwen3-VL (what both provide is the
    same) of layout `lay` with images of `image_tokens` visual tokens (1: any size, the budgets are checked per
    batch): the signals' check (`methods.signals.check`, against `provides`, default Qwen2.5-VL's), then what is this
    family's own."""
    signals.check(r, provides or ReducedQwen.provides, lay.llm_layers, image_tokens)
    if r.site is Site.LLM and r.positions == "renumber":
        raise ValueError(f"{r.name}.positions=renumber renumbers 1-D positions as its reference code does on "
                         f"LLaVA; {(provides or ReducedQwen.provides).family}'s M-RoPE positions have no such "
                         "numbering: leave it unset (original "
                         f"positions on this family) or pass {r.name}.positions=original")
    r.check_model(None, lay.feature_width)  # a learned controller must be one for images of any size


class ReducedQwen3(ReducedQwen):
    """A Qwen3-VL model (`Qwen3VLForConditionalGeneration`) and one reducer, run as `ReducedQwen` runs Qwen2.5-VL.

    What differs is the model's own and comes from its modules: a vision tower without window attention, 16 px patches
    (32 px per LLM token), per-head q/k norms in the decoder (`LLMSide._query_attention` applies them), interleaved
    M-RoPE (the model's `rotary_emb`), and DeepStack: the vision tower's outputs after blocks
    `deepstack_visual_indexes` (8, 16, 24 on the 8B), each through its own merger, are added to the visual tokens after
    decoder layers 0, 1 and 2. Pruning keeps them consistent by construction: each visual token carries its image
    token's index (`Seq.src`) through every reduction, before the LLM or inside it, and each level is added by that
    index (`_llm.add_deepstack`), so the kept tokens get exactly their own rows of every level and a reduction before
    layer 3 leaves the later levels' other rows unused.
    """

    provides: ClassVar[Provides] = replace(
        ReducedQwen.provides, family="Qwen3-VL",
        extra_vision_tokens="appends tokens to the vision encoder's input, which would have to join its resampled "
                            "position embeddings and per-image attention (not ported)")
