"""Token-reduction methods for LLaVA-style models: a registry of interchangeable `TokenReducer`s.

The method modules are imported on the registry's first use (`methods._registry.load_methods`), which runs their
`@register_reducer` decorators; `import methods` alone imports no torch, so torch-free helpers (`methods.cli`)
serve the command lines' `--help` and argument errors at once.
"""

from methods._registry import (
    UnknownReducerError,
    check_arguments,
    create_reducer,
    expand_methods,
    get_reducer_class,
    list_reducers,
    method_budgets,
    register_reducer,
)

_CONTRACT = ("Reduced", "Site", "TokenReducer", "Tokens")  # methods.base, imported when first asked for

__all__ = [
    *_CONTRACT,
    "UnknownReducerError",
    "check_arguments",
    "create_reducer",
    "expand_methods",
    "get_reducer_class",
    "list_reducers",
    "method_budgets",
    "register_reducer",
]


def __getattr__(name: str):
    if name in _CONTRACT:
        from methods import base  # noqa: PLC0415 - `import methods` stays torch-free

        return getattr(base, name)
    raise AttributeError(f"module 'methods' has no attribute {name!r}")
