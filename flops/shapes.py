"""Token traces from shapes alone: what a method does to the token counts of a model, without the model's weights.

`shape_record` builds the same record `methods.trace.TokenTrace.sample` writes for a real run, for one sample with
`text_tokens` prompt tokens besides the image, so `flops.analytic.count` can price any method at any budget on any
LLaVA or Qwen2.5-VL config (LLaVA-1.5-7B/13B, Qwen2.5-VL-7B included; a Qwen2.5-VL image at a given grid) in
milliseconds. The reducer itself runs once on random tokens of the
right shapes (a few small matmuls, no model) so that its own MACs come from the same code as in real runs; the
signals the adapter would compute for it are the stand-ins and MACs of `methods/signals.py`, the table the adapters
read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlavaConfig, Qwen2_5_VLConfig, Qwen3VLConfig

from methods import create_reducer, get_reducer_class
from methods.base import Site, TokenReducer, Tokens
from methods.cli import first_line
from methods.families import family_of
from methods.signals import Dims, signal_macs, stand_ins
from methods.trace import LlavaLayout, QwenLayout

CONFIGS = Path(__file__).parent / "configs"  # named shapes: llava-1.5-7b, llava-1.5-13b, qwen2.5-vl-7b, qwen3-vl-8b


FAMILIES = {"llava": ("LLaVA", LlavaConfig), "qwen2_5_vl": ("Qwen2.5-VL", Qwen2_5_VLConfig),
            "qwen3_vl": ("Qwen3-VL", Qwen3VLConfig)}  # model_type -> (family, config class)
# the Qwen families (images of any size, a patch grid per image) and their image processors' default pixel limits
# (min, max): Qwen2.5-VL's 56 x 56 to 28 x 28 x 1280 (4 to 1,280 tokens); Qwen3-VL's preprocessor_config.json,
# shortest_edge 65,536 and longest_edge 16,777,216 (64 to 16,384 tokens of 32 x 32 px)
QWEN_PIXELS = {"qwen2_5_vl": (56 * 56, 28 * 28 * 1280), "qwen3_vl": (65536, 16777216)}
QWEN_DEFAULT_SIZE = (448, 448)  # the image a Qwen cost is quoted for when none is given (pixels, width x height)


def load_config(name_or_path: str | Path):
    """A `LlavaConfig`, `Qwen2_5_VLConfig` or `Qwen3VLConfig` from a named shape (``llava-1.5-7b``, ``llava-1.5-13b``,
    ``qwen2.5-vl-7b``, ``qwen3-vl-8b``), a config.json, or a checkpoint folder.

    Raises:
        FileNotFoundError: neither a known name nor an existing path.
        ValueError: the file is not a config of either family, or a size the counter uses is missing or wrong.
    """
    path = Path(name_or_path)
    if (CONFIGS / f"{name_or_path}.json").is_file():
        path = CONFIGS / f"{name_or_path}.json"
    elif path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.json")))
        raise FileNotFoundError(f"{name_or_path}: no such config; give one of {known}, a config.json or a checkpoint "
                                "folder (llava-hf, Qwen2.5-VL or Qwen3-VL)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    if kind not in FAMILIES:
        got = kind if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{path} is not a LLaVA, Qwen2.5-VL or Qwen3-VL config (needs model_type "
                         f"{', '.join(map(repr, FAMILIES))}; got {got!r})")
    family, config_class = FAMILIES[kind]
    missing = [k for k in ("vision_config", "text_config") if not isinstance(raw.get(k), dict)]
    if missing:
        raise ValueError(f"{path}: a {family} config needs {' and '.join(missing)} (a JSON object each)")
    try:
        config = config_class.from_dict({k: v for k, v in raw.items() if not k.startswith("_")})
    except Exception as e:  # noqa: BLE001 - transformers validates field types with its own error classes
        raise ValueError(f"{path} is not a valid {family} config ({type(e).__name__}: {first_line(e)})") from None
    check_shapes(config, path)
    return config


TEXT_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size")
SIZES = {"llava": {"vision_config": ("image_size", "patch_size", "hidden_size", "intermediate_size",
                                     "num_hidden_layers", "num_attention_heads"), "text_config": TEXT_SIZES},
         "qwen2_5_vl": {"vision_config": ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size",
                                          "spatial_merge_size", "temporal_patch_size", "window_size",
                                          "out_hidden_size", "in_channels"), "text_config": TEXT_SIZES},
         "qwen3_vl": {"vision_config": ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size",
                                        "spatial_merge_size", "temporal_patch_size", "out_hidden_size", "in_channels",
                                        "num_position_embeddings"), "text_config": TEXT_SIZES}}
VISION_HEADS = {"llava": "num_attention_heads", "qwen2_5_vl": "num_heads", "qwen3_vl": "num_heads"}


def check_shapes(config, path: Path | str = "config") -> None:
    """Raise ValueError naming the field unless every size the counter uses is a positive whole number, the heads
    divide the widths, and the family's geometry holds (LLaVA: the patch size divides the image size; Qwen2.5-VL:
    the full-attention blocks exist and the merger's output is the LLM's width)."""
    for part, fields in SIZES[config.model_type].items():
        sub = getattr(config, part)
        for name in fields:
            value = getattr(sub, name, None)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{path}: {part}.{name} must be a whole number >= 1, got {value!r}")
    vc, tc = config.vision_config, config.text_config
    heads = VISION_HEADS[config.model_type]
    for part, sub, key in (("vision_config", vc, heads), ("text_config", tc, "num_attention_heads")):
        if sub.hidden_size % getattr(sub, key):
            raise ValueError(f"{path}: {part}.{key} {getattr(sub, key)} does not divide hidden_size {sub.hidden_size}")
    if config.model_type == "llava" and vc.image_size % vc.patch_size:
        raise ValueError(f"{path}: vision_config.patch_size {vc.patch_size} does not divide image_size {vc.image_size}")
    if config.model_type == "qwen2_5_vl":
        blocks = list(vc.fullatt_block_indexes or [])
        if not all(isinstance(b, int) and 0 <= b < vc.depth for b in blocks):
            raise ValueError(f"{path}: vision_config.fullatt_block_indexes {blocks} must be blocks of the "
                             f"{vc.depth}-block encoder")
    if config.model_type == "qwen3_vl":
        taps = list(vc.deepstack_visual_indexes or [])
        if not all(isinstance(b, int) and 0 <= b < vc.depth for b in taps) or len(taps) > tc.num_hidden_layers:
            raise ValueError(f"{path}: vision_config.deepstack_visual_indexes {taps} must be blocks of the "
                             f"{vc.depth}-block encoder, at most one per decoder layer")
    if config.model_type in ("qwen2_5_vl", "qwen3_vl") and vc.out_hidden_size != tc.hidden_size:
        raise ValueError(f"{path}: vision_config.out_hidden_size {vc.out_hidden_size} must equal "
                         f"text_config.hidden_size {tc.hidden_size} (the merger feeds the LLM)")


def stand_in_reducer(method: str, budget: int | str | None, config, **kwargs) -> TokenReducer:
    """The method at `budget` (ignored by methods without one), in eval mode. A learned method given no `checkpoint`
    gets an untrained controller of the default shape for `config`: its MACs and time do not depend on its weights."""
    cls = get_reducer_class(method)
    if cls.needs_checkpoint and "checkpoint" not in kwargs:
        family = family_of(config)
        kwargs.setdefault("config", family.controller_config(family.layout(config), method))
    return create_reducer(method, budget if cls.uses_budget else None, **kwargs).eval()


@dataclass
class _Image:
    """The image side of a shape-only record: counts, the visual tokens handed to the LLM, the reducer's MACs so far
    and what the LLM-site reducer sees of the image's geometry."""

    vision: list[int]
    projector: int
    visual: int  # visual tokens entering the LLM
    num_patches: int  # visual tokens of the image before any reduction
    grid: tuple[int, int]
    macs: int
    image_tokens: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)  # family-specific record fields


