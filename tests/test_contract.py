"""The registry's contracts, over every registered method and every model family that runs it (which follows from
the signals its adapter provides, methods/signals.py). A new method is covered here without editing this file:
tests/cases.py says how a method is built when its defaults cannot run on the test models, and the method's own
hand-computed cases go to tests/test_<name>.py."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch

from benchmarks.lmms_model import left_pad
from flops.analytic import count, model_shape
from flops.measured import flop_counter_macs, fvcore_prefill_macs
from flops.shapes import shape_record
from methods import create_reducer, get_reducer_class, list_reducers
from methods.adaptive import ControllerConfig
from methods.base import Site, TokenReducer, Tokens
from methods.families import LLAVA, QWEN, QWEN3
from methods.signals import Dims, stand_ins
from tests.cases import build, takes_budget
from tests.conftest import IMAGE_TOKEN, llava_runner, qwen_prompts, tiny_batch, tiny_llava, tiny_qwen, tiny_qwen3

FAMILIES = (LLAVA, QWEN, QWEN3)
RUNS = [pytest.param(f, m, id=f"{f.model_type}-{m}") for f in FAMILIES for m in list_reducers() if f.runs(m)]
QWEN_GRID = (1, 10, 14)  # 35 merged tokens, windows clipped at the edges


@pytest.fixture(scope="module")
def models() -> dict:
    """The test models of each family: a tiny LLaVA (grouped-query attention, 16 patches, 3 LLM layers), a tiny
    Qwen2.5-VL (2 vision blocks, one windowed; 2 LLM layers) and a tiny Qwen3-VL (the 8B's config, narrow: 4 vision
    blocks, 3 of them DeepStack taps, 4 LLM layers)."""
    return {LLAVA: tiny_llava(kv_heads=2, seed=1), QWEN: tiny_qwen(seed=1), QWEN3: tiny_qwen3(seed=1)}


def runner(family, model, reducer):
    """The family's adapter; on LLaVA one that hands `oracle` a fixed relevant-patch mask when a call gives none."""
    return llava_runner(model, reducer) if family is LLAVA else family.runner(model, reducer)


def one_prompt(family, model) -> tuple[tuple, int]:
    """One prompt's inputs for the adapter's `prefill`, and its image's visual tokens."""
    if family is LLAVA:
        return tiny_batch(model, 1, seed=5), 16
    return qwen_prompts(model, [QWEN_GRID], seed=2), 35


# ---------------------------------------------------------------------------------------------- the classes


def small_controller(name: str) -> ControllerConfig:
    """An untrained controller's shape for 16 tokens of width 8 (question tokens of width 8 where it reads them)."""
    text = 8 if "question" in get_reducer_class(name).needs else 0
    return ControllerConfig(method=name, dim=8, num_patches=16, text_dim=text)


@pytest.mark.parametrize("name", list_reducers())
def test_capabilities_match_the_constructor(name):
    """`seeded` and `needs_checkpoint` are declared on the class and agree with the constructor's arguments."""
    cls = get_reducer_class(name)
    params = inspect.signature(cls).parameters
    assert cls.seeded == ("seed" in params), f"{name}: a `seed` argument and `seeded = True` go together"
    assert cls.needs_checkpoint == ("checkpoint" in params), f"{name}: `checkpoint` and `needs_checkpoint` go together"


@pytest.mark.parametrize("name", list_reducers())
def test_recorded_arguments_are_every_constructor_argument(name):
    """`create_reducer` records every argument the constructor received, defaults filled in, None left out: a
    changed argument changes `method_args` (and so the cell's fingerprint), without the method listing them."""
    cls = get_reducer_class(name)
    kwargs = {"config": small_controller(name)} if cls.needs_checkpoint else {}
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


