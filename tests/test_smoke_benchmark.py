"""The committed smoke model on the synthetic benchmark: every method is batch-invariant, budgets are exact."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from benchmarks.defaults import SMOKE_MODEL
from benchmarks.plan import Cell, RunSpec, make_reducer
from benchmarks.tasks.synthetic.generate import SPLIT_SEEDS, generate_sample
from benchmarks.tasks.synthetic.tasks.utils import doc_to_text
from methods.llava import ReducedLlava, llava_prompt, load_llava

pytestmark = pytest.mark.slow  # every method on the committed smoke model, batch 1 against batch 4

METHODS = RunSpec().methods  # every method that can run on the smoke model (learned ones need its controllers)


@pytest.fixture(scope="module")
def smoke():
    model, processor = load_llava(SMOKE_MODEL)
    samples = [generate_sample(SPLIT_SEEDS["test"], i) for i in range(12)]
    prompts = [llava_prompt(processor, doc_to_text({"question": s.question})) for s in samples]
    inputs = processor(images=[Image.fromarray(s.image) for s in samples], text=prompts, return_tensors="pt",
                       padding=True)
    relevant = torch.zeros(len(samples), 144, dtype=torch.bool)  # each question's relevant patches (`oracle`)
    for i, s in enumerate(samples):
        relevant[i, s.relevant_patches] = True
    inputs["relevant"] = relevant
    return model, processor, inputs


# A layer-averaged budget has a floor: every token runs until the first stage (SparseVLM's before layer 1, PyramidDrop's
# before layer 3 of the 12-layer smoke LLM: 14.5 and 36.8 of 144)
BUDGETS = {"full": 144, "prumerge": "auto", "sparsevlm": 72, "pdrop": 48}


@pytest.mark.parametrize("method", METHODS)
def test_predictions_identical_at_batch_1_and_4(smoke, method):
    model, processor, inputs = smoke
    n = 144
    budget = BUDGETS.get(method, 36)
    run = ReducedLlava(model, make_reducer(Cell("synth_vqa", method, budget), RunSpec()))
    eos = model.generation_config.eos_token_id

    def generate(rows):
        ids, mask = inputs["input_ids"][rows], inputs["attention_mask"][rows]
        keep = mask.any(0)  # drop columns that are padding for every row of this batch
        extra = {"relevant": inputs["relevant"][rows]} if "relevant" in run.reducer.needs else {}
        return run.generate(ids[:, keep], mask[:, keep], inputs["pixel_values"][rows], 4, eos_token_id=eos, **extra)

    ones = [generate(slice(i, i + 1)) for i in range(12)]
    fours = [generate(slice(i, i + 4)) for i in range(0, 12, 4)]
    for i, one in enumerate(ones):
        four = fours[i // 4]
        length = int(one.lengths[0])
        assert one.tokens[0, :length].tolist() == four.tokens[i % 4, :length].tolist()
        assert one.trace.sample(0, n)["kept_indices"] == four.trace.sample(i % 4, n)["kept_indices"]
        if budget not in (n, "auto") and run.reducer.budget_unit == "layer_mean":
            assert one.trace.visual_tokens[0].float().mean() <= budget
        elif budget not in (n, "auto"):
            assert one.trace.visual_tokens[0, -1] == budget


@pytest.fixture(scope="module")
def smoke_bf16(smoke):
    return load_llava(SMOKE_MODEL, dtype="bfloat16")[0], smoke[2]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_in_bfloat16(smoke_bf16, method):
    """bfloat16 on the CPU, every registered method (the learned controllers stay float32 and score the model's
    bfloat16 features): it runs, honours its budget and gives finite logits."""
    model, inputs = smoke_bf16
    assert model.dtype == torch.bfloat16
    budget = BUDGETS.get(method, 36)
    run = ReducedLlava(model, make_reducer(Cell("synth_vqa", method, budget), RunSpec()))
    rows = slice(0, 4)
    extra = {"relevant": inputs["relevant"][rows]} if "relevant" in run.reducer.needs else {}
    gen = run.generate(inputs["input_ids"][rows], inputs["attention_mask"][rows], inputs["pixel_values"][rows], 3,
                       eos_token_id=model.generation_config.eos_token_id, **extra)
    assert torch.isfinite(gen.first_logits).all() and (gen.lengths >= 1).all()
    if budget not in (144, "auto") and run.reducer.budget_unit != "layer_mean":
        assert gen.trace.visual_tokens[:, -1].tolist() == [budget] * 4
