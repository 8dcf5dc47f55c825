"""Name -> reducer class. The registry name is the CLI name and the `method` column of every result row."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import inspect
import json
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from methods.budget import AUTO, Budget

if TYPE_CHECKING:
    from methods.base import TokenReducer

_REDUCERS: dict[str, type[TokenReducer]] = {}
CATALOGUE = Path(__file__).with_name("catalogue.json")  # the registry as data (methods/catalogue.py writes it)
# one file per method; add new ones here
METHOD_MODULES = ("adaptive", "cdpruner", "dart", "divprune", "fastervlm", "fastv", "full", "oracle", "pdrop",
                  "prumerge", "random", "sparsevlm", "visionzip", "vispruner")


def read_catalogue() -> dict[str, dict]:
    """The registry's entries by name (site, learned, reference, question, arguments, summary), read from
    `CATALOGUE` without importing the methods (so without torch)."""
    return json.loads(CATALOGUE.read_text())


def load_methods() -> None:
    """Import every method module (once; Python caches them), so that the registry holds every method."""
    for name in METHOD_MODULES:
        importlib.import_module(f"methods.{name}")


class UnknownReducerError(KeyError):
    """Raised for a method name that is not registered; the message lists close matches and every name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def register_reducer(name: str) -> Callable[[type[TokenReducer]], type[TokenReducer]]:
    """Class decorator: register a `TokenReducer` subclass under `name` (lower_snake). Registering twice raises."""

    def deco(cls: type[TokenReducer]) -> type[TokenReducer]:
        if name in _REDUCERS:
            raise ValueError(f"reducer {name!r} is already registered by {_REDUCERS[name].__module__}")
        if not name.isidentifier() or name != name.lower():
            raise ValueError(f"reducer names are lower_snake identifiers, got {name!r}")
        from methods.signals import SIGNALS  # noqa: PLC0415 - torch, which a method's module has imported already

        unknown = sorted(set(cls.needs) - set(SIGNALS))
        if unknown:
            raise ValueError(f"{name} asks for unknown signals {unknown}; known: {', '.join(SIGNALS)} "
                             "(a new signal is an entry in methods/signals.py and a provider in each adapter)")
        cls.name = name
        _REDUCERS[name] = cls
        return cls

    return deco


def unknown_method(name: str, known: list[str]) -> UnknownReducerError:
    """The error for a name that is not among `known`, with close matches and every name."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return UnknownReducerError(f"unknown method {name!r}.{hint} Available: {', '.join(sorted(known))}")


def get_reducer_class(name: str) -> type[TokenReducer]:
    """The class registered under `name`, or `UnknownReducerError` naming close matches and every method."""
    load_methods()
    if name not in _REDUCERS:
        raise unknown_method(name, list(_REDUCERS))
    return _REDUCERS[name]


def create_reducer(name: str, budget: int | None = None, **kwargs) -> TokenReducer:
    """Build the reducer registered under `name` with `budget` and method-specific keyword arguments, each checked
    against the constructor's type annotation first (`fastv.layer=1.5` is an error, not a silent no-op).

    The arguments the constructor was called with, its defaults filled in and None ones left out, are recorded
    as `reducer.method_args`: the `method_args` column of the result rows and part of each cell's fingerprint, so
    every constructor argument counts without a method listing them again.
    """
    cls = get_reducer_class(name)
    check_arguments(name, kwargs)
    reducer = cls(budget=budget, **kwargs)
    bound = inspect.signature(cls).bind(budget=budget, **kwargs)
    bound.apply_defaults()
    reducer.method_args = {arg: _plain(value) for arg, value in bound.arguments.items() if value is not None}
    return reducer


def check_arguments(name: str, kwargs: dict) -> None:
    """Raise ValueError unless each of `kwargs` fits the type annotation of `name`'s constructor argument (a whole
    number, a number, a non-empty tuple of them, ...): the registry's types check every method alike."""
    hints = typing.get_type_hints(get_reducer_class(name).__init__)
    for arg, value in kwargs.items():
        if arg in hints and not _accepts(hints[arg], value):
            raise ValueError(f"{name}.{arg}={value!r}: must be {_describe(hints[arg])}")


