"""Token traces from shapes alone: what a method does to the token counts of a model, without the model's weights.

`shape_record` builds the same record `methods.trace.TokenTrace.sample` writes for a real run, for one sample with
`text_tokens` prompt tokens besides the image, so `flops.analytic.count` can price any method at any budget on any
LLaVA config (LLaVA-1.5-7B/13B included) in milliseconds. The reducer itself runs once on random tokens of the
right shapes (a few small matmuls, no model) so that its own MACs come from the same code as in real runs; the
signals the adapter would compute for it use the adapter's own formulas.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlavaConfig

from methods import create_reducer, get_reducer_class
from methods.adaptive import ControllerConfig
from methods.base import Site, TextTokens, TokenReducer, Tokens
from methods.cli import first_line
from methods.trace import LlavaLayout, cls_signal_macs, feature_row_macs, next_query_macs, query_row_macs

ROW_SIGNALS = frozenset({"query_attn", "query_attn_next", "key_norms"})  # (B, N) rows at the LLM site

CONFIGS = Path(__file__).parent / "configs"  # named shapes: llava-1.5-7b, llava-1.5-13b, qwen2.5-vl-7b


def load_config(name_or_path: str | Path):
    """A `LlavaConfig` from a named shape (``llava-1.5-7b``, ``llava-1.5-13b``), a config.json, or a checkpoint folder.

    Raises:
        FileNotFoundError: neither a known name nor an existing path.
        ValueError: the file is not a LLaVA config.
    """
    path = Path(name_or_path)
    if (CONFIGS / f"{name_or_path}.json").is_file():
        path = CONFIGS / f"{name_or_path}.json"
    elif path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.json")))
        raise FileNotFoundError(f"{name_or_path}: no such config; give one of {known}, a config.json or a llava-hf "
                                "checkpoint folder")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if isinstance(raw, dict) and raw.get("model_type") == "qwen2_5_vl":
        raise ValueError(f"{path}: Qwen2.5-VL is not priced by the FLOPs counter yet (LLaVA configs only; issue 18)")
    if not isinstance(raw, dict) or raw.get("model_type") != "llava":
        got = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{path} is not a LLaVA config (needs model_type 'llava'; got {got!r})")
    missing = [k for k in ("vision_config", "text_config") if not isinstance(raw.get(k), dict)]
    if missing:
        raise ValueError(f"{path}: a LLaVA config needs {' and '.join(missing)} (a JSON object each)")
    try:
        config = LlavaConfig.from_dict({k: v for k, v in raw.items() if not k.startswith("_")})
    except Exception as e:  # noqa: BLE001 - transformers validates field types with its own error classes
        raise ValueError(f"{path} is not a valid LLaVA config ({type(e).__name__}: {first_line(e)})") from None
    check_shapes(config, path)
    return config


SIZES = {"vision_config": ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads"),
         "text_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "num_key_value_heads", "vocab_size")}


def check_shapes(config, path: Path | str = "config") -> None:
    """Raise ValueError naming the field unless every size the counter uses is a positive whole number, the patch
    size divides the image size, and the heads divide the widths."""
    for part, fields in SIZES.items():
        sub = getattr(config, part)
        for name in fields:
            value = getattr(sub, name, None)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{path}: {part}.{name} must be a whole number >= 1, got {value!r}")
    vc, tc = config.vision_config, config.text_config
    if vc.image_size % vc.patch_size:
        raise ValueError(f"{path}: vision_config.patch_size {vc.patch_size} does not divide image_size {vc.image_size}")
    for part, sub in (("vision_config", vc), ("text_config", tc)):
        if sub.hidden_size % sub.num_attention_heads:
            raise ValueError(f"{path}: {part}.num_attention_heads {sub.num_attention_heads} does not divide "
                             f"hidden_size {sub.hidden_size}")


def stand_in_reducer(method: str, budget: int | str | None, config, **kwargs) -> TokenReducer:
    """The method at `budget` (ignored by methods without one), in eval mode. A learned method given no `checkpoint`
    gets an untrained controller of the default shape for `config`: its MACs and time do not depend on its weights."""
    cls = get_reducer_class(method)
    if cls.needs_checkpoint and "checkpoint" not in kwargs:
        lay = LlavaLayout.from_config(config)
        kwargs.setdefault("config", ControllerConfig(method=method, dim=lay.feature_width, num_patches=lay.num_patches))
    return create_reducer(method, budget if cls.uses_budget else None, **kwargs).eval()


@torch.no_grad()
def shape_record(config, reducer: TokenReducer, text_tokens: int, generated_tokens: int = 1, seed: int = 0,
                 text_after: int | None = None) -> dict:
    """The token-trace record of one sample: `text_tokens` prompt tokens plus the image, reduced by `reducer`.

    Args:
        config: a `LlavaConfig`.
        reducer: the method; a data-dependent count (PruMerge's ``auto``) has no shape-only answer.
        text_tokens: prompt tokens other than the image's.
        generated_tokens: answer length, end-of-sequence included.
        seed: seed of the random stand-in tokens (only a data-dependent reducer would notice).
        text_after: how many of the `text_tokens` follow the image (DART's text pivots and SparseVLM's raters are
            among them); default half of them.

    Returns:
        A record for `flops.analytic.count`.
    """
    if getattr(reducer, "auto", False):
        raise ValueError(f"{reducer.name}: an 'auto' budget depends on the image; give a number of visual tokens")
    lay = LlavaLayout.from_config(config)
    vc, tc = config.vision_config, config.text_config
    n, dv = lay.num_patches, lay.feature_width
    g = torch.Generator().manual_seed(seed)
    extra = reducer.extra_vision_tokens(1, n, None)
    e = 0 if extra is None else extra.size(1)
    vision = [1 + n + e] * lay.vision_layers_run
    visual = n
    own = 0
    if reducer.site is Site.VISION:
        red = reducer(Tokens(x=torch.randn(1, n, vc.hidden_size, generator=g), grid=lay.grid,
                             sample_key=torch.zeros(1, dtype=torch.long)))
        visual = red.x.size(1)
        vision = [1 + n] * reducer.layer + [1 + visual] * (lay.vision_layers_run - reducer.layer)
        own += 0 if red.macs is None else int(red.macs[0])
    elif reducer.site is Site.FEATURES:
        attn = torch.rand(1, n, generator=g).softmax(-1)
        sig = {}
        if {"cls_attn", "keys"} & reducer.needs:
            sig = {"cls_attn": attn, "keys": torch.randn(1, n, vc.hidden_size, generator=g)}
            own += cls_signal_macs(1 + n, vc.hidden_size)
        if "feature_attn" in reducer.needs:
            sig["feature_attn"] = attn
            own += feature_row_macs(1 + n + e, vc.hidden_size)
        if "feature_keys" in reducer.needs:
            sig["feature_keys"] = torch.randn(1, n, vc.hidden_size // vc.num_attention_heads, generator=g)
        if "feature_cls" in reducer.needs:
            sig["feature_cls"] = torch.randn(1, dv, generator=g)
        extra_out = None if extra is None else torch.randn(1, e, vc.hidden_size, generator=g)
        red = reducer(Tokens(x=torch.randn(1, n, dv, generator=g), grid=lay.grid, extra=extra_out,
                             sample_key=torch.zeros(1, dtype=torch.long), **sig))
        visual = red.x.size(1) if red.valid is None else int(red.valid.sum())
        own += 0 if red.macs is None else int(red.macs[0])
    projector = visual
    if reducer.site is Site.EMBEDDINGS:
        red = reducer(Tokens(x=torch.randn(1, n, tc.hidden_size, generator=g), grid=lay.grid,
                             sample_key=torch.zeros(1, dtype=torch.long)))
        visual = red.x.size(1) if red.valid is None else int(red.valid.sum())
        own += 0 if red.macs is None else int(red.macs[0])
    seq = text_tokens + visual
    llm = [seq] * lay.llm_layers
    if reducer.site is Site.LLM:
        heads = tc.num_attention_heads
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
        kv_width = getattr(tc, "num_key_value_heads", None) or heads
        kept = visual
        for stage, layer in enumerate(reducer.llm_layers(lay.llm_layers, n)):
            sig = {name: torch.rand(1, kept, generator=g) for name in sorted(reducer.needs & ROW_SIGNALS)}
            if "normed" in reducer.needs:
                sig["normed"] = torch.randn(1, kept, tc.hidden_size, generator=g)
            m = max(1, text_tokens // 2) if text_after is None else text_after  # the text tokens after the image
            text = {}
            if "text" in reducer.needs:
                text.update(normed=torch.randn(1, m, tc.hidden_size, generator=g),
                            key_norms=torch.rand(1, m, generator=g))
            if "text_attn" in reducer.needs:
                text["attn"] = torch.rand(1, m, kept, generator=g)
            if "embeds" in reducer.needs:
                text["embeds"] = torch.randn(1, m, tc.hidden_size, generator=g)
                sig["embeds"] = torch.randn(1, n, tc.hidden_size, generator=g)
            if text or "text" in reducer.needs:
                sig["text"] = TextTokens(valid=torch.ones(1, m, dtype=torch.bool), **text)
            red = reducer(Tokens(x=torch.randn(1, kept, tc.hidden_size, generator=g), grid=lay.grid,
                                 sample_key=torch.zeros(1, dtype=torch.long), stage=stage, depth=lay.llm_layers,
                                 **sig))
            seq = llm[layer]
            if "query_attn" in sig:
                own += query_row_macs(seq, tc.hidden_size, heads * head_dim)
            if "text_attn" in reducer.needs:
                own += m * query_row_macs(seq, tc.hidden_size, heads * head_dim)
            if "query_attn_next" in sig:
                own += next_query_macs(seq, tc.hidden_size, heads * head_dim, kv_width * head_dim)
            own += 0 if red.macs is None else int(red.macs[0])
            kept = red.x.size(1)
            llm[layer:] = [text_tokens + kept] * (lay.llm_layers - layer)
    return {
        "vision_tokens_per_layer": vision,
        "projector_tokens": projector,
        "llm_tokens_per_layer": llm,
        "reducer_macs": own,
        "generated_tokens": generated_tokens,
    }
