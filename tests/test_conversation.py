"""Prune once, ask again (issue 38), the runner's part: the two-turn synthetic task, lmms-eval's multi-round protocol
served by `reduced_vlm` in both modes, every registered method batch-invariant through it, both turns priced, and
the mode as part of the cell."""

from __future__ import annotations

import csv
import io
import json
from functools import partial

import pytest
import torch
from lmms_eval.api.instance import Instance
from PIL import Image

import run_bench
from benchmarks.lmms_model import ReducedLMM
from benchmarks.records import Recorder
from benchmarks.store import read_samples
from benchmarks.tasks.synthetic.followup import LOOKUPS, generate_followup
from benchmarks.tasks.synthetic.generate import make_samples
from benchmarks.tasks.synthetic.scenes import cell_of
from benchmarks.tasks.synthetic.tasks import followup_utils
from benchmarks.tasks.synthetic.tasks.utils import doc_to_visual
from flops.analytic import conversation_kv_bytes, count, follow_up, model_shape
from methods import TokenReducer, list_reducers
from tests.cases import build

# ------------------------------------------------------------------ the task


def test_each_turn_asks_about_its_own_uniquely_named_tile():
    kinds = set()
    for i in range(60):
        s = generate_followup(33, i)
        turns = [{"question": s.question, "answer": s.answer, "qtype": s.qtype,
                  "relevant_patches": s.relevant_patches}, *s.follow_ups]
        assert len(turns) == 2 and turns[0]["relevant_patches"] != turns[1]["relevant_patches"]
        kinds.add((turns[0]["qtype"], turns[1]["qtype"]))
        for t in turns:
            (cell,) = t["relevant_patches"]
            (tile,) = [o for o in s.objects if cell_of(o) == cell]
            if t["qtype"] == "color":  # named by its shape: the only tile of that shape
                assert t["answer"] == tile.color and sum(o.shape == tile.shape for o in s.objects) == 1
            else:  # named by its colour
                assert sum(o.color == tile.color for o in s.objects) == 1
                assert t["answer"] == (tile.shape if t["qtype"] == "shape" else
                                       "left" if cell % 12 < 5 else "right")
                assert t["qtype"] == "shape" or cell % 12 < 5 or cell % 12 >= 7
    assert kinds == {(a, b) for a in LOOKUPS for b in LOOKUPS}  # all nine pairs of lookups


def test_the_task_follows_lmms_evals_multi_round_protocol():
    doc = make_samples("test", 1, gen=followup_utils.SYNTH_SCENES_FOLLOWUP)[0]
    kw = {"pre_prompt": "", "post_prompt": " !"}
    assert followup_utils.doc_to_text(doc, kw) == doc["question"] + " !"
    visuals, text, terminal, so_far, _ = followup_utils.doc_to_text(doc, kw, previous_output=["a"], round_idx=1)
    assert (visuals, text, terminal, so_far) == (None, doc["follow_ups"][0]["question"] + " !", False, ["a"])
    assert followup_utils.doc_to_text(doc, kw, previous_output=["a", "b"], round_idx=2)[2:4] == (True, ["a", "b"])
    second = doc["follow_ups"][0]["answer"]
    assert followup_utils.process_results(doc, [[doc["answer"], second.upper() + "."]]) == {
        "exact_match_turn1": 1.0, "exact_match_turn2": 1.0}
    assert followup_utils.process_results(doc, [["no"]]) == {"exact_match_turn1": 0.0, "exact_match_turn2": None}


# ------------------------------------------------------------------ the model: every method, both modes


@pytest.fixture(scope="module", params=["llava", "qwen", "qwen3"])
def lm(request):
    """The model of each family (a tiny random checkpoint folder), through lmms-eval's model class, with a task of
    four conversations."""
    ckpt = request.getfixturevalue({"llava": "tiny_ckpt", "qwen": "qwen_ckpt", "qwen3": "qwen3_ckpt"}[request.param])
    out = ReducedLMM(pretrained=str(ckpt), method="full", batch_size=1)
    docs = make_samples("test", 4, gen=followup_utils.SYNTH_SCENES_FOLLOWUP)
    for d in docs:
        d["image"] = Image.open(io.BytesIO(d["image"]["bytes"]))
    out.task_dict = {"fu": {"test": docs}}
    return out


