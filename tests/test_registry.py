"""The registry: names, duplicates, helpful errors, family expansion; and the contract every reducer keeps."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch

import methods
from benchmarks.defaults import CATALOGUE
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
from methods._registry import _REDUCERS, register_reducer
from methods.adaptive import ControllerConfig
from methods.cli import budget_count
from methods.signals import Dims, stand_ins


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
    assert [(c.method, c.budget) for c in cells] == [("full", 144)]
    assert any("no pruning" in n for n in notes)
    assert "budget 16 given more than once: each runs once" in notes  # names the repeated budget, not the others


def test_plan_fraction_budgets():
    """Fractions run as given when images differ in size (`full` at 1.0) and become counts when every image has
    the same number of tokens (`make_reducer`), floor(f x tokens), at least 1."""
    spec = RunSpec(methods=("full", "fastv"), budgets=(0.25, 16, 0.25), tasks=("synth_vqa",))
    cells, notes = spec.cells(None)
    assert [(c.method, c.budget) for c in cells] == [("full", 1.0), ("fastv", 16), ("fastv", 0.25)]
    assert "budget 0.25 given more than once: each runs once" in notes
    assert [make_reducer(c, spec, 144).budget for c in cells] == [None, 16, 36]
    assert make_reducer(cells[2], spec).fraction == 0.25  # per image, by the adapter
    assert [budget_count(f, n) for f, n in ((0.25, 144), (0.111, 144), (0.001, 50), (1 / 3, 576))] == [36, 15, 1, 192]
    assert RunSpec(tasks=("synth_vqa",)).cells(None)[0][0].budget == 0.111  # the default fractions, as fractions


def test_catalogue_is_the_registry():
    """methods/catalogue.json (read by `run_bench.py --list` and its torch-free checks) says what the registry
    says; after adding or changing a method, `python -m methods.catalogue` rewrites it."""

    assert CATALOGUE == catalogue.PATH
    assert CATALOGUE.read_text() == catalogue.render(), "stale methods/catalogue.json: run python -m methods.catalogue"
    assert set(catalogue.build()) == set(list_reducers())
    assert catalogue.build()["fastv"] == {**catalogue.build()["fastv"], "site": "llm", "args": {"layer": 2,
                                                                                              "ratio": None}}


@pytest.mark.parametrize("name", list_reducers())
def test_contract_batch_of_four_independent_samples(name):
    """Every reducer, on the stand-ins of its signals (methods/signals.py): shapes, budget, and one sample's output
    never depends on another's."""
    cls = methods.get_reducer_class(name)
    kwargs = {"config": ControllerConfig(method=name, dim=8, num_patches=16)} if cls.needs_checkpoint else {}
    r = create_reducer(name, 8 if cls.uses_budget else None, **kwargs).eval()  # a layer mean of 8 is within reach
    g = torch.Generator().manual_seed(0)
    d = Dims(batch=4, tokens=16, width=8, head_dim=4, feature_width=8, text=3, image=16)
    x = torch.randn(4, 16, 8, generator=g)
    sig = stand_ins(cls.needs, d, g)
    extra = r.extra_vision_tokens(4, 16, None)  # as if the encoder were the identity
    if extra is not None:
        sig["extra"] = extra.detach()
    key = torch.arange(4) * 7919
    at = {"depth": 4} if cls.site is Site.LLM else {}
    out = r(Tokens(x=x, grid=(4, 4), sample_key=key, **at, **sig))
    x2 = x.clone()
    x2[1] = torch.randn(16, 8, generator=g)
    out2 = r(Tokens(x=x2, grid=(4, 4), sample_key=key, **at, **sig))
    assert out.x.shape[0] == 4 and out.x.shape[-1] == 8
    assert out.x.shape[1] <= (8 if cls.uses_budget and cls.budget_unit == "kept" else 16)
    for i in (0, 2, 3):
        torch.testing.assert_close(out.x[i], out2.x[i])