@pytest.mark.parametrize("name", list_reducers())
def test_a_method_that_sets_its_own_count_gives_an_example(name):
    """A method whose arguments can set its token count (`budget_label`) says how (`count_args_example`), and the
    example builds a reducer under that label; other methods have neither."""
    cls = get_reducer_class(name)
    overridden = cls.budget_label.__func__ is not TokenReducer.budget_label.__func__
    assert overridden == bool(cls.count_args_example), f"{name}: budget_label and count_args_example go together"
    if overridden:
        assert cls.budget_label(cls.count_args_example) is not None and cls.budget_label({}) is None
        assert create_reducer(name, None, **cls.count_args_example).method_args.items() >= \
            cls.count_args_example.items()


@pytest.mark.parametrize("name", list_reducers())
def test_batch_of_four_independent_samples_on_stand_in_signals(name):
    """Every reducer, at its site, on the stand-ins of its signals (methods/signals.py): shapes, budget, and one
    sample's output never depends on another's."""
    cls = get_reducer_class(name)
    kwargs = {"config": small_controller(name)} if cls.needs_checkpoint else {}
    r = create_reducer(name, 8 if cls.uses_budget else None, **kwargs).eval()  # a layer mean of 8 is within reach
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 8, generator=g)
    sig = stand_ins(cls.needs, Dims(batch=4, tokens=16, width=8, head_dim=4, feature_width=8, text=3, image=16,
                                    text_width=8), g)
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


# ---------------------------------------------------------------------------------------------- on each family


@pytest.mark.parametrize(("family", "name"), RUNS)
def test_every_method_has_a_working_case(models, family, name):
    """The method, built as tests/cases.py says, passes its family's checks on the test model; the rest of this file
    relies on it."""
    model = models[family]
    try:
        family.check_reducer(build(name, 6, model.config), family.layout(model.config))
    except (ValueError, NotImplementedError, TypeError) as e:
        pytest.fail(f"{name} cannot be built for the {family.name} test model ({e}); add a row for it to ARGS or "
                    "OWN_COUNT in tests/cases.py")