def requests(n: int = 4) -> list[Instance]:
    kw = {"pre_prompt": "", "post_prompt": ""}
    to_text = partial(followup_utils.doc_to_text, lmms_eval_specific_kwargs=kw)
    docs = make_samples("test", n, gen=followup_utils.SYNTH_SCENES_FOLLOWUP)
    return [Instance(request_type="generate_until_multi_round", idx=0,
                     metadata={"task": "fu", "doc_id": i, "repeats": 1},
                     arguments=(to_text(docs[i]), {"max_new_tokens": 3}, doc_to_visual, to_text, i, "fu", "test"))
            for i in range(n)]


def converse(lm, method: str | TokenReducer, mode: str, batch: int) -> tuple[list, dict]:
    lm.batch_size, rec = batch, Recorder()
    reducer = build(method, 16, lm.model.config) if isinstance(method, str) else method
    with lm.cell(reducer, rec, None, mode):
        answers = lm.generate_until_multi_round(requests())
    return answers, rec.samples


@pytest.mark.parametrize("mode", ["prune-once", "re-prune"])
@pytest.mark.parametrize("method", list_reducers())
def test_every_method_converses_alike_at_batch_1_and_4(lm, method, mode):
    """Both turns' answers, the first turn's trace and every later turn's record are those of the sample alone (on
    Qwen2.5-VL too: positions and M-RoPE positions continue from what each sample's cache holds)."""
    if not lm.family.runs(method):
        pytest.skip(f"{lm.family.name} does not run {method}")
    reducer = build(method, 16, lm.model.config)  # once: a learned method's stand-in controller is drawn at random
    one, rec_one = converse(lm, reducer, mode, 1)
    four, rec_four = converse(lm, reducer, mode, 4)
    assert one == four and all(len(a) == 2 for a in one)
    strip = ("prefill_ms", "decode_ms_per_token", "reducer_ms", "follow_up_prefill_ms")
    for key, rec in rec_one.items():
        mine, theirs = ({k: v for k, v in r.items() if k not in strip} for r in (rec, rec_four[key]))
        assert json.dumps(mine, sort_keys=True) == json.dumps(theirs, sort_keys=True)
        assert rec["conversation"] == mode and len(rec["follow_ups"]) == 1
        turn = rec["follow_ups"][0]
        # prune once: the second turn's text on the cache; re-prune: a whole prefill of its own, reduced again
        assert ("llm_tokens_per_layer" in turn) == (mode == "re-prune")


@pytest.mark.parametrize("method", ["full", "divprune"])
def test_what_does_not_read_the_question_answers_the_same_in_both_modes(lm, method):
    """With nothing pruned, or a selection made before the LLM from the image alone (DivPrune keeps the same tokens
    whatever the text), the follow-up on the cache is the whole conversation prefilled once: the same answers; the
    cache after turn 2 holds the same tokens either way, and re-prune pays a second prefill over all of them."""
    once, rec_once = converse(lm, method, "prune-once", 2)
    again, rec_again = converse(lm, method, "re-prune", 2)
    assert once == again
    shape = model_shape(lm.model.config)
    for key, a in rec_once.items():
        b = rec_again[key]
        assert conversation_kv_bytes(a, shape, 4) == conversation_kv_bytes(b, shape, 4)
        t, g = a["follow_ups"][0]["tokens"], a["follow_ups"][0]["generated_tokens"]
        assert b["follow_ups"][0]["generated_tokens"] == g
        whole = b["follow_ups"][0]["llm_tokens_per_layer"][0]  # the re-prefilled conversation
        assert whole == a["llm_tokens_per_layer"][0] + a["generated_tokens"] - 1 + t
        assert follow_up(a, shape, t, g).llm_prefill < count(b["follow_ups"][0], shape).llm_prefill


