"""The model families the harness runs, chosen from a checkpoint's config: what the runner, the lmms-eval model class
and the FLOPs counter need to know about one, in one place, so that none of them assumes LLaVA.

    family = family_of(config)            # LLAVA, QWEN or QWEN3, from config.model_type
    model, processor = family.load(path, device="cpu", dtype="auto")
    runner = family.runner(model, reducer)    # ReducedLlava / ReducedQwen / ReducedQwen3
    inputs = processor(images=..., text=[family.prompt(processor, q) for q in questions], padding=True,
                       return_tensors="pt")
    gen = runner.generate(*(inputs[k] for k in family.inputs), max_new_tokens=16)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from transformers import (
    LlavaForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

from methods import llava, qwen, signals
from methods._registry import get_reducer_class
from methods.adaptive import ControllerConfig
from methods.base import TokenReducer
from methods.cli import MODEL_TYPES, known_families
from methods.trace import LlavaLayout, QwenLayout


@dataclass(frozen=True)
class Family:
    """How the harness drives one model family.

    Attributes:
        name: as the user reads it ("LLaVA-1.5", "Qwen2.5-VL").
        model_type: the config's `model_type`.
        layout: config -> the family's geometry (`LlavaLayout`, `QwenLayout`).
        load: (path, device, dtype) -> (model, processor), from a local folder.
        prompt: (processor, text) -> the prompt for one image and `text`.
        follow_up: (processor, text) -> what follows an answer up to the next one, for a next question `text`.
        runner: (model, reducer) -> the adapter that runs them (`generate`, `prefill`).
        check_reducer: (reducer, layout) -> None, or a one-line error when the method cannot run on this model.
        inputs: the processor outputs the adapter's `generate` takes, in order.
        fixed_tokens: whether every image has the same number of visual tokens (the layout's `num_patches`); when
            not, budgets are per image (a count is an upper bound, a fraction is each image's share).
        model_class: the Hugging Face class of its checkpoints (a random-weight model is built from a config with it).

    Which methods it runs follows from what its adapter provides (`runner.provides`, `methods/signals.py`).
    """

    name: str
    model_type: str
    layout: Callable
    load: Callable
    prompt: Callable
    follow_up: Callable
    runner: Callable
    check_reducer: Callable[[TokenReducer, object], None]
    inputs: tuple[str, ...]
    fixed_tokens: bool
    model_class: type

    def runs(self, method: str) -> bool:
        """Whether this family runs the registered `method` (at some budget and layers)."""
        return signals.runs(get_reducer_class(method), self.runner.provides)

    def refuse(self, method: str) -> None:
        """Raise NotImplementedError, in one line that says why, unless this family runs the registered `method`."""
        signals.refuse(get_reducer_class(method), self.runner.provides)

    def controller_config(self, layout, method: str, **kwargs) -> ControllerConfig:
        """The shape of a learned controller for a model of `layout`: tokens of the features site's width, a fixed
        count per image where the family has one (None: any count)."""
        text = layout.text_width if "question" in get_reducer_class(method).needs else 0  # the question's width
        return ControllerConfig(method=method, dim=layout.feature_width,
                                num_patches=layout.num_patches if self.fixed_tokens else None, text_dim=text, **kwargs)


LLAVA = Family(name="LLaVA-1.5", model_type="llava", layout=LlavaLayout.from_config, load=llava.load_llava,
               prompt=llava.llava_prompt, follow_up=llava.llava_follow_up, runner=llava.ReducedLlava,
               check_reducer=llava.check_reducer,
               inputs=("input_ids", "attention_mask", "pixel_values"), fixed_tokens=True,
               model_class=LlavaForConditionalGeneration)
QWEN = Family(name="Qwen2.5-VL", model_type="qwen2_5_vl", layout=QwenLayout.from_config, load=qwen.load_qwen,
              prompt=qwen.qwen_prompt, follow_up=qwen.qwen_follow_up, runner=qwen.ReducedQwen,
              check_reducer=qwen.check_reducer,
              inputs=("input_ids", "attention_mask", "pixel_values", "image_grid_thw"), fixed_tokens=False,
              model_class=Qwen2_5_VLForConditionalGeneration)
QWEN3 = Family(name="Qwen3-VL", model_type="qwen3_vl", layout=QwenLayout.from_config, load=qwen.load_qwen3,
               prompt=qwen.qwen_prompt, follow_up=qwen.qwen_follow_up, runner=qwen.ReducedQwen3,
               check_reducer=partial(qwen.check_reducer, provides=qwen.ReducedQwen3.provides),
               inputs=("input_ids", "attention_mask", "pixel_values", "image_grid_thw"), fixed_tokens=False,
               model_class=Qwen3VLForConditionalGeneration)
FAMILIES = {f.model_type: f for f in (LLAVA, QWEN, QWEN3)}
assert {k: f.name for k, f in FAMILIES.items()} == MODEL_TYPES  # the torch-free copy the command lines read


def family_of(config) -> Family:
    """The family of a checkpoint's config, or a one-line ValueError naming the ones supported."""
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        raise ValueError(f"a {kind!r} checkpoint is not a model family this harness runs; it runs {known_families()}")
    return FAMILIES[kind]

