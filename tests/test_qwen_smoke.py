"""The committed Qwen2.5-VL smoke model (issue 18) on the synthetic benchmark: every method that runs on the family
is batch-invariant on it and keeps its budget; its card's numbers are its eval.json's, and methods separate on it."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from benchmarks.defaults import QWEN_SMOKE_MODEL, controllers
from benchmarks.plan import Cell, RunSpec, make_plan, make_reducer
from benchmarks.tasks.synthetic.generate import SPLIT_SEEDS, generate_sample
from benchmarks.tasks.synthetic.tasks.utils import doc_to_text
from methods import create_reducer, get_reducer_class, list_reducers
from methods.adaptive import ControllerConfig
from methods.families import QWEN
from methods.qwen import ReducedQwen, qwen_prompt

pytestmark = pytest.mark.slow  # every method on the committed Qwen2.5-VL smoke model

BUDGETS = {"full": 1.0, "pdrop": 0.333, "sparsevlm": 0.5}  # the layer-averaged ones at what 3 layers can reach
PER_IMAGE = 144  # every 96 px image: 24 x 24 patches, 144 merged tokens

QWEN_METHODS = [m for m in list_reducers() if QWEN.runs(m)]  # what its adapter provides for


@pytest.fixture(scope="module")
def smoke():
    model, processor = QWEN.load(QWEN_SMOKE_MODEL)
    samples = [generate_sample(SPLIT_SEEDS["test"], i) for i in range(12)]
    prompts = [qwen_prompt(processor, doc_to_text({"question": s.question})) for s in samples]
    inputs = processor(images=[Image.fromarray(s.image) for s in samples], text=prompts, return_tensors="pt",
                       padding=True)
    return model, processor, inputs


def test_the_smoke_sweep_plans_every_qwen_method():
    plan = make_plan(RunSpec(model=QWEN_SMOKE_MODEL, tasks=("synth_vqa",)))
    assert plan.family is QWEN and {c.method for c in plan.cells} <= set(QWEN_METHODS)
    assert {"full", "random", "divprune", "fastv", "dart", "pdrop"} <= {c.method for c in plan.cells}


def reducer_for(method: str, budget: float):
    """The smoke sweep's reducer; a learned method without a committed controller gets an untrained one of the
    model's shape (batch invariance and budgets are the mechanism's, not the weights')."""
    spec = RunSpec(model=QWEN_SMOKE_MODEL)
    if get_reducer_class(method).needs_checkpoint and not controllers(QWEN_SMOKE_MODEL, method):
        text = 128 if "question" in get_reducer_class(method).needs else 0  # the LLM's width, for adaptive_q
        return create_reducer(method, budget, config=ControllerConfig(method, dim=128, num_patches=None,
                                                                      text_dim=text)).eval()
    return make_reducer(Cell("synth_vqa", method, budget), spec)


@pytest.mark.parametrize("method", QWEN_METHODS)
def test_predictions_identical_at_batch_1_and_4(smoke, method):
    model, processor, inputs = smoke
    budget = BUDGETS.get(method, 0.25)
    run = ReducedQwen(model, reducer_for(method, budget))
    eos = [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    patches = 4 * PER_IMAGE

    def generate(lo, hi):
        ids, mask = inputs["input_ids"][lo:hi], inputs["attention_mask"][lo:hi]
        keep = mask.any(0)  # drop columns that are padding for every row of this batch
        return run.generate(ids[:, keep], mask[:, keep], inputs["pixel_values"][lo * patches:hi * patches],
                            inputs["image_grid_thw"][lo:hi], 3, eos_token_id=eos)

    ones = [generate(i, i + 1) for i in range(12)]
    fours = [generate(i, i + 4) for i in range(0, 12, 4)]
    for i, one in enumerate(ones):
        four = fours[i // 4]
        n = int(one.lengths[0])
        assert one.tokens[0, :n].tolist() == four.tokens[i % 4, :n].tolist()
        assert one.trace.sample(0, PER_IMAGE)["kept_indices"] == four.trace.sample(i % 4, PER_IMAGE)["kept_indices"]
        count = int(budget * PER_IMAGE)
        if run.reducer.budget_unit == "layer_mean" and method != "full":
            assert one.trace.visual_tokens[0].float().mean() <= count
        elif method != "full":
            assert one.trace.visual_tokens[0, -1] == count


def test_card_reports_eval_json_and_methods_separate():
    results = json.loads((QWEN_SMOKE_MODEL / "eval.json").read_text())
    card = (QWEN_SMOKE_MODEL / "MODEL_CARD.md").read_text()
    for name, r in results.items():
        assert f"| {name} | {r['overall']:.3f} |" in card
    assert results["full"]["overall"] - results["random_16"]["overall"] >= 0.15
