"""Build the small Hugging Face LLaVA-1.5-format model used as the project's smoke model.

Everything is made locally from configs (no Hub access): a word-level tokenizer, a 96 px CLIP image processor,
a `LlavaProcessor` with llava-1.5-hf's chat template, and a randomly initialised `LlavaForConditionalGeneration`
(CLIP vision tower + MLP projector + Llama decoder). `train.py` trains it; tests build tiny random ones with
`build_model(...)` / `build_processor()`.

Prompt format (identical to llava-1.5-hf)::

    apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": T}]}],
                        add_generation_prompt=True)  ->  "USER: <image>\\nT ASSISTANT:"

The processor then expands ``<image>`` into (image_size / patch_size)^2 = 144 image tokens.
"""

from __future__ import annotations

import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from benchmarks.tasks.synthetic import scenes
from benchmarks.tasks.synthetic.generate import ANSWERS, COLOR_NAMES, PLURALS, SHAPES

SPECIAL_TOKENS = ("<unk>", "<pad>", "<s>", "</s>", "<image>")  # ids 0..4, in this order
IMAGE_TOKEN = "<image>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# llava-1.5-hf's template, plus plain-string content (lmms-eval's simple llava path sends strings).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Every word of both synthetic tasks' phrasings (synth_vqa, synth_scenes), the post-prompt and the chat template
# (lower-cased), digits, punctuation.
_WORDS = (
    "user assistant system what color colour is the shape object how many objects are there a an on left or right "
    "of in answer question using single word phrase yes no above below background".split()
)
_PUNCT = list(":.?,!'\"-()")


def vocabulary() -> list[str]:
    """The tokenizer's vocabulary in id order: special tokens first, then a fixed, sorted word list."""
    words = {*_WORDS, *COLOR_NAMES, *SHAPES, *PLURALS.values(), *ANSWERS, *scenes.ANSWERS, *(str(d) for d in range(10))}
    return [*SPECIAL_TOKENS, *sorted(words), *_PUNCT]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: lowercase, split on whitespace and punctuation, prepend ``<s>``, left padding."""
    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=512,
    )


def build_processor(image_size: int = 96, patch_size: int = 8) -> LlavaProcessor:
    """LLaVA-1.5-style processor: CLIP image processor at `image_size`, word-level tokenizer, chat template.

    Args:
        image_size: Side of the square model input (shortest-edge resize, then centre crop).
        patch_size: Vision patch size; sets the number of ``<image>`` tokens, (image_size / patch_size)^2.

    Returns:
        The processor.
    """
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_resize=True,
        do_center_crop=True,
        do_normalize=True,
        do_convert_rgb=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(
    *,
    vocab_size: int | None = None,
    image_size: int = 96,
    patch_size: int = 8,
    vision_hidden: int = 96,
    vision_layers: int = 3,
    vision_heads: int = 4,
    vision_mlp_ratio: int = 4,
    text_hidden: int = 128,
    text_layers: int = 3,
    text_heads: int = 4,
    text_mlp_ratio: int = 2,
    seed: int = 0,
    attn_implementation: str | dict | None = None,
) -> LlavaForConditionalGeneration:
    """Randomly initialised LLaVA-1.5-format model (CLIP tower, GELU MLP projector, Llama decoder).

    Args:
        vocab_size: Text vocabulary size; defaults to this module's tokenizer (``len(vocabulary())``).
        image_size: Input side in pixels.
        patch_size: Vision patch size; image tokens = (image_size / patch_size)^2.
        vision_hidden: CLIP width.
        vision_layers: CLIP depth. LLaVA feeds layer -2, so use >= 2.
        vision_heads: CLIP attention heads.
        vision_mlp_ratio: CLIP MLP width as a multiple of `vision_hidden`.
        text_hidden: Llama width.
        text_layers: Llama depth.
        text_heads: Llama attention heads.
        text_mlp_ratio: Llama (SwiGLU) MLP width as a multiple of `text_hidden`.
        seed: torch seed for the initialisation.
        attn_implementation: Passed to the model constructor (e.g. ``"eager"``); None keeps the default (sdpa).

    Returns:
        The model in eval mode, float32, on CPU.
    """
    if vision_layers < 2:
        raise ValueError(f"vision_layers must be >= 2 (LLaVA uses the penultimate layer), got {vision_layers}")
    vocab = vocabulary()
    ids = {t: i for i, t in enumerate(vocab)}
    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_hidden,
        intermediate_size=vision_mlp_ratio * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        projection_dim=vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=vocab_size or len(vocab),
        hidden_size=text_hidden,
        intermediate_size=text_mlp_ratio * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        max_position_embeddings=512,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids[IMAGE_TOKEN],
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch_size) ** 2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = LlavaForConditionalGeneration._from_config(config, **kwargs)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = ids["<s>"], ids["</s>"], ids["<pad>"]
    gen.do_sample, gen.max_new_tokens = False, 4
    return model.eval()


def chat_prompt(processor: LlavaProcessor, text: str) -> str:
    """The evaluation prompt for one image + `text`: ``"USER: <image>\\n{text} ASSISTANT:"``."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)