def _count(red) -> int:
    return red.x.size(1) if red.valid is None else int(red.valid.sum())


def _reducer_macs(red) -> int:
    return 0 if red.macs is None else int(red.macs[0])


def _budgets(reducer: TokenReducer, tokens: int) -> torch.Tensor | None:
    """(1,) the count a fraction budget keeps of an image of `tokens`, as the adapter passes it; None for a count."""
    return None if reducer.fraction is None else torch.tensor([reducer.token_budget.tokens(tokens)])


def _llava_image(config, reducer: TokenReducer, g: torch.Generator, text_after: int) -> _Image:
    lay = LlavaLayout.from_config(config)
    vc, tc = config.vision_config, config.text_config
    n, dv = lay.num_patches, lay.feature_width
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
        own += _reducer_macs(red)
    elif reducer.site is Site.FEATURES:
        d = Dims(tokens=n, width=vc.hidden_size, seq=1 + n + e, extra=e, feature_width=dv,
                 head_dim=vc.hidden_size // vc.num_attention_heads, text=text_after, text_width=tc.hidden_size)
        sig = stand_ins(reducer.needs, d, g)
        own += signal_macs(reducer.needs, d)
        extra_out = None if extra is None else torch.randn(1, e, vc.hidden_size, generator=g)
        red = reducer(Tokens(x=torch.randn(1, n, dv, generator=g), grid=lay.grid, extra=extra_out,
                             sample_key=torch.zeros(1, dtype=torch.long), **sig))
        visual = _count(red)
        own += _reducer_macs(red)
    projector = visual
    if reducer.site is Site.EMBEDDINGS:
        sig = stand_ins(reducer.needs, Dims(tokens=n, text=text_after, text_width=tc.hidden_size), g)
        red = reducer(Tokens(x=torch.randn(1, n, tc.hidden_size, generator=g), grid=lay.grid,
                             sample_key=torch.zeros(1, dtype=torch.long), **sig))
        visual = _count(red)
        own += _reducer_macs(red)
    return _Image(vision=vision, projector=projector, visual=visual, num_patches=n, grid=lay.grid, macs=own)


def _qwen_image(config, reducer: TokenReducer, image_grid: tuple[int, int, int], g: torch.Generator,
                text_after: int) -> _Image:
    """As `methods.qwen.ReducedQwen` runs it: every patch through every vision block and the merger; a features-
    or embeddings-site reducer on the merged tokens (the LLM's input embeddings), no signals."""
    lay = QwenLayout.from_config(config)
    t, h, w = image_grid
    if min(image_grid) < 1 or h % lay.merge or w % lay.merge:
        raise ValueError(f"image grid {list(image_grid)}: needs t, h, w >= 1 with h and w multiples of the merger's "
                         f"side {lay.merge}")
    patches = t * h * w
    n = patches // lay.merge ** 2
    visual, own = n, 0
    if reducer.site in (Site.FEATURES, Site.EMBEDDINGS):
        sig = stand_ins(reducer.needs, Dims(tokens=n, text=text_after, text_width=lay.width), g)
        red = reducer(Tokens(x=torch.randn(1, n, lay.width, generator=g), grid=(1, n), budget=_budgets(reducer, n),
                             sample_key=torch.zeros(1, dtype=torch.long), **sig))
        visual, own = _count(red), _reducer_macs(red)
    return _Image(vision=[patches] * lay.vision_layers, projector=patches, visual=visual, num_patches=n, grid=(1, n),
                  macs=own, image_tokens=torch.tensor([n]), extra={"image_grid_thw": [t, h, w]})


@torch.no_grad()
def shape_record(config, reducer: TokenReducer, text_tokens: int, generated_tokens: int = 1, seed: int = 0,
                 text_after: int | None = None, image_grid: tuple[int, int, int] | None = None) -> dict:
    """The token-trace record of one sample: `text_tokens` prompt tokens plus the image, reduced by `reducer`.

    Args:
        config: a `LlavaConfig` or a `Qwen2_5_VLConfig`.
        reducer: the method; a data-dependent count (PruMerge's ``auto``) has no shape-only answer.
        text_tokens: prompt tokens other than the image's.
        generated_tokens: answer length, end-of-sequence included.
        seed: seed of the random stand-in tokens (only a data-dependent reducer would notice).
        text_after: how many of the `text_tokens` follow the image (DART's text pivots and SparseVLM's raters are
            among them); default half of them.
        image_grid: Qwen2.5-VL only (required there): the image's patch grid (t, h, w), as the processor's
            `image_grid_thw` gives it (`qwen_grid` from a pixel size).

    Returns:
        A record for `flops.analytic.count`.
    """
    if getattr(reducer, "auto", False):
        raise ValueError(f"{reducer.name}: an 'auto' budget depends on the image; give a number of visual tokens")
    g = torch.Generator().manual_seed(seed)
    m = max(1, text_tokens // 2) if text_after is None else text_after  # the text tokens after the image
    if config.model_type in QWEN_PIXELS:
        if image_grid is None:
            raise ValueError(f"a {FAMILIES[config.model_type][0]} image has no fixed size: give its patch grid "
                             "(t, h, w)")
        image = _qwen_image(config, reducer, tuple(image_grid), g, m)
    else:
        image = _llava_image(config, reducer, g, m)
    tc = config.text_config
    n, layers = image.num_patches, tc.num_hidden_layers
    own = image.macs
    llm = [text_tokens + image.visual] * layers
    if reducer.site is Site.LLM:
        heads = tc.num_attention_heads
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
        kv_width = getattr(tc, "num_key_value_heads", None) or heads
        kept = image.visual
        for stage, layer in enumerate(reducer.llm_layers(layers, n)):
            d = Dims(tokens=kept, width=tc.hidden_size, seq=llm[layer], q_width=heads * head_dim,
                     kv_width=kv_width * head_dim, text=m, image=n)
            red = reducer(Tokens(x=torch.randn(1, kept, tc.hidden_size, generator=g), grid=image.grid,
                                 budget=_budgets(reducer, n), sample_key=torch.zeros(1, dtype=torch.long),
                                 stage=stage, depth=layers, image_tokens=image.image_tokens,
                                 **stand_ins(reducer.needs, d, g)))
            own += signal_macs(reducer.needs, d) + _reducer_macs(red)
            kept = red.x.size(1)
            llm[layer:] = [text_tokens + kept] * (layers - layer)
    return {
        "vision_tokens_per_layer": image.vision,
        "projector_tokens": image.projector,
        "llm_tokens_per_layer": llm,
        "reducer_macs": own,
        "generated_tokens": generated_tokens,
        **image.extra,
    }


def qwen_grid(config, width: int, height: int, min_pixels: int | None = None,
              max_pixels: int | None = None) -> tuple[int, int, int]:
    """The patch grid (t, h, w) a Qwen2.5-VL or Qwen3-VL image processor gives an image of `width` x `height` pixels
    (`smart_resize`: each side rounded to a multiple of patch x merge pixels, 28 for Qwen2.5-VL and 32 for Qwen3-VL,
    the area kept within [min_pixels, max_pixels]; the defaults are the family's processor's own, `QWEN_PIXELS`)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize  # noqa: PLC0415

    low, high = QWEN_PIXELS[config.model_type]
    min_pixels, max_pixels = min_pixels or low, max_pixels or high
    vc = config.vision_config
    factor = vc.patch_size * vc.spatial_merge_size
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return (1, h // vc.patch_size, w // vc.patch_size)


def processor_grid(config, folder: str | Path, width: int, height: int) -> tuple[int, int, int]:
    """`qwen_grid` at the pixel limits of the checkpoint folder's own image processor (its processor_config.json
    or preprocessor_config.json: `size` shortest_edge / longest_edge, or min_pixels / max_pixels), the processor's
    defaults where the folder says nothing."""
    limits = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        f = Path(folder) / name
        if f.is_file():
            raw = json.loads(f.read_text())
            raw = raw.get("image_processor", raw) if isinstance(raw, dict) else {}
            size = raw.get("size") or {}
            low = size.get("shortest_edge", raw.get("min_pixels"))
            high = size.get("longest_edge", raw.get("max_pixels"))
            limits = {k: v for k, v in (("min_pixels", low), ("max_pixels", high)) if isinstance(v, int)}
            break
    return qwen_grid(config, width, height, **limits)
