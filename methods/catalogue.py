"""The registry written out as data: `methods/catalogue.json` lists every method's name, site, arguments and
summary so that `run_bench.py --list` and its argument checks answer without importing torch.

    python -m methods.catalogue        # rewrite catalogue.json after adding or changing a method

`tests/test_registry.py` fails when the file and the registry disagree.
"""

from __future__ import annotations

import inspect
import json

from methods import get_reducer_class, list_reducers
from methods._registry import CATALOGUE
from methods.signals import sees_question

PATH = CATALOGUE
INTERNAL_ARGS = {"self", "budget", "config"}  # budget comes from --budgets; config is the trainer's, in Python


def _default(value: object) -> object:
    if value is inspect.Parameter.empty:
        return "required"
    return value if isinstance(value, (type(None), bool, int, float, str)) else repr(value)


def build() -> dict:
    """{method name: what the CLI needs to know about it}, from the live registry."""
    out = {}
    for name in list_reducers():
        cls = get_reducer_class(name)
        params = inspect.signature(cls.__init__).parameters
        out[name] = {
            "site": cls.site.value,
            "learned": cls.needs_checkpoint,
            "uses_budget": cls.uses_budget,
            "supports_auto": cls.supports_auto,
            "reference": cls.reference,
            "question": sees_question(cls.needs),  # it reads a signal that depends on the question
            "args": {p: _default(v.default) for p, v in params.items() if p not in INTERNAL_ARGS},
            "summary": " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()),  # the first paragraph
        }
    return out


def render() -> str:
    return json.dumps(build(), indent=1) + "\n"


def main() -> None:
    PATH.write_text(render())
    print(f"wrote {PATH} ({len(list_reducers())} methods)")


if __name__ == "__main__":
    main()
