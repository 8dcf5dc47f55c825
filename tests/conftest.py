"""Shared fixtures: tiny random-weight LLaVA and Qwen2.5-VL models built from config (no downloads), CPU, seeded."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face library is imported
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

from benchmarks.smoke_model.build import build_model, build_processor
from benchmarks.smoke_model.build_qwen import (
    build_qwen3_model,
    build_qwen3_processor,
    build_qwen_model,
    build_qwen_processor,
    save_qwen,
)
from flops.shapes import load_config
from methods.trace import QwenLayout

SLOW_PROGRAMS = ("python", "accelerate", "lmms-eval", "lmms_eval", "torchrun", "ruff")  # what a quick test never starts


@pytest.fixture(autouse=True)
def _subprocesses_are_slow(request, monkeypatch):
    """A test that starts a program of ours in a subprocess (a Python interpreter, `accelerate launch`, lmms-eval,
    ruff) is marked `slow`, so that `pytest -m "not slow"` is the contributor's quick loop: an unmarked one fails
    here, saying so (system helpers such as git and uname, which libraries call, are not flagged)."""
    if request.node.get_closest_marker("slow"):
        return
    real = subprocess.Popen.__init__

    def init(self, args, *rest, **kwargs):
        program = args if isinstance(args, str | os.PathLike) else args[0]
        if Path(str(program).split()[0]).name.startswith(SLOW_PROGRAMS):
            raise AssertionError(f"{request.node.nodeid} starts a subprocess ({program}): mark it @pytest.mark.slow")
        real(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", init)

IMAGE_TOKEN = 5  # id of the image placeholder in the tiny vocabulary


def tiny_llava(image_size: int = 32, patch: int = 8, vision_layers: int = 3, llm_layers: int = 3, seed: int = 0,
               kv_heads: int = 4, attn: str = "sdpa"):
    """A random LlavaForConditionalGeneration: CLIP-style tower (hidden 32), LLaMA-style LLM (hidden 64, GQA)."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                              num_attention_heads=4, image_size=image_size, patch_size=patch)
    text = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=llm_layers,
                       num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    config._attn_implementation = attn
    model = LlavaForConditionalGeneration(config).eval()
    for p in model.parameters():  # larger random weights so greedy outputs vary with the input
        p.data.normal_(0, 0.2)
    return model


