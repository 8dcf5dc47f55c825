"""What every command line of the project shares, torch-free at import: a parser whose errors are one line with exit
status 2, the argument types for budgets, method arguments and positive counts, and the device check."""

from __future__ import annotations

import argparse
import ast
import math
import sys
import textwrap
from pathlib import Path

AUTO = "auto"  # as methods.base.AUTO, without importing torch
MODEL_TYPES = {"llava": "LLaVA-1.5", "qwen2_5_vl": "Qwen2.5-VL"}  # config model_type -> family (methods.families)
CONSOLE_WIDTH = 120  # columns the command-line tools' messages and tables fit


def wrap(text: str, first: str = "", rest: str = "") -> str:
    """`text` wrapped at `CONSOLE_WIDTH`, its first line after `first` and the others after `rest`; words (paths,
    `--flags`) are never split."""
    return textwrap.fill(text, CONSOLE_WIDTH, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False,
                         break_long_words=False)


def known_families() -> str:
    """"LLaVA-1.5 ('llava') and Qwen2.5-VL ('qwen2_5_vl')", for error messages."""
    names = [f"{name} ({kind!r})" for kind, name in MODEL_TYPES.items()]
    return ", ".join(names[:-1]) + " and " + names[-1]


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments get one line (what is wrong, where the options are listed) and exit status 2; an option given
    twice is refused (argparse would keep the last silently), unless it is made to repeat (`append`, `count`)."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message}; `{self.prog} --help` lists the options\n")

    def add_argument(self, *args, **kwargs):
        if kwargs.get("type") is Path:  # "" would be the current folder: refused, as every path argument's type
            kwargs["type"] = path_arg
        return super().add_argument(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        seen: dict[argparse.Action, str] = {}
        for token in args:
            if token == "--":
                break
            if not token.startswith("--"):
                continue
            name = token.split("=", 1)[0]
            matches = [a for o, a in self._option_string_actions.items() if o == name]
            if not matches and self.allow_abbrev:
                matches = list({a for o, a in self._option_string_actions.items() if o.startswith(name)})
            if len(matches) != 1 or isinstance(matches[0], (argparse._AppendAction, argparse._CountAction,
                                                             argparse._HelpAction)):
                continue
            if matches[0] in seen:
                self.error(f"{seen[matches[0]]} given twice; give it once, with all its values")
            seen[matches[0]] = name
        return super().parse_known_args(args, namespace)


def path_arg(text: str) -> Path:
    """An argparse type: a path, never empty (Path("") is the current folder, which no one means)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or folder name")
    return Path(text)


def at_least(low: int):
    """An argparse type: a whole number >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def parse_budget(text: str) -> int | float | str:
    """An argparse type: visual tokens the LLM sees, as a count (>= 1), a fraction of each image's tokens (strictly
    between 0 and 1, e.g. 0.25), or 'auto'."""
    if text == AUTO:
        return text
    value = _number(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"budget {text!r} is not a number of visual tokens, a fraction or 'auto'")
    if isinstance(value, float) and value >= 1 and value.is_integer():  # 1e3, 64.0: a count in a float's spelling
        raise argparse.ArgumentTypeError(f"budget {text}: a count of visual tokens is a whole number "
                                         f"({int(value)}); a fraction is strictly between 0 and 1")
    if isinstance(value, float) and not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"budget {text}: a fraction of the image's tokens must be strictly between "
                                         "0 and 1 (1 keeps them all: that is `full`)")
    if isinstance(value, int) and value < 1:
        raise argparse.ArgumentTypeError(f"budget {value} must be >= 1 (visual tokens the LLM sees)")
    return value


def _number(text: str) -> int | float | None:
    """`text` as an int if it is one, else as a float, else None."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None


def is_fraction(budget: object) -> bool:
    """Whether a budget is a fraction of each image's tokens (a float), not a count or 'auto'."""
    return isinstance(budget, float)


def budget_count(budget: int | float | str, tokens: int) -> int | str:
    """The count a budget keeps of an image of `tokens` visual tokens: a fraction f keeps floor(f x tokens), at
    least 1; a count or 'auto' is itself."""
    if is_fraction(budget):
        return max(1, math.floor(budget * tokens + 1e-9))
    return budget


def parse_method_arg(text: str) -> tuple[str, str, object]:
    """An argparse type: METHOD.ARG=VALUE -> (method, argument, value as a Python literal, or the plain string)."""
    head, sep, value = text.partition("=")
    method, dot, arg = head.partition(".")
    if not (sep and dot and method and arg):
        raise argparse.ArgumentTypeError(f"{text!r}: write METHOD.ARG=VALUE, e.g. fastv.layer=1")
    if not value.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: an empty value; give {head} a value, or leave it out for its "
                                         "default")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value  # a plain string, e.g. a path
    return method, arg, parsed


def check_device(device: str) -> None:
    """Raise ValueError unless `device` names a device this machine has."""
    import torch  # noqa: PLC0415 - this module is torch-free until a device is checked

    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise ValueError(f"--device {device}: use cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no usable CUDA device (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda}); use --device cpu")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (or its type name), for one-line error messages."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