def _plain(value: object) -> object:
    """A constructor argument as JSON can hold it (a path as text, a config dataclass as a dict)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Budget):  # a count or a fraction as the number it is
        return value.value if value.kind in ("count", "fraction") else str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _accepts(hint: object, value: object) -> bool:
    """Whether `value` fits the annotation `hint` (bool is not an int here; an int is a float; a str is a Path)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is tuple:  # tuple[X, ...]: a non-empty tuple (or list) whose every item is an X
        item = typing.get_args(hint)[0]
        return isinstance(value, (tuple, list)) and len(value) > 0 and all(_accepts(item, v) for v in value)
    if typing.get_origin(hint) is typing.Literal:
        return value in typing.get_args(hint)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is Path:
        return isinstance(value, (str, Path))
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: object) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"a non-empty tuple of {_describe(typing.get_args(hint)[0]).removeprefix('a ')}s, e.g. (2, 4)"
    names = {int: "a whole number", float: "a number", str: "a string", bool: "True or False", Path: "a path",
             type(None): "None"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def method_budgets(methods: tuple[str, ...], budgets: list[Budget], num_patches: int | None,
                   kwargs: Callable[[str], dict]) -> tuple[list[tuple[str, Budget]], list[str]]:
    """Which (method, budget) pairs a sweep runs, and notes on what it changed: the one plan rule, used by
    `run_bench.py` and `python -m flops`.

    `budgets` are counts, fractions of each image's tokens and/or `auto`; `num_patches` is the image's visual tokens
    (None: it varies per image, Qwen2.5-VL); `kwargs(method)` gives a method's constructor arguments. `full`, and
    counts >= `num_patches` (no pruning), become one (`full`, every token) pair; a method that sets its own count
    from its arguments (FastV's ratio) runs once under its `budget_label`; `auto` goes only to methods that support
    it.
    """
    notes = []
    repeated = sorted({b for b in budgets if budgets.count(b) > 1}, key=lambda b: b.order)
    if repeated:
        notes.append(f"budget{'s' * (len(repeated) > 1)} {', '.join(map(str, repeated))} given more than once: "
                     "each runs once")
    counts = sorted({b for b in budgets if b.kind == "count"}, key=lambda b: b.order)
    fractions = sorted({b for b in budgets if b.kind == "fraction"}, key=lambda b: b.order)
    over = [b for b in counts if num_patches is not None and b.value >= num_patches]
    if over:
        notes.append(f"budgets {[b.value for b in over]} >= the {num_patches} patches mean no pruning: run once, as "
                     "`full`")
    auto = Budget(AUTO)
    kept = [b for b in counts if b not in over] + fractions + ([auto] if auto in budgets else [])
    whole = Budget.every(num_patches)  # `full`'s: every token
    pairs: list[tuple[str, Budget]] = []
    for m in methods:
        cls = get_reducer_class(m)
        check_arguments(m, kwargs(m))  # before any method reads them
        label = cls.budget_label(kwargs(m))  # e.g. fastv.ratio=0.5: one cell, "R=0.5"
        if label is not None:
            pairs.append((m, Budget.own(label)))
        elif not cls.uses_budget:
            pairs.append((m, whole))
        else:
            pairs += [(m, b) for b in kept if b != auto or cls.supports_auto]
            if auto in kept and not cls.supports_auto:
                notes.append(f"{m} has no {AUTO!r} budget: runs at the numeric budgets only")
    if over or "full" in methods:
        pairs.append(("full", whole))
    return list(dict.fromkeys(pairs)), notes


def list_reducers(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style `pattern`, sorted."""
    load_methods()
    return sorted(fnmatch.filter(_REDUCERS, pattern))


GROUPS = {"question_aware": True, "question_blind": False}  # methods that see the question, or not (catalogue.json)


def expand_methods(names: tuple[str, ...], known: list[str] | None = None) -> tuple[str, ...]:
    """Registered names stay; a family prefix (`adaptive` -> `adaptive_a`, `adaptive_b`) expands; a group
    (`question_aware`, `question_blind`: the methods that read the question, or not, from methods/catalogue.json's
    `question`; `full` and reference rows are in neither) expands; others raise. `known` (names read from
    methods/catalogue.json) replaces the registry, so the command line can check names without importing the
    methods."""
    known = list_reducers() if known is None else sorted(known)
    out: list[str] = []
    for name in names:
        family = fnmatch.filter(known, f"{name}_*")
        if name in GROUPS:
            entries = read_catalogue()
            out += [m for m in known if m in entries and entries[m]["question"] is GROUPS[name]
                    and entries[m]["uses_budget"] and not entries[m]["reference"]]
        elif name in known:
            out.append(name)
        elif family:
            out += family
        else:
            raise unknown_method(name, [*known, *GROUPS])
    return tuple(dict.fromkeys(out))
