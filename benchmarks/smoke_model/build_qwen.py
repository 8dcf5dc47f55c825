"""Build small Hugging Face Qwen2.5-VL-format models and their processor, locally from configs (no Hub access).

The processor is a `Qwen2_5_VLProcessor`: Qwen's image processor (dynamic resolution: each side rounded to a
multiple of patch x merge pixels, the area kept within its pixel limits), a word-level tokenizer with Qwen's
special tokens, and Qwen2.5-VL-Instruct's chat template::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    <|vision_start|><|image_pad|><|vision_end|>T<|im_end|>\\n<|im_start|>assistant\\n

(the processor expands ``<|image_pad|>`` into the image's t h w / merge^2 tokens). At the defaults a 96 px synthetic
image is 24 x 24 patches of 4 px, merged 2 x 2 into 144 visual tokens, as many as the LLaVA smoke model's. Tests
build random ones (`build_qwen_model`, `build_qwen_processor`); `save_qwen` writes a checkpoint folder that
`run_bench.py --model` and the lmms-eval model class load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from benchmarks.smoke_model.build import vocabulary

QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>")  # ids 0..6: padding, turns, the image span
QWEN_WORDS = ("you", "helpful")  # of the system prompt, besides the LLaVA vocabulary's words
QWEN_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2.5-VL normalises with CLIP's statistics
QWEN_STD = (0.26862954, 0.26130258, 0.27577711)
# Qwen2.5-VL-Instruct's template for single-image turns (string content too: lmms-eval's simple path sends strings)
QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def qwen_vocabulary() -> list[str]:
    """The tokenizer's vocabulary in id order: Qwen's special tokens, then the LLaVA smoke vocabulary's words (its
    own special tokens left out) and the system prompt's."""
    words = [w for w in vocabulary() if not w.startswith("<")]
    return [*QWEN_SPECIAL, *words, *(w for w in QWEN_WORDS if w not in words)]


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer with Qwen's special tokens: lowercase, split on whitespace and punctuation, no BOS (as
    Qwen's), left padding with ``<|endoftext|>``, ``<|im_end|>`` ends a turn."""
    vocab = {tok: i for i, tok in enumerate(qwen_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    extra = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", padding_side="left", model_max_length=1024,
                                   extra_special_tokens=extra)


def build_qwen_processor(patch_size: int = 4, merge: int = 2, min_pixels: int = 32 * 32,
                         max_pixels: int = 128 * 128) -> Qwen2_5_VLProcessor:
    """Qwen2.5-VL processor for `patch_size` px patches merged `merge` x `merge`; images are resized so that each
    side is a multiple of patch_size x merge and the area lies in [min_pixels, max_pixels]."""
    kwargs = {"patch_size": patch_size, "merge_size": merge, "temporal_patch_size": 2, "image_mean": list(QWEN_MEAN),
              "image_std": list(QWEN_STD), "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}}
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**kwargs), tokenizer=build_qwen_tokenizer(),
                               video_processor=Qwen2VLVideoProcessor(**kwargs), chat_template=QWEN_TEMPLATE)


