"""The budget: how many visual tokens a cell lets the LLM see, parsed once at the edge (`Budget.parse`, `Budget.of`) and
carried as one typed value through the plan, the reducers, the records, the console and the stats. Torch-free.

Kinds:

* ``count``: at most `value` visual tokens per image (>= 1);
* ``fraction``: a share `value` of each image's own tokens, strictly between 0 and 1; `tokens(n)` is the one
  fraction-to-count rule, floor(value x n), at least 1, the same on every family;
* ``auto``: the method chooses its own count (PruMerge's IQR rule);
* ``all``: every token, `full`'s budget (`value` the image's tokens, None where images differ in size);
* ``method``: the method's own arguments set the count (FastV's ``ratio``): `label` names it ("R=0.5").

`str(budget)` is its text in cell names, file names and result rows; `record` the value result rows hold (a number
where it is one); `order` the one ordering rule (counts and shares by size, then `auto`, then methods' own labels).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Literal

AUTO = "auto"  # the budget of methods that decide their own token count

Kind = Literal["count", "fraction", "auto", "all", "method"]


@dataclass(frozen=True)
class Budget:
    """A cell's budget of visual tokens (see the module docstring for the kinds).

    Attributes:
        kind: count, fraction, auto, all or method.
        value: count: tokens; fraction: the share; all: the image's tokens or None; otherwise None.
        label: fraction: its text ("0.111" for 1/9); method: the method's label ("R=0.5"); otherwise "".
    """

    kind: Kind
    value: int | float | None = None
    label: str = ""

    def __post_init__(self) -> None:
        v = self.value
        ok = {"count": isinstance(v, int) and not isinstance(v, bool) and v >= 1,
              "fraction": isinstance(v, float) and 0 < v < 1,
              "auto": v is None, "all": v is None or isinstance(v, int) and v >= 1,
              "method": v is None and bool(self.label)}
        if not ok.get(self.kind, False):
            raise ValueError(f"not a budget: kind {self.kind!r}, value {v!r}, label {self.label!r}")

    @classmethod
    def count(cls, n: int) -> Budget:
        return cls("count", n)

    @classmethod
    def fraction(cls, f: float, digits: int | None = None) -> Budget:
        """A share of each image's tokens, labelled as written (`digits`: rounded to that many decimals, 1/9 ->
        "0.111", while the share itself stays exact)."""
        return cls("fraction", float(f), str(float(f) if digits is None else round(f, digits)))

    @classmethod
    def every(cls, n: int | None = None) -> Budget:
        """`full`'s budget: every one of the image's `n` tokens (None: images differ in size)."""
        return cls("all", n)

    @classmethod
    def own(cls, label: str) -> Budget:
        """A count the method's own arguments set, named by its `budget_label`."""
        return cls("method", None, label)

    @classmethod
    def parse(cls, text: str) -> Budget:
        """The command line's budget: a count (>= 1), a fraction strictly between 0 and 1 (0.25), or 'auto'; a
        ValueError that says what to write otherwise."""
        text = text.strip()
        if text == AUTO:
            return cls(AUTO)
        value = _number(text)
        if value is None:
            raise ValueError(f"budget {text!r} is not a number of visual tokens, a fraction or 'auto'")
        if isinstance(value, float) and value >= 1 and value.is_integer():  # 1e3, 64.0: a count in a float's spelling
            raise ValueError(f"budget {text}: a count of visual tokens is a whole number ({int(value)}); a fraction is "
                             "strictly between 0 and 1")
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError(f"budget {text}: a fraction of the image's tokens must be strictly between 0 and 1 (1 "
                             "keeps them all: that is `full`)")
        if isinstance(value, int) and value < 1:
            raise ValueError(f"budget {value} must be >= 1 (visual tokens the LLM sees)")
        return cls.count(value) if isinstance(value, int) else cls.fraction(value)

    @classmethod
    def of(cls, value: Budget | int | float | str) -> Budget:
        """A budget from what a caller or a result row holds: a Budget, a count, a fraction, 'auto', or a row's
        text (a number, or a method's own label)."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, bool):
            raise ValueError(f"budget {value!r} is not a number of visual tokens, a fraction or 'auto'")
        if isinstance(value, float | str) and value in (1.0, "1.0"):  # `full`'s row where images differ in size
            return cls.every()
        if isinstance(value, int):
            return cls.count(value) if value >= 1 else cls.parse(str(value))
        if isinstance(value, float):
            return cls.fraction(value) if 0 < value < 1 else cls.parse(repr(value))
        if isinstance(value, str) and _number(value) is None and value != AUTO:
            return cls.own(value)
        return cls.parse(str(value))

    def __str__(self) -> str:
        if self.kind in ("fraction", "method"):
            return self.label
        if self.kind == "all":
            return "1.0" if self.value is None else str(self.value)
        return AUTO if self.kind == AUTO else str(self.value)

    @property
    def record(self) -> int | float | str:
        """The value a result row holds: a count or the image's tokens as a whole number, a fraction as labelled
        (0.111), `auto` and a method's label as text."""
        if self.kind == "fraction":
            return float(self.label)
        if self.kind == "all":
            return 1.0 if self.value is None else self.value
        return str(self) if self.value is None else self.value

    @property
    def is_number(self) -> bool:
        """Whether it is a number of tokens or a share (a count, a fraction, every token), not `auto` or a method's
        own label."""
        return self.kind in ("count", "fraction", "all")

    def tokens(self, image_tokens: int) -> int | None:
        """The visual tokens this budget keeps of an image of `image_tokens`: a count itself, a fraction
        floor(f x tokens) (at least 1), `all` every one; None for `auto` and a method's own count (the method
        decides)."""
        if self.kind == "count":
            return self.value
        if self.kind == "fraction":
            return max(1, math.floor(self.value * image_tokens + 1e-9))
        return image_tokens if self.kind == "all" else None

    def at(self, image_tokens: int | None) -> Budget:
        """As a count where every image has `image_tokens` tokens (a fraction becomes its count there); unchanged
        where they vary (None) or the kind is not a share."""
        if self.kind == "fraction" and image_tokens is not None:
            return Budget.count(self.tokens(image_tokens))
        return self

    def argument(self, image_tokens: int | None) -> Budget | None:
        """What a reducer's constructor takes for this cell budget (`at(image_tokens)`), or None where the method sets
        its own count from its arguments (`method`) or reduces nothing (`all`, `full`'s)."""
        return None if self.kind in ("method", "all") else self.at(image_tokens)

    @property
    def order(self) -> tuple[int, float, str]:
        """The one sort key: counts, the image's tokens and fractions by size (a fraction before any count), then
        `auto`, then methods' own labels by name."""
        rank = {"fraction": 0, "count": 1, "all": 1, "auto": 2, "method": 3}[self.kind]
        size = float(self.value) if self.value is not None else (1.0 if self.kind == "all" else math.inf)
        return rank, size, self.label


def _number(text: str) -> int | float | None:
    """`text` as an int if it is one, else as a float, else None."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None


def parse_budget(text: str) -> Budget:
    """An argparse type: `Budget.parse`, its error as argparse's."""
    try:
        return Budget.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
