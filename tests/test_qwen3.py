"""Qwen3-VL (`ReducedQwen3`): DeepStack, per-head q/k norms and interleaved M-RoPE, on random models of the real
8B config cut in depth and width."""

from __future__ import annotations

import pytest
import torch

import run_bench
from benchmarks.store import read_samples
from flops.analytic import count, model_shape
from flops.measured import flop_counter_macs, fvcore_prefill_macs
from flops.shapes import load_config
from methods import create_reducer
from methods.families import QWEN3
from methods.qwen import ReducedQwen3
from methods.trace import QwenLayout
from tests.conftest import hf_answers, qwen_prompts, tiny_qwen3


@pytest.mark.parametrize("grids", [[(1, 4, 4)], [(1, 4, 4), (1, 6, 4)]], ids=["batch1", "padded2"])
def test_full_equals_hf_generate(grids):
    model = tiny_qwen3(seed=len(grids))
    ids, mask, pixels, grid = qwen_prompts(model, grids, seed=3)
    gen = ReducedQwen3(model, create_reducer("full")).generate(ids, mask, pixels, grid, max_new_tokens=6)
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                            mm_token_type_ids=(ids == model.config.image_token_id).int(), max_new_tokens=6,
                            do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.size(1):]
    assert gen.tokens.tolist() == hf.tolist()
    assert len({tuple(r) for r in gen.tokens.tolist()}) == len(grids) or len(grids) == 1  # the samples differ


def test_layout():
    lay = QwenLayout.from_config(load_config("qwen3-vl-8b"))
    assert (lay.patch_size, lay.merge, lay.vision_layers, lay.deepstack) == (16, 2, 27, (8, 16, 24))
    assert lay.full_attention_blocks == tuple(range(27)) and (lay.llm_layers, lay.width) == (36, 4096)


def hf_kept_logits(model, ids, pixels, grid, kept: torch.Tensor, wrong_level: int | None = None) -> torch.Tensor:
    """The restatement: HF's own language model run on the prompt with only the `kept` image tokens (indices into
    the image's tokens), their M-RoPE positions from `get_rope_index` on the whole prompt, and every DeepStack level
    gathered at the same indices; the last position's logits. `wrong_level`: that level's rows taken as the first
    len(kept) rows instead (a level not gathered with the others), for the test to show it would fail."""
    m = model.model
    with torch.no_grad():
        out = m.get_image_features(pixel_values=pixels, image_grid_thw=grid)
        feats, levels = out.pooler_output[0], [level[0] for level in out.deepstack_features]
        img = ids[0] == model.config.image_token_id
        pos, _ = m.get_rope_index(ids, img[None].int(), image_grid_thw=grid)  # (3, 1, T)
        x = m.language_model.embed_tokens(ids[0].masked_fill(img, 0))
        x[img] = feats
        nth = torch.cumsum(img.long(), 0) - 1
        keep = ~img | torch.isin(nth, kept)  # text, and the kept image tokens
        rows = [lv[kept] if j != wrong_level else lv[: len(kept)] for j, lv in enumerate(levels)]
        h = m.language_model(inputs_embeds=x[keep][None], position_ids=pos[:, :, keep],
                             visual_pos_masks=(img & keep)[keep][None], deepstack_visual_embeds=rows).last_hidden_state
        return model.lm_head(h[0, -1])


def test_a_reduction_before_the_llm_keeps_every_deepstack_level_consistent():
    """`random` at 8 of an image's 16 tokens, before the LLM: the prefill's logits equal HF's own language model run on
    the kept tokens only with every DeepStack level gathered at them; and a level left ungathered changes them (the
    check would fail)."""
    model = tiny_qwen3(seed=5, llm_layers=4)  # level 2 joins after layer 2: a fourth layer reads it
    ids, mask, pixels, grid = qwen_prompts(model, [(1, 8, 8)], seed=7)
    state = ReducedQwen3(model, create_reducer("random", 8)).prefill(ids, mask, pixels, grid)
    kept = state.trace.kept[0][state.trace.kept_valid[0]]
    assert len(kept) == 8 and kept.tolist() != list(range(8))
    ours = state.logits[0]
    assert torch.allclose(ours, hf_kept_logits(model, ids, pixels, grid, kept), atol=1e-4, rtol=1e-4)
    for level in range(3):
        assert not torch.allclose(ours, hf_kept_logits(model, ids, pixels, grid, kept, level), atol=1e-3), level