def tiny_batch(model, batch: int, seed: int = 0):
    """Left-padded prompts of different lengths, each with one run of image tokens, and random pixels."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    prompts = []
    for i in range(batch):
        before = torch.randint(6, 96, (1 + (i * 3) % 5,), generator=g).tolist()
        after = torch.randint(6, 96, (2 + (i * 2) % 4,), generator=g).tolist()
        prompts.append([1] + before + [IMAGE_TOKEN] * n + after)
    width = max(map(len, prompts))
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    pixels = torch.randn(batch, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=g)
    return ids, mask, pixels


QWEN_IMAGE, QWEN_START, QWEN_END = 60, 61, 62  # image placeholder, vision start and end ids in the tiny vocabulary


def tiny_qwen(seed: int = 0, attn: str = "sdpa", llm_layers: int = 2) -> Qwen2_5_VLForConditionalGeneration:
    """A random Qwen2.5-VL: 2 vision blocks (one windowed, one full), 2 x 2 merger, a 2-layer GQA LLM with M-RoPE."""
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": 64, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": llm_layers,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 64,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                       "fullatt_block_indexes": [1]},
        image_token_id=QWEN_IMAGE, video_token_id=63, vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END,
        eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    config._attn_implementation = attn
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    for p in model.parameters():  # larger random weights so greedy outputs vary with the input
        p.data.normal_(0, 0.2)
    return model


def tiny_qwen3(seed: int = 0, llm_layers: int = 3, deepstack: tuple[int, ...] = (1, 2, 3), head_dim: int = 16):
    """Qwen3-VL-8B's real config (token ids, vision patch 16 and merge 2, 2304 learned positions, GELU vision MLP,
    interleaved M-RoPE, untied head) with small widths, 4 vision blocks whose last three are the DeepStack taps (the
    8B's are 8, 16 and 24 of 27) and `llm_layers` decoder layers; random weights large enough that greedy outputs
    vary with the input."""
    config = load_config("qwen3-vl-8b")
    vc, tc = config.vision_config, config.text_config
    vc.depth, vc.hidden_size, vc.intermediate_size, vc.num_heads, vc.out_hidden_size = 4, 32, 64, 4, 64
    vc.deepstack_visual_indexes = list(deepstack)
    tc.num_hidden_layers, tc.hidden_size, tc.intermediate_size = llm_layers, 64, 128
    tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim = 4, 2, head_dim
    half = head_dim // 2  # rotary frequencies per head: the 8B's 24 / 20 / 20 of 64, scaled
    tc.rope_parameters = {**tc.rope_parameters, "mrope_section": [half - 2 * (half // 4), half // 4, half // 4]}
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.float32).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model


def qwen_prompts(model, grids: list[tuple[int, int, int]], seed: int = 0):
    """Left-padded prompts `text <start> image... <end> text` (lengths differ), their patches and grids."""
    g = torch.Generator().manual_seed(seed)
    cfg, lay = model.config, QwenLayout.from_config(model.config)
    rows = []
    for i, (t, h, w) in enumerate(grids):
        before = torch.randint(3, 59, (2 + i,), generator=g).tolist()
        after = torch.randint(3, 59, (4 + 3 * i,), generator=g).tolist()
        image = [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // lay.merge ** 2)
        rows.append(before + image + [cfg.vision_end_token_id] + after)
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    grid = torch.tensor(grids)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * lay.patch_size ** 2, generator=g)
    return ids, mask, pixels, grid


def spliced_embeds(model, ids, pixels):
    """The LLM input embeddings (T, D) of prompt 0 of `ids` with its image tokens replaced by the image's features, as
    LLaVA splices them, and its (T,) image-token mask: where the tests' restatements of the references start."""
    lm = model.model.language_model
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
        img = ids[0] == model.config.image_token_id
        h = lm.embed_tokens(ids[0].masked_fill(img, 0))
        h[img] = feats
    return h, img


def tokens_seen(reducer) -> list:
    """The `Tokens` each call of `reducer` receives from now on, in order (its instance's forward is wrapped; the
    class is untouched)."""
    seen, forward = [], reducer.forward

    def spy(t):
        seen.append(t)
        return forward(t)

    reducer.forward = spy
    return seen


def eager_image_row(model, ids, mask, pixels, layer: int):
    """(B, N) head-averaged attention of the last prompt token over the image tokens at LLM layer `layer`, from HF's
    own eager attention maps: what the adapter's LLM-site rows are checked against."""
    with torch.no_grad():
        att = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_attentions=True).attentions[layer]
    row = att[:, :, -1].mean(1)  # (B, T): the last query, heads averaged
    return torch.stack([row[i][ids[i] == IMAGE_TOKEN] for i in range(ids.size(0))])


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_llava()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny random llava-hf checkpoint folder (smoke-model tokenizer and processor), one per test module."""
    path = tmp_path_factory.mktemp("tiny_llava")
    build_model(vision_hidden=32, vision_layers=2, text_hidden=32, text_layers=2, seed=1).save_pretrained(path)
    build_processor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory):
    """A tiny random Qwen2.5-VL checkpoint folder (Qwen processor, tokenizer and chat template; 4 px patches merged
    2 x 2, so a 96 px image is 144 visual tokens), one per test module."""
    path = tmp_path_factory.mktemp("tiny_qwen")
    return save_qwen(build_qwen_model(vision_hidden=32, text_hidden=64, text_layers=3, seed=1),
                     build_qwen_processor(), path)


@pytest.fixture(scope="module")
def qwen3_ckpt(tmp_path_factory):
    """A tiny random Qwen3-VL checkpoint folder (Qwen3-VL processor, the Qwen tokenizer and chat template; 4 px
    patches merged 2 x 2, so a 96 px image is 144 visual tokens; 4 vision blocks, 3 DeepStack taps; 3 LLM layers)."""
    path = tmp_path_factory.mktemp("tiny_qwen3")
    return save_qwen(build_qwen3_model(text_layers=3, seed=1), build_qwen3_processor(), path)


def hf_answers(family, ckpt, n: int) -> list[str]:
    """Hugging Face's own greedy answers (4 tokens) to the synthetic task's first `n` test questions, through the
    checkpoint folder's processor and chat template: what a run's `full` predictions must equal."""
    from benchmarks.tasks.synthetic.generate import SPLIT_SEEDS, generate_sample  # noqa: PLC0415
    from benchmarks.tasks.synthetic.tasks.utils import doc_to_text  # noqa: PLC0415

    model, processor = family.load(ckpt, device="cpu", dtype="float32")
    docs = [generate_sample(SPLIT_SEEDS["test"], i) for i in range(n)]
    texts = [family.prompt(processor, doc_to_text({"question": d.question})) for d in docs]
    inputs = processor(images=[Image.fromarray(d.image) for d in docs], text=texts, padding=True,
                       return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].size(1):]
    return [processor.tokenizer.decode(h, skip_special_tokens=True).strip() for h in out]


def llava_runner(model, reducer):
    """`ReducedLlava(model, reducer)` that hands a reducer needing each question's relevant patches (`oracle`) a
    fixed mask, every fifth patch, when the call gives none (registry-wide tests call every method the same way)."""
    from methods.llava import ReducedLlava  # noqa: PLC0415

    class WithRelevant(ReducedLlava):
        def prefill(self, input_ids, attention_mask, pixel_values, budgets=None, tail=1, relevant=None):
            if relevant is None and "relevant" in self.reducer.needs:
                n = self.layout.num_patches
                relevant = (torch.arange(n) % 5 == 0).expand(input_ids.size(0), n)
            return super().prefill(input_ids, attention_mask, pixel_values, budgets=budgets, tail=tail,
                                   relevant=relevant)

    return WithRelevant(model, reducer)


def interrupted_on_call(monkeypatch, owner, name: str, call: int):
    """Patch `owner.name` so that its `call`-th call raises KeyboardInterrupt (the earlier ones run as usual); return
    the real function, to patch back."""
    real, calls = getattr(owner, name), []

    def stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, stop)
    return real
