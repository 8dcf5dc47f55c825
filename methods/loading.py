"""Loading a local checkpoint folder and its processor, offline, for either adapter (`methods/llava.py`,
`methods/qwen.py`): the dtype rule, the processor files a folder must hold, and one-line errors for what is wrong."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoProcessor
from transformers.utils import logging as hf_logging

from methods.cli import first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROCESSOR_FILES = (("processor_config.json", "preprocessor_config.json"), ("tokenizer.json", "tokenizer.model"))


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' means bfloat16 on CUDA and float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


ANSWER_MARK = "\x1eANSWER\x1e"  # stands for an answer while a chat template renders a conversation


def template_follow_up(processor, text: str) -> str | None:
    """What the checkpoint's chat template puts after an assistant answer up to the next answer, for a next user turn
    holding `text` only (the end of the answer's turn, the user turn, the generation prompt); None when the
    processor has no chat template."""
    if not getattr(processor, "chat_template", None):
        return None
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": ANSWER_MARK}]},
            {"role": "user", "content": [{"type": "text", "text": text}]}]
    return processor.apply_chat_template(conv, add_generation_prompt=True).split(ANSWER_MARK, 1)[1]


def check_processor_files(path: Path) -> None:
    """Raise FileNotFoundError unless the checkpoint folder holds an image-processor config and a tokenizer."""
    for names in PROCESSOR_FILES:
        if not any((Path(path) / n).is_file() for n in names):
            raise FileNotFoundError(f"--model {path} has no {' or '.join(names)}: a checkpoint folder needs its "
                                    "processor beside the weights (processor.save_pretrained(PATH))")


LLAVA_WEIGHTS, QWEN_WEIGHTS = "a LLaVA (llava-hf) model's", "a Qwen2.5-VL or Qwen3-VL model's"
WEIGHT_FAMILIES = (("vision_tower.", LLAVA_WEIGHTS), ("multi_modal_projector.", LLAVA_WEIGHTS),
                   ("visual.blocks.", QWEN_WEIGHTS), ("visual.merger.", QWEN_WEIGHTS))


def weight_family(keys: list[str]) -> str:
    """What a checkpoint's weight names look like, from the first name a known family owns."""
    for key in keys:
        for fragment, family in WEIGHT_FAMILIES:
            if fragment in key:
                return family
    return "another model's"


def check_weights(path: Path, model_type: str, info: dict) -> None:
    """Refuse a checkpoint whose weights do not fill the model its config.json describes: parameters missing from
    the weights (transformers would initialise them at random) or weights the model has no place for."""
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    if not missing and not unexpected:
        return
    parts = [f"{len(missing)} of the model's parameters are not in the weights (e.g. {missing[0]})"] if missing else []
    parts += [f"{len(unexpected)} weights have no place in the model (e.g. {unexpected[0]})"] if unexpected else []
    look = f"look like {weight_family(unexpected)}" if unexpected else "are incomplete"
    raise ValueError(f"--model {path}: config.json describes a {model_type!r} model but its weights {look}: "
                     f"{' and '.join(parts)}, so it would run partly at random; put the config.json saved with these "
                     "weights beside them, or re-save the checkpoint")


def load_pretrained(path: str | Path, model_class, device: str = "cpu", dtype: str = "auto"):
    """`model_class` and the processor from a local checkpoint folder (offline, SDPA attention, eval mode, on
    `device`; prompts left-padded). Returns (model, processor)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no config.json); pass --model PATH")
    check_processor_files(path)
    torch_dtype = resolve_dtype(dtype, device)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' load report stays out of the output: `check_weights` speaks
    try:
        model, info = model_class.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa",
                                                  local_files_only=True, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - a corrupt file raises safetensors' own error type
        raise ValueError(f"--model {path}: the weights cannot be loaded ({first_line(e)}); re-save or re-download "
                         "the checkpoint") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    check_weights(path, model.config.model_type, info)
    try:
        model = model.to(device).eval()
    except (RuntimeError, AssertionError) as e:  # no such device, or no driver
        raise ValueError(f"device {device!r} cannot be used here ({first_line(e)}); use cpu or a device this "
                         "machine has") from None
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError or its own types
        raise ValueError(f"--model {path}: the processor cannot be loaded ({first_line(e)}); save the checkpoint's "
                         "processor beside it (processor.save_pretrained(PATH))") from None
    processor.tokenizer.padding_side = "left"  # instance setting: batched prompts are left-padded
    return model, processor