def build_qwen_model(*, patch_size: int = 4, merge: int = 2, window_tokens: int = 4, vision_hidden: int = 64,
                     vision_depth: int = 2, full_blocks: tuple[int, ...] = (1,), vision_heads: int = 4,
                     text_hidden: int = 128, text_layers: int = 3, text_heads: int = 4, kv_heads: int = 2,
                     seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """Randomly initialised Qwen2.5-VL-format model (windowed ViT with full-attention blocks `full_blocks`, 2 x 2
    patch merger, Qwen2 decoder with grouped-query attention and M-RoPE) for `build_qwen_processor`'s tokenizer.

    Args:
        window_tokens: side of a vision attention window in merged tokens (Qwen2.5-VL: 112 px / 28 px = 4).
    """
    ids = {t: i for i, t in enumerate(qwen_vocabulary())}
    head_dim = text_hidden // text_heads
    side = head_dim * 3 // 16  # M-RoPE's rows and columns; Qwen2.5-VL: 16 / 24 / 24 of 64 frequencies (t, h, w)
    section = [head_dim // 2 - 2 * side, side, side]
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(ids), "hidden_size": text_hidden, "intermediate_size": 2 * text_hidden,
                     "num_hidden_layers": text_layers, "num_attention_heads": text_heads,
                     "num_key_value_heads": kv_heads, "max_position_embeddings": 2048,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
                     "bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]},
        vision_config={"depth": vision_depth, "hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden,
                       "num_heads": vision_heads, "out_hidden_size": text_hidden, "patch_size": patch_size,
                       "spatial_merge_size": merge, "temporal_patch_size": 2,
                       "window_size": window_tokens * merge * patch_size, "fullatt_block_indexes": list(full_blocks)},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)
    return _random_model(Qwen2_5_VLForConditionalGeneration, config, ids, seed)


def build_qwen3_processor(patch_size: int = 4, merge: int = 2, min_pixels: int = 32 * 32,
                          max_pixels: int = 128 * 128) -> Qwen3VLProcessor:
    """Qwen3-VL processor (`build_qwen_processor`'s image processor, tokenizer and template in Qwen3-VL's processor,
    which also returns `mm_token_type_ids`)."""
    kwargs = {"patch_size": patch_size, "merge_size": merge, "temporal_patch_size": 2, "image_mean": [0.5] * 3,
              "image_std": [0.5] * 3, "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}}
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**kwargs), tokenizer=build_qwen_tokenizer(),
                            video_processor=Qwen3VLVideoProcessor(**kwargs), chat_template=QWEN_TEMPLATE)


def build_qwen3_model(*, patch_size: int = 4, merge: int = 2, vision_hidden: int = 32, vision_depth: int = 4,
                      deepstack: tuple[int, ...] = (1, 2, 3), vision_heads: int = 4, text_hidden: int = 64,
                      text_layers: int = 4, text_heads: int = 4, kv_heads: int = 2,
                      seed: int = 0) -> Qwen3VLForConditionalGeneration:
    """Randomly initialised Qwen3-VL-format model (ViT with DeepStack taps `deepstack`, 2 x 2 patch merger, Qwen3
    decoder with per-head q/k norms and interleaved M-RoPE) for `build_qwen3_processor`'s tokenizer."""
    ids = {t: i for i, t in enumerate(qwen_vocabulary())}
    head_dim = text_hidden // text_heads
    side = head_dim * 5 // 32  # interleaved M-RoPE: Qwen3-VL's 24 / 20 / 20 of 64 frequencies (t, h, w)
    section = [head_dim // 2 - 2 * side, side, side]
    config = Qwen3VLConfig(
        text_config={"vocab_size": len(ids), "hidden_size": text_hidden, "intermediate_size": 2 * text_hidden,
                     "num_hidden_layers": text_layers, "num_attention_heads": text_heads, "head_dim": head_dim,
                     "num_key_value_heads": kv_heads, "max_position_embeddings": 2048,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section,
                                         "mrope_interleaved": True},
                     "bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]},
        vision_config={"depth": vision_depth, "hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden,
                       "num_heads": vision_heads, "out_hidden_size": text_hidden, "patch_size": patch_size,
                       "spatial_merge_size": merge, "temporal_patch_size": 2, "num_position_embeddings": 64,
                       "deepstack_visual_indexes": list(deepstack)},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    return _random_model(Qwen3VLForConditionalGeneration, config, ids, seed)


def _random_model(model_class, config, ids: dict[str, int], seed: int):
    """`model_class` from `config` with random weights (seeded), greedy generation ending at `<|im_end|>`, in eval
    mode."""
    torch.manual_seed(seed)
    model = model_class._from_config(config, dtype=torch.float32)
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = ids["<|im_end|>"], ids["<|endoftext|>"], None
    gen.do_sample, gen.max_new_tokens = False, 4
    return model.eval()


def save_qwen(model: Qwen2_5_VLForConditionalGeneration, processor: Qwen2_5_VLProcessor, out: Path) -> Path:
    """Write a checkpoint folder (weights, config, processor, tokenizer, chat template) and return it."""
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
