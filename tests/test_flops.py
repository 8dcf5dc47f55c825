"""The analytic counter: hand-computed numbers, and agreement with torch's FlopCounterMode on real runs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flops.analytic import ModelShape, count, llm_layer_macs, vision_layer_macs
from methods import create_reducer
from methods.llava import ReducedLlava
from tests.conftest import tiny_batch, tiny_llava


def test_layer_formulas_by_hand():
    s = ModelShape(num_patches=16, vision_width=4, vision_mlp=8, vision_channels=3, patch=2, feature_layers=1,
                   width=8, mlp=16, kv_width=4, layers=2, vocab=10)
    assert vision_layer_macs(3, s) == 4 * 3 * 16 + 2 * 9 * 4 + 2 * 3 * 4 * 8
    assert llm_layer_macs(5, s) == 2 * 5 * 64 + 2 * 5 * 8 * 4 + 2 * 25 * 8 + 3 * 5 * 8 * 16


@pytest.mark.parametrize("method,budget,kw", [("full", None, {}), ("fastv", 3, {"layer": 1}), ("random", 5, {})])
def test_analytic_prefill_equals_flop_counter(method, budget, kw):
    model = tiny_llava(attn="eager", kv_heads=2, seed=1)
    ids, mask, pixels = tiny_batch(model, 1, seed=5)
    run = ReducedLlava(model, create_reducer(method, budget, **kw))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        state = run.prefill(ids, mask, pixels)
    rec = state.trace.sample(0, 16)
    rec["generated_tokens"] = 1
    macs = count(rec, ModelShape.from_config(model.config))
    measured = fc.get_total_flops() / 2
    # FastV's ranking row (one query against the cached keys) is the reducer's own work, not in the analytic count
    assert macs.prefill == pytest.approx(measured, rel=0.01)
    if method == "full":
        assert macs.prefill == measured


@pytest.mark.parametrize("method,budget,kw", [("full", None, {}), ("fastv", 3, {"layer": 2})])
def test_analytic_decode_equals_flop_counter_around_generate(method, budget, kw):
    model = tiny_llava(attn="eager", kv_heads=2, seed=2)
    ids, mask, pixels = tiny_batch(model, 1, seed=6)
    run = ReducedLlava(model, create_reducer(method, budget, **kw))
    with FlopCounterMode(display=False) as fc:
        gen = run.generate(ids, mask, pixels, max_new_tokens=5, eos_token_id=None)
    rec = gen.trace.sample(0, 16)
    assert rec["generated_tokens"] == 5
    macs = count(rec, ModelShape.from_config(model.config))
    assert macs.total == pytest.approx(fc.get_total_flops() / 2, rel=0.005)
