"""How each registered method is built for the registry's contract tests (tests/test_contract.py): one table, on the
test models of tests/conftest.py (`tiny_llava`: 3 LLM layers, 16 patches; `tiny_qwen`: 2 LLM layers). A method whose
defaults run there needs no row; `test_every_method_has_a_working_case` fails, naming the row to add, for one whose
defaults do not.
"""

from __future__ import annotations

from collections.abc import Callable

from flops.shapes import stand_in_reducer
from methods import get_reducer_class
from methods.base import TokenReducer

# constructor arguments besides the budget, where a method's defaults cannot run on a 2-layer language model
ARGS: dict[str, dict] = {
    "fastv": {"layer": 1},  # its default layer 2 is past a 2-layer LLM
    "dart": {"layer": 1},  # likewise
}
# methods whose stages a layer-averaged budget cannot reach in 2-3 layers: built from arguments that set the count
OWN_COUNT: dict[str, Callable[[int], dict]] = {
    "sparsevlm": lambda budget: {"counts": (budget,), "layers": (1,)},  # one stage before layer 1 keeping `budget`
}


def build(method: str, budget: int | str, config) -> TokenReducer:
    """The method at `budget` (ignored by methods without one) for a model of `config`, in eval mode: the table's
    arguments; a learned method an untrained controller of the model's shape (the contracts are the mechanism's)."""
    if method in OWN_COUNT:
        return stand_in_reducer(method, None, config, **OWN_COUNT[method](budget))
    return stand_in_reducer(method, budget, config, **ARGS.get(method, {}))


def takes_budget(method: str) -> bool:
    """Whether a contract can hold the method to a budget (not `full`, not one whose arguments set its count)."""
    return get_reducer_class(method).uses_budget and method not in OWN_COUNT