@pytest.mark.parametrize(("family", "name"), RUNS)
def test_batch_of_one_equals_batch_of_four_through_the_adapter(models, family, name):
    """Through the family's adapter: each sample's answer and kept tokens are the same alone as in a left-padded batch
    of four (of different lengths, and on Qwen2.5-VL of different image sizes), and the budget is honoured; so is the
    answer to a follow-up question of its own length asked on the pruned cache (`ask_again`)."""
    model = models[family]
    budget = 6
    run = runner(family, model, build(name, budget, model.config))
    if family is LLAVA:
        ids, mask, pixels = tiny_batch(model, 4, seed=11)
        grid, per_image, tokens = None, [0, 16, 32, 48, 64], [16] * 4
    else:
        grids = [(1, 8, 8), (1, 4, 8), (1, 8, 4), (1, 6, 6)]
        ids, mask, pixels, grid = qwen_prompts(model, grids, seed=3)
        per_image = [0, *grid.prod(-1).cumsum(0).tolist()]
        tokens = (grid.prod(-1) // 4).tolist()  # 16, 8, 8, 9

    def generate(rows: slice, keep: torch.Tensor):
        images = pixels[rows] if grid is None else pixels[per_image[rows.start]:per_image[rows.stop]]
        extra = () if grid is None else (grid[rows],)
        return run.generate(ids[rows][:, keep], mask[rows][:, keep], images, *extra, 3, eos_token_id=None,
                            keep_state=True)

    g = torch.Generator().manual_seed(12)
    follow = [[int(t) for t in torch.randint(6, 59, (2 + i,), generator=g)] for i in range(4)]  # text ids of both

    def ask(gen, rows: list[int]):  # each sample's follow-up after its last answer token, left-padded
        chunk, chunk_mask = left_pad([[int(gen.tokens[j, -1])] + follow[i] for j, i in enumerate(rows)], 0)
        return run.ask_again(gen.state, chunk, chunk_mask, 2)

    with torch.no_grad():
        four = generate(slice(0, 4), mask.any(0))
        again = ask(four, [0, 1, 2, 3])
        for i in range(4):
            one = generate(slice(i, i + 1), mask[i].bool())
            assert one.tokens[0].tolist() == four.tokens[i].tolist(), i
            assert one.trace.sample(0, tokens[i])["kept_indices"] == four.trace.sample(i, tokens[i])["kept_indices"], i
            assert ask(one, [i]).tokens[0].tolist() == again.tokens[i].tolist(), i
    seen = four.trace.visual_tokens.float()  # (4, LLM layers) visual tokens entering each layer
    limit = torch.tensor(tokens, dtype=torch.float).clamp(max=budget)
    if not takes_budget(name):
        assert (seen <= torch.tensor(tokens).unsqueeze(1)).all()
    elif run.reducer.budget_unit == "layer_mean":
        assert (seen.mean(1) <= limit).all(), seen
    else:
        assert (seen[:, -1] <= limit).all(), seen


@pytest.mark.parametrize(("family", "name"), RUNS)
def test_analytic_flops_equal_fvcore_and_flop_counter(models, family, name):
    """The FLOPs counter's analytic prefill MACs, from the token trace, equal fvcore's and FlopCounterMode's on the
    real computation, at a small and a large budget and `auto` where the method has it."""
    model = models[family]
    inputs, n = one_prompt(family, model)
    budgets = (3, 9, "auto") if get_reducer_class(name).supports_auto else (3, 9)
    for budget in budgets:
        run = runner(family, model, build(name, budget, model.config))
        with torch.no_grad():
            measured, state = flop_counter_macs(lambda run=run: run.prefill(*inputs))
            traced = fvcore_prefill_macs(run, *inputs)
        analytic = count(state.trace.sample(0, n), model_shape(model.config)).prefill
        assert analytic == measured == traced, budget


@pytest.mark.parametrize(("family", "name"), RUNS)
def test_shape_only_record_equals_the_real_trace(models, family, name):
    """`flops.shapes.shape_record` (no weights: the signals' stand-ins) gives the token counts and reducer MACs of a
    real run."""
    model = models[family]
    inputs, n = one_prompt(family, model)
    reducer = build(name, 6, model.config)
    with torch.no_grad():
        rec = runner(family, model, reducer).prefill(*inputs).trace.sample(0, n)
    ids, mask = inputs[0], inputs[1]
    last_image = int((ids[0] == (IMAGE_TOKEN if family is LLAVA else model.config.image_token_id)).nonzero()[-1])
    after = ids.size(1) - 1 - last_image  # the text after the image (no padding)
    shaped = shape_record(model.config, reducer, text_tokens=int(mask.sum()) - n, text_after=after,
                          image_grid=None if family is LLAVA else QWEN_GRID)
    assert {k: rec[k] for k in shaped if k != "generated_tokens"} == {
        k: v for k, v in shaped.items() if k != "generated_tokens"}


@pytest.mark.parametrize("name", [m for m in list_reducers() if LLAVA.runs(m)])
def test_a_budget_at_or_above_the_image_keeps_every_token(name):
    """Every method, at a budget equal to or above the image's 16 tokens, gives the LLM all 16 at every layer (a
    layer-averaged schedule lost one to rounding, DART kept pivots + per-pivot picks only, PruMerge added its extra
    token on top)."""
    model = tiny_llava(llm_layers=4)
    ids, mask, pixels = tiny_batch(model, 2)
    cls = get_reducer_class(name)
    kwargs = {"config": LLAVA.controller_config(LLAVA.layout(model.config), name)} if cls.needs_checkpoint else {}
    for budget in (16, 19):
        trace = llava_runner(model, create_reducer(name, budget, **kwargs).eval()).generate(ids, mask, pixels, 1).trace
        assert trace.visual_tokens.tolist() == [[16] * 4] * 2, (name, budget)
