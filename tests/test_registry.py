"""The registry: names, duplicates, helpful errors, family expansion; and the contract every reducer keeps."""

from __future__ import annotations

import pytest
import torch

from benchmarks.defaults import catalogue as read_catalogue
from benchmarks.plan import RunSpec, make_reducer
from methods import (
    Reduced,
    Site,
    TokenReducer,
    Tokens,
    UnknownReducerError,
    catalogue,
    create_reducer,
    expand_methods,
    list_reducers,
)
from methods._registry import _REDUCERS, CATALOGUE, register_reducer


def test_full_is_registered_and_is_identity():
    assert "full" in list_reducers()
    r = create_reducer("full")
    x = torch.randn(4, 9, 8)
    out = r(Tokens(x=x, grid=(3, 3)))
    assert out.x is x and out.keep is None and r.site is Site.FEATURES


def test_unknown_name_suggests_close_matches_and_lists_all():
    with pytest.raises(UnknownReducerError) as err:
        create_reducer("ful")
    msg = str(err.value)
    assert "Did you mean full?" in msg and "Available: " in msg and "full" in msg.split("Available: ")[1]


def test_registering_twice_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_reducer("full")(type("Other", (TokenReducer,), {}))


def test_register_and_expand_family(monkeypatch):
    monkeypatch.setattr("methods._registry._REDUCERS", dict(_REDUCERS))

    for suffix in ("a", "b"):
        register_reducer(f"demo_{suffix}")(type(f"Demo{suffix}", (TokenReducer,), {"forward": lambda s, t: t}))
    assert expand_methods(("demo",)) == ("demo_a", "demo_b")
    assert expand_methods(("full", "demo_b", "full")) == ("full", "demo_b")
    with pytest.raises(UnknownReducerError, match="Did you mean demo_"):
        expand_methods(("demo_c",))


def test_budget_validation():
    class Keep(TokenReducer):
        def forward(self, t: Tokens) -> Reduced:
            return Reduced(x=t.x[:, : self.budget], keep=torch.arange(self.budget).expand(t.x.size(0), -1))

    for bad in (0, -3, None):
        with pytest.raises(ValueError, match="budget must be an integer >= 1 or a fraction in"):
            Keep(budget=bad)
    for bad in (2.5, 1.0, 0.0):
        with pytest.raises(ValueError, match="a fraction budget must be strictly between 0 and 1"):
            Keep(budget=bad)
    half = Keep(budget=0.5)  # a fraction: the adapter passes each sample's count
    assert (half.fraction, half.budget) == (0.5, None)
    with pytest.raises(ValueError, match="needs a `layer`"):
        type("L", (Keep,), {"site": Site.LLM})(budget=3)


def test_plan_full_runs_once_and_large_budgets_collapse():
    spec = RunSpec(methods=("full",), budgets=(16, 144, 600, 16), tasks=("synth_vqa",))
    cells, notes = spec.cells(144)
    assert [(c.method, str(c.budget)) for c in cells] == [("full", "144")]
    assert any("no pruning" in n for n in notes)
    assert "budget 16 given more than once: each runs once" in notes  # names the repeated budget, not the others


def test_plan_fraction_budgets():
    """Fractions run as given when images differ in size (`full` at 1.0) and become counts when every image has
    the same number of tokens (`make_reducer`), floor(f x tokens), at least 1."""
    spec = RunSpec(methods=("full", "fastv"), budgets=(0.25, 16, 0.25), tasks=("synth_vqa",))
    cells, notes = spec.cells(None)
    assert [(c.method, str(c.budget)) for c in cells] == [("full", "1.0"), ("fastv", "16"), ("fastv", "0.25")]
    assert "budget 0.25 given more than once: each runs once" in notes
    assert [make_reducer(c, spec, 144).budget for c in cells] == [None, 16, 36]
    assert make_reducer(cells[2], spec).fraction == 0.25  # per image, by the adapter
    default = RunSpec(tasks=("synth_vqa",)).cells(None)[0][0].budget  # the default fractions, as fractions
    assert (str(default), default.record, default.tokens(144)) == ("0.111", 0.111, 16)  # 1/9 exactly: 16 of 144
    assert [str(c.budget) for c in RunSpec(methods=("fastv",), tasks=("synth_vqa",)).cells(144)[0]] == ["16", "36",
                                                                                                        "48"]


def test_catalogue_is_the_registry():
    """methods/catalogue.json (read by `run_bench.py --list` and its torch-free checks) says what the registry
    says; after adding or changing a method, `python -m methods.catalogue` rewrites it."""

    assert CATALOGUE == catalogue.PATH
    assert CATALOGUE.read_text() == catalogue.render(), "stale methods/catalogue.json: run python -m methods.catalogue"
    assert set(catalogue.build()) == set(list_reducers())
    assert catalogue.build()["fastv"] == {**catalogue.build()["fastv"], "site": "llm", "args": {"layer": 2,
                                                                                              "ratio": None}}


def test_recorded_arguments_of_fastv_and_prumerge_by_hand():
    assert create_reducer("fastv", 16).method_args == {"budget": 16, "layer": 2}
    assert create_reducer("fastv", None, ratio=0.5, layer=1).method_args == {"layer": 1, "ratio": 0.5}
    assert create_reducer("prumerge", "auto").method_args == {"budget": "auto", "neighbours": 32}
    assert create_reducer("random", 8, seed=3).method_args == {"budget": 8, "seed": 3}
    assert create_reducer("full").method_args == {}


EDGES = ["-1", "0", "1000000", "0.5", "-0.5", "True", "'x'", "()", "(1,)", "(-1,)", "(0.5,)", "(3, 2, 1)"]


@pytest.mark.parametrize("name", [m for m in list_reducers() if read_catalogue()[m]["args"]])
def test_every_argument_at_its_edges_is_run_or_refused_in_one_line(name, capsys):
    """Each method argument of the catalogue, fed edge values (negative, zero, huge, a number where a tuple is
    expected, an empty tuple, ...), through `run_bench.py --dry-run`: the plan runs (exit 0) or one `error:` line
    with exit status 2 names the problem; never a traceback. The registry's types check them for every method."""
    import run_bench  # noqa: PLC0415
    from flops.__main__ import main as flops_main  # noqa: PLC0415

    for arg in read_catalogue()[name]["args"]:
        if arg in ("checkpoint", "config"):
            continue
        for value in EDGES:
            argv = ["--methods", name, "--method-args", f"{name}.{arg}={value}", "--dry-run", "--tasks", "synth_vqa"]
            try:
                code = run_bench.main(argv)
            except SystemExit as e:  # argparse's own checks
                code = e.code
            err = capsys.readouterr().err.strip()
            assert code in (0, 2), (name, arg, value, err)
            if code == 2:
                assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, (name, arg, value)
            try:  # the FLOPs counter's command line, on LLaVA-1.5-7B's shapes
                code = flops_main(["--methods", name, "--method-args", f"{name}.{arg}={value}", "--budgets", "64"])
            except SystemExit as e:
                code = e.code
            captured = capsys.readouterr()
            err = [line for line in captured.err.splitlines() if not line.startswith("note: ")]
            assert code in (0, 2), (name, arg, value, captured.err)
            if code == 2:
                assert len(err) == 1 and err[0].startswith("error: "), (name, arg, value, captured.err)
