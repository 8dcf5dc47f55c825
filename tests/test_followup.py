"""Prune once, ask again (issue 38, the adapters' part): a follow-up turn prefilled on top of the cache a first turn's
answer left equals, for `full`, one prefill of the whole two-turn conversation, on both families, at batch 1 and on a
left-padded batch whose answers and follow-ups differ in length."""

from __future__ import annotations

import pytest
import torch

from benchmarks.lmms_model import left_pad
from flops.analytic import follow_up, kv_cache_bytes, model_shape
from flops.measured import flop_counter_macs
from methods import create_reducer
from methods.llava import ReducedLlava
from methods.qwen import ReducedQwen
from tests.cases import build
from tests.conftest import llava_runner, qwen_prompts, tiny_batch, tiny_llava, tiny_qwen

ANSWER, FOLLOW_UP = 4, 6  # first answer's tokens at most; the follow-up's tokens (before each sample's own offset)


def case(family: str, batch: int):
    """(runner of `full`, the first turn's inputs, a function giving the inputs with other ids and mask, the range of
    text ids safe to draw)."""
    if family == "llava":
        model = tiny_llava(seed=1)
        ids, mask, pixels = tiny_batch(model, batch, seed=0)
        return ReducedLlava(model, create_reducer("full")), (ids, mask, pixels), lambda i, m: (i, m, pixels), (6, 96)
    model = tiny_qwen(seed=3)
    grids = [(1, 8, 8), (1, 6, 10)][:batch]
    ids, mask, pixels, grid = qwen_prompts(model, grids, seed=4)
    return (ReducedQwen(model, create_reducer("full")), (ids, mask, pixels, grid),
            lambda i, m: (i, m, pixels, grid), (3, 59))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_a_follow_up_on_the_cache_equals_one_prefill_of_both_turns(family, batch):
    run, inputs, with_ids, (lo, hi) = case(family, batch)
    ids, mask = inputs[0], inputs[1]
    first = run.generate(*inputs, max_new_tokens=ANSWER, keep_state=True)
    assert run.generate(*inputs, max_new_tokens=1).state is None  # freed unless asked for
    if batch > 1:  # an end-of-sequence id that ends the answers at different lengths: padding inside the cache
        eos = next(t for t in first.tokens.flatten().tolist()
                   if len({row.index(t) if t in row else ANSWER for row in first.tokens.tolist()}) > 1)
        first = run.generate(*inputs, max_new_tokens=ANSWER, eos_token_id=eos, keep_state=True)
    g = torch.Generator().manual_seed(9)
    prompts = [ids[i][mask[i].bool()].tolist() for i in range(batch)]
    answers = [first.tokens[i, : int(first.lengths[i])].tolist() for i in range(batch)]
    follow = [torch.randint(lo, hi, (FOLLOW_UP + 2 * i,), generator=g).tolist() for i in range(batch)]
    assert batch == 1 or len(set(map(len, answers))) > 1  # batch 2: the answers differ in length
    # the follow-up's text starts with the last answer token, which decoding produced but never fed
    chunk, chunk_mask = left_pad([a[-1:] + f for a, f in zip(answers, follow, strict=True)], 0)
    second = run.ask_again(first.state, chunk, chunk_mask, max_new_tokens=3)
    whole, whole_mask = left_pad([p + a + f for p, a, f in zip(prompts, answers, follow, strict=True)], 0)
    once = run.generate(*with_ids(whole, whole_mask), max_new_tokens=3)
    torch.testing.assert_close(second.first_logits, once.first_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(second.tokens, once.tokens)
    third, third_mask = left_pad([a[-1:] for a in second.tokens[:, :1].tolist()], 0)  # and once more: a third turn
    assert run.ask_again(second.state, third, third_mask, max_new_tokens=1).tokens.shape == (batch, 1)


@pytest.mark.parametrize("method", ["full", "fastv", "divprune", "pdrop"])
@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_a_follow_ups_analytic_macs_equal_the_flop_counter(family, method):
    """The follow-up turn's MACs (`flops.analytic.follow_up`: its chunk over every cached key of each layer, lm_head,
    its own decode steps) equal FlopCounterMode's around `ask_again`, after first turns that kept different counts
    per layer (FastV from layer 2, PyramidDrop per stage); the cache then holds what the count assumes, and
    `kv_cache_bytes` with the follow-up gives its size."""
    if family == "llava":
        model = tiny_llava(attn="eager", kv_heads=2, seed=2)
        inputs, n = tiny_batch(model, 1, seed=6), 16
    else:
        model = tiny_qwen(seed=2, attn="eager")
        inputs, n = qwen_prompts(model, [(1, 8, 12)], seed=3), 24
    reducer = build(method, 5, model.config)
    run = llava_runner(model, reducer) if family == "llava" else ReducedQwen(model, reducer)
    first = run.generate(*inputs, max_new_tokens=3, eos_token_id=None, keep_state=True)
    chunk = torch.tensor([[int(first.tokens[0, -1]), 7, 8, 9, 10]])
    measured, second = flop_counter_macs(lambda: run.ask_again(first.state, chunk, torch.ones_like(chunk), 4))
    rec = first.trace.sample(0, n)
    assert (rec["generated_tokens"], int(second.trace.generated_tokens[0])) == (3, 4)  # each turn its own answer
    assert measured == follow_up(rec, model_shape(model.config), tokens=5, generated=4).total
    cached = [c + 2 + 5 + 3 for c in rec["llm_tokens_per_layer"]]  # 2 answer tokens fed, the chunk, 3 decode steps
    layers = second.state.cache.layers
    assert [layer.keys.size(2) for layer in layers] == cached
    held = sum(layer.keys.numel() + layer.values.numel() for layer in layers) * 4  # float32
    assert kv_cache_bytes(rec, model_shape(model.config), 4, follow_ups=((5, 4),)) == held