@pytest.mark.parametrize("name", list_reducers())
def test_contract_a_method_that_sets_its_own_count_gives_an_example(name):
    """A method whose arguments can set its token count (`budget_label`) says how (`count_args_example`), and the
    example builds a reducer under that label; other methods have neither."""
    cls = methods.get_reducer_class(name)
    overridden = cls.budget_label.__func__ is not TokenReducer.budget_label.__func__
    assert overridden == bool(cls.count_args_example), f"{name}: budget_label and count_args_example go together"
    if overridden:
        assert cls.budget_label(cls.count_args_example) is not None and cls.budget_label({}) is None
        assert create_reducer(name, None, **cls.count_args_example).method_args.items() >= \
            cls.count_args_example.items()


@pytest.mark.parametrize("name", list_reducers())
def test_contract_capabilities_match_the_constructor(name):
    """`seeded` and `needs_checkpoint` are declared on the class and agree with the constructor's arguments."""
    cls = methods.get_reducer_class(name)
    params = inspect.signature(cls).parameters
    assert cls.seeded == ("seed" in params), f"{name}: a `seed` argument and `seeded = True` go together"
    assert cls.needs_checkpoint == ("checkpoint" in params), f"{name}: `checkpoint` and `needs_checkpoint` go together"


@pytest.mark.parametrize("name", list_reducers())
def test_contract_recorded_arguments_are_every_constructor_argument(name):
    """`create_reducer` records every argument the constructor received, defaults filled in, None left out: a
    changed argument changes `method_args` (and so the cell's fingerprint), without the method listing them."""
    cls = methods.get_reducer_class(name)
    kwargs = {"config": ControllerConfig(method=name, dim=8, num_patches=16)} if cls.needs_checkpoint else {}
    r = create_reducer(name, 4 if cls.uses_budget else None, **kwargs)
    expected = {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not None}
    expected.update({"budget": 4} if cls.uses_budget else {})
    expected.update({k: dataclasses.asdict(v) for k, v in kwargs.items()})
    assert r.method_args == {k: v for k, v in expected.items() if v is not inspect.Parameter.empty}
    json.dumps(r.method_args)  # it goes into a JSON column
    for arg, default in inspect.signature(cls).parameters.items():
        if isinstance(default.default, int) and not isinstance(default.default, bool) and arg != "budget":
            changed = create_reducer(name, 4 if cls.uses_budget else None, **kwargs, **{arg: default.default + 1})
            assert changed.method_args[arg] == default.default + 1


def test_recorded_arguments_of_fastv_and_prumerge_by_hand():
    assert create_reducer("fastv", 16).method_args == {"budget": 16, "layer": 2}
    assert create_reducer("fastv", None, ratio=0.5, layer=1).method_args == {"layer": 1, "ratio": 0.5}
    assert create_reducer("prumerge", "auto").method_args == {"budget": "auto", "neighbours": 32}
    assert create_reducer("random", 8, seed=3).method_args == {"budget": 8, "seed": 3}
    assert create_reducer("full").method_args == {}


@pytest.mark.parametrize("name", list_reducers())
def test_contract_a_budget_at_or_above_the_image_keeps_every_token(name):
    """Every method, at a budget equal to or above the image's 16 tokens, gives the LLM all 16 at every layer (a
    layer-averaged schedule lost one to rounding, DART kept pivots + per-pivot picks only, PruMerge added its extra
    token on top)."""
    from methods.llava import ReducedLlava  # noqa: PLC0415
    from tests.conftest import llava_runner, tiny_batch, tiny_llava  # noqa: PLC0415

    model = tiny_llava(llm_layers=4)
    ids, mask, pixels = tiny_batch(model, 2)
    cls = methods.get_reducer_class(name)
    kwargs = {"config": ControllerConfig(method=name, dim=32, num_patches=16)} if cls.needs_checkpoint else {}
    for budget in (16, 19):
        run = llava_runner(model, create_reducer(name, budget, **kwargs).eval())
        assert isinstance(run, ReducedLlava)
        trace = run.generate(ids, mask, pixels, 1).trace
        assert trace.visual_tokens.tolist() == [[16] * 4] * 2, (name, budget)


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
