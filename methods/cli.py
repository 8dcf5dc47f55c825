"""What every command line of the project shares, torch-free at import: a parser whose errors are one line with exit
status 2, the argument types for method arguments and positive counts (budgets: `methods.budget.parse_budget`), and
the device check."""

from __future__ import annotations

import argparse
import ast
import sys
import textwrap
from pathlib import Path

# config model_type -> family (methods.families)
MODEL_TYPES = {"llava": "LLaVA-1.5", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}
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


def pair(text: str) -> tuple[int, int]:
    """An argparse type: AxB (or N for N x N), whole numbers >= 1."""
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: write AxB with whole numbers >= 1 (e.g. 640x480), or N for NxN")
    return int(parts[0]), int(parts[1])


def parse_shard(text: str) -> tuple[int, int]:
    """An argparse type: I/N -> (I, N), the I-th of N parts, 1 <= I <= N."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = 0
    if not sep or not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"{text!r}: write I/N with 1 <= I <= N, e.g. 2/8 for the second of 8 parts")
    return i, n


def parse_method_arg(text: str) -> tuple[str, str, object]:
    """An argparse type: METHOD.ARG=VALUE -> (method, argument, value as a Python literal, or the plain string).

    VALUE is read by Python's own literal parser (`ast.literal_eval`), not as YAML, for a measured reason: the forms
    users write on a command line, `pdrop.ratios=0.5,0.25,0.125` (a tuple), `x=None` and `x=1e3`, are a string, a
    string and a string to PyYAML. A sweep config's `method_args` (YAML) reach this parser as the `repr` of what YAML
    read, so both spellings give the same value; the method's constructor checks it (one line when it is wrong)."""
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
