"""The budget type (methods/budget.py): parsed once, one text, one fraction-to-count rule, one order."""

from __future__ import annotations

import pytest

from methods.budget import Budget


@pytest.mark.parametrize(("text", "kind", "shown", "record"), [
    ("64", "count", "64", 64), ("0.25", "fraction", "0.25", 0.25), ("0.2500", "fraction", "0.25", 0.25),
    ("auto", "auto", "auto", "auto"),
])
def test_parse_text_and_record(text, kind, shown, record):
    b = Budget.parse(text)
    assert (b.kind, str(b), b.record) == (kind, shown, record)
    assert Budget.of(b.record) == b and Budget.of(str(b)) == b  # what a result row holds reads back the same


@pytest.mark.parametrize(("text", "phrase"), [
    ("0", "must be >= 1"), ("-3", "must be >= 1"), ("1.0", "a count of visual tokens is a whole number (1)"),
    ("1e3", "whole number (1000)"), ("1.5", "strictly between 0 and 1"), ("0.0", "strictly between 0 and 1"),
    ("lots", "is not a number of visual tokens"), ("nan", "strictly between 0 and 1"),
])
def test_bad_text_is_one_line(text, phrase):
    with pytest.raises(ValueError, match=phrase.replace("(", r"\(").replace(")", r"\)")) as e:
        Budget.parse(text)
    assert "\n" not in str(e.value)


def test_one_fraction_to_count_rule_floor_at_least_one():
    assert [Budget.fraction(f).tokens(n) for f, n in ((0.25, 144), (0.111, 144), (0.001, 50), (1 / 3, 576),
                                                       (1 / 9, 144))] == [36, 15, 1, 192, 16]
    assert Budget.fraction(1 / 9, digits=3).at(144) == Budget.count(16)  # the default: 16 on every family
    assert str(Budget.fraction(1 / 9, digits=3)) == "0.111" and Budget.fraction(1 / 9, digits=3).value == 1 / 9
    assert Budget.count(20).at(144) == Budget.count(20) and Budget.fraction(0.5).at(None).kind == "fraction"
    assert Budget.own("R=0.5").tokens(144) is None and Budget.every(144).tokens(144) == 144


def test_rows_read_back_every_kind():
    for b in (Budget.count(16), Budget.fraction(0.25), Budget.parse("auto"), Budget.every(144), Budget.every(),
              Budget.own("ratios=0.5,0.25,0.125")):
        again = Budget.of(b.record)
        assert str(again) == str(b) and again.order == (b if b.kind != "all" or b.value is None
                                                        else Budget.count(b.value)).order
    assert str(Budget.every()) == "1.0" and Budget.of(1.0) == Budget.every()


def test_one_order():
    budgets = [Budget.own("R=0.5"), Budget.parse("auto"), Budget.every(144), Budget.count(48), Budget.count(16),
               Budget.fraction(0.25), Budget.own("T=128"), Budget.fraction(0.111)]
    assert [str(b) for b in sorted(budgets, key=lambda b: b.order)] == ["0.111", "0.25", "16", "48", "144", "auto",
                                                                          "R=0.5", "T=128"]


def test_only_valid_budgets_exist():
    for kind, value, label in (("count", 0, ""), ("fraction", 1.0, "1.0"), ("method", None, ""), ("nope", 1, ""),
                               ("count", True, "")):
        with pytest.raises(ValueError, match="not a budget"):
            Budget(kind, value, label)
