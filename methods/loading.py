"""Loading a local checkpoint folder and its processor, offline, for either adapter (`methods/llava.py`,
`methods/qwen.py`): the dtype rule, the processor files a folder must hold, and one-line errors for what is wrong."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoProcessor

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


def check_processor_files(path: Path) -> None:
    """Raise FileNotFoundError unless the checkpoint folder holds an image-processor config and a tokenizer."""
    for names in PROCESSOR_FILES:
        if not any((Path(path) / n).is_file() for n in names):
            raise FileNotFoundError(f"--model {path} has no {' or '.join(names)}: a checkpoint folder needs its "
                                    "processor beside the weights (processor.save_pretrained(PATH))")


def load_pretrained(path: str | Path, model_class, device: str = "cpu", dtype: str = "auto"):
    """`model_class` and the processor from a local checkpoint folder (offline, SDPA attention, eval mode, on
    `device`; prompts left-padded). Returns (model, processor)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no config.json); pass --model PATH")
    check_processor_files(path)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        model = model_class.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa",
                                            local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt file raises safetensors' own error type
        raise ValueError(f"--model {path}: the weights cannot be loaded ({first_line(e)}); re-save or re-download "
                         "the checkpoint") from None
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