@pytest.mark.parametrize(("method", "budget"), [("full", None), ("random", 5), ("fastv", 5)])
@pytest.mark.parametrize("head_dim", [16, 32], ids=["q=d", "q=2d"])
def test_analytic_flops_equal_fvcore_and_flop_counter(method, budget, head_dim):
    """The counter's prefill MACs of a Qwen3-VL trace (GELU vision MLP, full attention in every block, the merger and
    the three DeepStack mergers) equal FlopCounterMode's and fvcore's on the real computation; also where the
    queries are wider than the hidden size (heads x head_dim = 2 x hidden, as Qwen3-VL-4B's 32 x 128 of 2,560)."""
    model = tiny_qwen3(seed=2, head_dim=head_dim)
    inputs = qwen_prompts(model, [(1, 6, 8)], seed=4)
    run = ReducedQwen3(model, create_reducer(method, budget) if budget else create_reducer(method))
    with torch.no_grad():
        measured, state = flop_counter_macs(lambda: run.prefill(*inputs))
        traced = fvcore_prefill_macs(run, *inputs)
    assert count(state.trace.sample(0, 12), model_shape(model.config)).prefill == measured == traced


def test_a_reduction_inside_the_llm_before_the_last_deepstack_level_gathers_it():
    """FastV at layer 2 (its default) drops image tokens after DeepStack levels 0 and 1 joined every one of them and
    before level 2 joins: the prefill's logits equal a restatement over HF's own decoder layers (the whole prompt
    through layers 0-1 with levels 0 and 1 added by HF's `_deepstack_process`, then only the text and FastV's kept
    tokens, level 2 gathered at them); level 2 left ungathered changes them."""
    model = tiny_qwen3(seed=6, llm_layers=4)
    ids, mask, pixels, grid = qwen_prompts(model, [(1, 8, 8)], seed=8)
    state = ReducedQwen3(model, create_reducer("fastv", 8)).prefill(ids, mask, pixels, grid)
    kept = state.trace.kept[0][state.trace.kept_valid[0]]
    assert state.trace.visual_tokens[0].tolist() == [16, 16, 8, 8] and kept.tolist() != list(range(8))
    m, lm = model.model, model.model.language_model

    def restated(wrong: bool) -> torch.Tensor:
        with torch.no_grad():
            out = m.get_image_features(pixel_values=pixels, image_grid_thw=grid)
            feats, levels = out.pooler_output[0], [level[0] for level in out.deepstack_features]
            img = ids[0] == model.config.image_token_id
            pos, _ = m.get_rope_index(ids, img[None].int(), image_grid_thw=grid)  # (3, 1, T)
            h = lm.embed_tokens(ids[0].masked_fill(img, 0))
            h[img] = feats
            h = h[None]
            for j, layer in enumerate(lm.layers[:2]):  # every token
                h = layer(h, attention_mask=None, position_embeddings=lm.rotary_emb(h, pos))
                h = lm._deepstack_process(h, img[None], levels[j])
            keep = ~img | torch.isin(torch.cumsum(img.long(), 0) - 1, kept)
            h, pos, img = h[:, keep], pos[:, :, keep], img[keep]
            level2 = levels[2][kept] if not wrong else levels[2][: len(kept)]
            for j, layer in enumerate(lm.layers[2:], 2):  # the text and the kept image tokens
                h = layer(h, attention_mask=None, position_embeddings=lm.rotary_emb(h, pos))
                if j == 2:
                    h = lm._deepstack_process(h, img[None], level2)
            return model.lm_head(lm.norm(h[0, -1]))

    assert torch.allclose(state.logits[0], restated(False), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(state.logits[0], restated(True), atol=1e-3)


def test_run_bench_on_a_qwen3_folder(qwen3_ckpt, tmp_path, capsys):
    """The sweep on a Qwen3-VL folder: the family from its config, counts and fractions per image, a method that needs
    a CLS token refused in one line, and `full`'s predictions equal to Hugging Face's generate on the processor's
    inputs."""
    out = tmp_path / "run"
    argv = ["--model", str(qwen3_ckpt), "--methods", "full", "divprune", "fastv", "--budgets", "0.25", "16",
            "--limit", "6", "--batch-size", "4", "--output", str(out)]
    assert run_bench.main(argv) == 0
    assert "Qwen3-VL" in capsys.readouterr().out
    samples = read_samples(out)
    by = {(s["method"], str(s["budget"])): s for s in samples if s["doc_id"] == 0}
    assert by["full", "1.0"]["image_grid_thw"] == [1, 24, 24] and by["full", "1.0"]["visual_tokens"] == 144
    assert by["divprune", "0.25"]["visual_tokens"] == 36 and by["divprune", "16"]["visual_tokens"] == 16
    assert by["fastv", "0.25"]["visual_tokens_per_layer"] == [144, 144, 36]
    assert by["divprune", "0.25"]["prefill_gflops"] < by["full", "1.0"]["prefill_gflops"]
    assert run_bench.main([*argv[:2], "--methods", "prumerge", "--limit", "2", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "prumerge does not run on Qwen3-VL" in err
    ours = {s["doc_id"]: s["prediction"] for s in samples if s["method"] == "full"}
    assert [ours[i] for i in range(6)] == hf_answers(QWEN3, qwen3_ckpt, 6)