def test_a_round_that_brings_images_is_refused(lm):
    req = requests(1)[0]
    args = list(req.args)
    args[3] = lambda doc, **kw: ([Image.new("RGB", (8, 8))], "q", False, kw["previous_output"], None)
    req.arguments = tuple(args)
    with lm.cell(build("full", 16, lm.model.config), Recorder(), None), pytest.raises(ValueError, match="round 1 "
                                                                                       "brings images"):
        lm.generate_until_multi_round([req])


# ------------------------------------------------------------------ the runner


def read(out):
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    samples = read_samples(out)
    with open(out / "comparisons.csv") as f:
        comparisons = list(csv.DictReader(f))
    return rows, samples, comparisons


@pytest.mark.slow
def test_a_sweep_runs_each_conversation_mode_as_a_cell_of_its_own(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", str(tiny_ckpt), "--tasks", "synth_scenes_followup", "--methods", "full", "fastv",
            "--budgets", "16", "--method-args", "fastv.layer=1", "--limit", "6", "--batch-size", "4", "--output",
            str(out)]
    assert run_bench.main(argv) == 0
    rows, samples, comparisons = read(out)
    primary = {(r["method"], r["conversation"]): r for r in rows if r["primary"] == "True"}
    assert set(primary) == {(m, c) for m in ("full", "fastv") for c in ("prune-once", "re-prune")}
    assert {r["metric"] for r in rows} == {"exact_match_turn1", "exact_match_turn2"}
    assert all(r["metric"] == "exact_match_turn2" for r in primary.values())
    assert len({r["cell_id"] for r in primary.values()}) == 4  # the mode is part of each cell's identity
    by = {(s["method"], s["conversation"], s["doc_id"]): s for s in samples}
    for d in range(6):
        assert by[("full", "prune-once", d)]["prediction"] == by[("full", "re-prune", d)]["prediction"]
        once, again = by[("fastv", "prune-once", d)], by[("fastv", "re-prune", d)]
        assert once["prefill_gflops"] == again["prefill_gflops"]  # turn 1 is the same computation
        assert once["follow_up_gflops"] < again["follow_up_gflops"]  # a second prefill costs what it is
        assert again["total_gflops"] > again["prefill_gflops"] + again["follow_up_gflops"]  # both turns, decoding too
    kinds = {(c["method"], c["conversation"], c["reference_kind"]) for c in comparisons}
    assert ("fastv", "prune-once", "re-prune") in kinds and ("fastv", "re-prune", "full") in kinds
    assert "synth_scenes_followup (re-prune)" in capsys.readouterr().out
    for mode in ("prune-once", "re-prune"):  # each mode a figure of its own, priced over both turns
        assert (out / f"accuracy_vs_flops_synth_scenes_followup.{mode}.png").is_file()
    assert run_bench.main(argv) == 0  # every cell kept: nothing computed again
    assert "4 of 4 cells already in" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_a_follow_ups_prefill_macs_equal_fvcore(family):
    """The analytic price of the second turn's prefill (`flops.analytic.follow_up`) equals fvcore's count of it,
    after a first turn that pruned inside the LLM (FastV: fewer keys cached from layer 2)."""
    from flops.measured import fvcore_follow_up_macs  # noqa: PLC0415
    from methods.qwen import ReducedQwen  # noqa: PLC0415
    from tests.conftest import llava_runner, qwen_prompts, tiny_batch, tiny_llava, tiny_qwen  # noqa: PLC0415

    if family == "llava":
        model = tiny_llava(attn="sdpa", kv_heads=2, seed=2)
        inputs = tiny_batch(model, 1, seed=6)
    else:
        model = tiny_qwen(seed=2)
        inputs = qwen_prompts(model, [(1, 8, 12)], seed=3)
    reducer = build("fastv", 5, model.config)
    run = llava_runner(model, reducer) if family == "llava" else ReducedQwen(model, reducer)
    first = run.generate(*inputs, max_new_tokens=3, eos_token_id=None, keep_state=True)
    chunk = torch.tensor([[int(first.tokens[0, -1]), 7, 8, 9, 10]])
    rec = first.trace.sample(0, 16 if family == "llava" else 24)
    macs = fvcore_follow_up_macs(run, first.state, chunk, torch.ones_like(chunk))
    assert macs == follow_up(rec, model_shape(model.config), tokens=5, generated=1).prefill
