"""Token-reduction methods for LLaVA-style models: a registry of interchangeable `TokenReducer`s.

Importing this package imports every method module, so their `@register_reducer` decorators run.
"""

from methods import adaptive, fastv, full, prumerge, random  # noqa: F401  (registers the methods)
from methods._registry import (
    UnknownReducerError,
    create_reducer,
    expand_methods,
    get_reducer_class,
    list_reducers,
    register_reducer,
)
from methods.base import Reduced, Site, TokenReducer, Tokens

__all__ = [
    "Reduced",
    "Site",
    "TokenReducer",
    "Tokens",
    "UnknownReducerError",
    "create_reducer",
    "expand_methods",
    "get_reducer_class",
    "list_reducers",
    "register_reducer",
]
