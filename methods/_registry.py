"""Name -> reducer class. The registry name is the CLI name and the `method` column of every result row."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from methods.base import TokenReducer

_REDUCERS: dict[str, type[TokenReducer]] = {}


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
        cls.name = name
        _REDUCERS[name] = cls
        return cls

    return deco


def get_reducer_class(name: str) -> type[TokenReducer]:
    """The class registered under `name`, or `UnknownReducerError` naming close matches and every method."""
    if name not in _REDUCERS:
        close = difflib.get_close_matches(name, list(_REDUCERS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownReducerError(f"unknown method {name!r}.{hint} Available: {', '.join(sorted(_REDUCERS))}")
    return _REDUCERS[name]


def create_reducer(name: str, budget: int | None = None, **kwargs) -> TokenReducer:
    """Build the reducer registered under `name` with `budget` and method-specific keyword arguments."""
    return get_reducer_class(name)(budget=budget, **kwargs)


def list_reducers(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style `pattern`, sorted."""
    return sorted(fnmatch.filter(_REDUCERS, pattern))
