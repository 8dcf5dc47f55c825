"""The analytic counter: hand-computed numbers, exact agreement with fvcore and FlopCounterMode on real runs of every
method (tiny, smoke and LLaVA-1.5-7B-shaped models), shape-only traces equal to real ones, and the paper numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, Qwen2VLImageProcessor

from benchmarks.defaults import SMOKE_MODEL
from benchmarks.tasks.synthetic.generate import generate_sample
from flops.__main__ import main
from flops.analytic import ModelShape, count, kv_cache_bytes, llm_layer_macs, model_shape, vision_layer_macs
from flops.measured import UncountedOpError, flop_counter_macs, fvcore_prefill_macs
from flops.shapes import CONFIGS, load_config, qwen_grid
from methods import create_reducer, get_reducer_class, list_reducers
from methods.adaptive import ControllerConfig
from methods.llava import ReducedLlava, llava_prompt, load_llava
from methods.qwen import ReducedQwen
from tests.cases import build
from tests.conftest import llava_runner, qwen_prompts, tiny_batch, tiny_llava, tiny_qwen

ROOT = Path(__file__).resolve().parents[1]
METHODS = [m for m in list_reducers() if get_reducer_class(m).__module__.startswith("methods.")]


def test_layer_formulas_by_hand():
    s = ModelShape(num_patches=16, vision_width=4, vision_mlp=8, vision_channels=3, patch=2, feature_layers=1,
                   width=8, mlp=16, kv_width=4, layers=2, vocab=10)
    assert vision_layer_macs(3, s) == 4 * 3 * 16 + 2 * 9 * 4 + 2 * 3 * 4 * 8
    assert llm_layer_macs(5, s) == 2 * 5 * 64 + 2 * 5 * 8 * 4 + 2 * 25 * 8 + 3 * 5 * 8 * 16


def test_reducer_macs_by_hand():
    """PruMerge at budget 5 on 16 patches of width 32 (tiny model): CLS signals + 4 kept x (16 x 32 similarities +
    15 neighbours x 32) + the extra token 16 x 32. adaptive_b with hidden 24 over 16 patches of width 32."""
    model = tiny_llava(kv_heads=2, seed=1)
    ids, mask, pixels = tiny_batch(model, 1, seed=5)
    rec = ReducedLlava(model, create_reducer("prumerge", 5)).prefill(ids, mask, pixels).trace.sample(0, 16)
    signals = 32 * 32 + 17 * (32 * 32 + 32)
    assert rec["reducer_macs"] == signals + 4 * (16 * 32 + 15 * 32) + 16 * 32
    b = create_reducer("adaptive_b", 5, config=ControllerConfig("adaptive_b", dim=32, num_patches=16, hidden=24))
    content, head, budget_path = 16 * 32 * 24, 16 * 24, 256 * 24 + 24 * 32 + 32 * 24
    attention = 2 * 32 * 32 + 2 * 16 * 32 * 32 + 2 * 16 * 32
    assert b.macs(16) == content + head + budget_path + attention


@pytest.mark.parametrize("method", ["full", "fastv", "prumerge_plus", "adaptive_b"])
def test_analytic_equals_flop_counter_around_generate(method):
    model = tiny_llava(attn="eager", kv_heads=2, seed=2)
    ids, mask, pixels = tiny_batch(model, 1, seed=6)
    run = llava_runner(model, build(method, 5, model.config))
    measured, gen = flop_counter_macs(lambda: run.generate(ids, mask, pixels, max_new_tokens=5, eos_token_id=None))
    rec = gen.trace.sample(0, 16)
    assert rec["generated_tokens"] == 5
    assert count(rec, ModelShape.from_config(model.config)).total == measured


def test_fvcore_check_fails_loudly_on_an_uncounted_matmul():
    class Odd(torch.nn.Module):
        def forward(self, x):
            return torch.ops.aten._weight_int8pack_mm(x, torch.zeros(4, 8, dtype=torch.int8), torch.ones(4))

    class Runner:  # what fvcore_prefill_macs needs from a ReducedLlava
        model, reducer = Odd(), torch.nn.Identity()

        def prefill(self, a, b, c):
            return type("S", (), {"logits": self.model(c)})()

    with pytest.raises(UncountedOpError, match="_weight_int8pack_mm"):
        fvcore_prefill_macs(Runner(), torch.zeros(1), torch.zeros(1), torch.randn(2, 8))


@pytest.fixture(scope="module")
def smoke():
    return load_llava(SMOKE_MODEL, device="cpu", dtype="float32")


@pytest.mark.slow
@pytest.mark.parametrize("method,budget", [(m, 48) for m in list_reducers()] + [("prumerge", "auto")])
def test_analytic_equals_fvcore_smoke_model(smoke, method, budget):
    """Every registered method on the committed smoke model (12 LLM layers: 48 is within every layer-averaged
    budget's reach), built as the contract tests build it (tests/cases.py)."""
    model, processor = smoke
    s = generate_sample(3, 7)
    inputs = processor(images=[Image.fromarray(s.image)], text=[llava_prompt(processor, s.question)],
                       return_tensors="pt")
    run = llava_runner(model, build(method, budget, model.config))
    args = (inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    with torch.no_grad():
        state = run.prefill(*args)
        traced = fvcore_prefill_macs(run, *args)
    n = model.config.image_seq_length
    analytic = count(state.trace.sample(0, n), ModelShape.from_config(model.config)).prefill
    assert analytic == pytest.approx(traced, rel=0.005)
    assert analytic == traced


@pytest.fixture(scope="module")
def llava7b_shaped():
    """LLaVA-1.5-7B's real config (4096-wide LLM, 1024-wide CLIP at 336 px, 576 patches) with the depth cut to 2
    vision and 2 LLM layers; random weights."""
    config = load_config("llava-1.5-7b")
    config.vision_config.num_hidden_layers = 2
    config.text_config.num_hidden_layers = 2
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).float().eval()


@pytest.mark.slow
@pytest.mark.parametrize("method", list_reducers())
def test_analytic_equals_fvcore_llava7b_shaped(llava7b_shaped, method):
    model = llava7b_shaped
    n = 576
    ids = torch.tensor([[1] + [7] * 5 + [32000] * n + [9] * 10])
    pixels = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    run = llava_runner(model, build(method, 64, model.config))
    with torch.no_grad():
        state = run.prefill(ids, torch.ones_like(ids), pixels)
        traced = fvcore_prefill_macs(run, ids, torch.ones_like(ids), pixels)
    analytic = count(state.trace.sample(0, n), ModelShape.from_config(model.config)).prefill
    assert analytic == pytest.approx(traced, rel=0.005)


def run_flops(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_reproduces_paper_numbers(capsys):
    def row(*args: str) -> dict:
        code, out, err = run_flops(capsys, *args, "--json")
        assert code == 0, err
        return json.loads(out)[0]

    # LLaVA-1.5-7B, 576 visual + 64 text tokens: 4.25 TMACs = 8.50 TFLOPs (8,504 GFLOPs) of LLM prefill
    full = row("--model-config", "llava-1.5-7b", "--text-tokens", "64", "--methods", "full")
    assert full["llm_prefill_gflops"] / 2e3 == pytest.approx(4.252, abs=5e-4)
    assert full["llm_prefill_gflops"] / 1e3 == pytest.approx(8.504, abs=1e-3)
    # FastV K=2, R=50%: 57.2% of that; FastV README: "57%" for K=3 R=50% (about 40 text tokens)
    k2 = row("--text-tokens", "64", "--methods", "fastv", "--method-args", "fastv.layer=2", "fastv.ratio=0.5")
    assert k2["llm_prefill_ratio"] == pytest.approx(0.572, abs=5e-4)
    k3 = row("--text-tokens", "40", "--methods", "fastv", "--method-args", "fastv.layer=3", "fastv.ratio=0.5")
    assert round(k3["llm_prefill_ratio"], 2) == 0.57
    # 576 visual tokens, no text: LLM-Viewer's 7.64 T (FLOPs; it adds norms and softmax) and PyramidDrop's
    # 3.82 "TFLOPs" (which are MACs)
    bare = row("--text-tokens", "0", "--methods", "full")
    assert bare["llm_prefill_gflops"] / 1e3 == pytest.approx(7.64, abs=0.01)
    assert round(bare["llm_prefill_gflops"] / 2e3, 2) == 3.82


def test_cli_reproduces_the_baselines_published_flops(capsys):
    """The LLaVA-1.5-7B FLOPs the papers of the added baselines publish, where one does (VisionZip, DART, VisPruner
    and FasterVLM give none for this model). Each paper's text length is not stated: where it is not 0, it is the
    one at which our count of `full` gives the paper's own `full` figure."""
    def row(*args: str) -> dict:
        code, out, err = run_flops(capsys, "--model-config", "llava-1.5-7b", *args, "--json")
        assert code == 0, err
        return json.loads(out)[0]

    # PyramidDrop (arXiv 2410.17247), inference-only table, in "TFLOPs" that are MACs of 576 visual tokens and no
    # text: vanilla 3.82, FastV 2.01, PDrop 1.78 (layers 8/16/24 keeping 1/2, 1/4, 1/8 of the image)
    assert round(row("--text-tokens", "0", "--methods", "full")["llm_prefill_gflops"] / 2e3, 2) == 3.82
    fastv = row("--text-tokens", "0", "--methods", "fastv", "--method-args", "fastv.layer=2", "fastv.ratio=0.5")
    assert round(fastv["llm_prefill_gflops"] / 2e3, 2) == 2.01
    pdrop = row("--text-tokens", "0", "--methods", "pdrop", "--method-args", "pdrop.ratios=0.5,0.25,0.125")
    assert round(pdrop["llm_prefill_gflops"] / 2e3, 2) == 1.78
    # SparseVLM (ICML 2025 version), Table 1 at 64 tokens: 1.30 "TFLOPs" against vanilla 4.62 (MACs again: 4.62 is
    # 576 visual tokens with 118 text tokens)
    assert round(row("--text-tokens", "118", "--methods", "full")["llm_prefill_gflops"] / 2e3, 2) == 4.62
    sparse = row("--text-tokens", "118", "--methods", "sparsevlm", "--method-args", "sparsevlm.retained_tokens=64")
    assert sparse["llm_prefill_gflops"] / 2e3 == pytest.approx(1.30, abs=0.02)
    # DivPrune (arXiv 2503.02175), Table 1: 0.512 of 3.228 TFLOP at ratio 0.098 (56 tokens); it counts with FastV's
    # per-layer formula (4nd^2 + 2n^2d + 2ndm: a two-matrix MLP), which gives 3.228 T at 45 text tokens, so only the
    # ratio compares: 0.159 (its 15.63 % in the same row does not match its own 0.512 / 3.228 = 15.86 %)
    divprune = row("--text-tokens", "45", "--methods", "divprune", "--budgets", "56")
    assert divprune["llm_prefill_ratio"] == pytest.approx(0.512 / 3.228, abs=0.002)


def test_cli_table_and_errors(capsys, tmp_path):
    code, out, err = run_flops(capsys, "--model-config", "llava-1.5-13b", "--methods", "full", "fastv", "prumerge",
                               "--budgets", "64", "576")
    assert code == 0, err
    lines = out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("method"))
    assert lines[head].split()[:3] == ["method", "budget", "tokens"]
    assert [ln.split()[:2] for ln in lines[head + 2:]] == [["full", "576"], ["fastv", "64"], ["prumerge", "64"]]
    assert max(map(len, lines)) <= 120
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    for args, message in [(["--model-config", str(bad)], "not a LLaVA, Qwen2.5-VL or Qwen3-VL config"),
                          (["--model-config", "llava-9b"], "no such config"),
                          (["--methods", "prumerge", "--budgets", "auto"], "depends on the image"),
                          (["--methods", "fastvv", "--budgets", "8"], "Did you mean fastv")]:
        code, out, err = run_flops(capsys, *args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)


@pytest.mark.slow
def test_cli_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "flops", "--methods", "full", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["visual_tokens"] == 576


@pytest.mark.parametrize(("argv", "phrase"), [
    (["--methods", "fastv", "--budgets", "64", "--method-args", "fastv.layer=99"], "LLM layer 99 must be in [1, 31]"),
    (["--methods", "fastv", "--budgets", "64", "--method-args", "fastv.layer=1.5"], "must be a whole number"),
    (["--methods", "prumerge", "--budgets", "1"], "give a budget >= 2"),
    (["--model-config", "{bad_layers}"], "text_config.num_hidden_layers must be a whole number >= 1, got -2"),
    (["--model-config", "{bad_width}"], "vision_config.hidden_size must be a whole number >= 1, got 0"),
])
def test_cli_rejects_what_run_bench_rejects(argv, phrase, tmp_path, capsys):
    raw = json.loads((CONFIGS / "llava-1.5-7b.json").read_text())
    for name, part, key, value in (("bad_layers", "text_config", "num_hidden_layers", -2),
                                   ("bad_width", "vision_config", "hidden_size", 0)):
        bad = json.loads(json.dumps(raw))
        bad[part][key] = value
        (tmp_path / f"{name}.json").write_text(json.dumps(bad))
    argv = [a.format(bad_layers=tmp_path / "bad_layers.json", bad_width=tmp_path / "bad_width.json") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and phrase in err, err


@pytest.mark.parametrize(("content", "phrase"), [
    ("[1, 2]", "is not a LLaVA, Qwen2.5-VL or Qwen3-VL config (needs model_type 'llava', 'qwen2_5_vl', 'qwen3_vl'; "
               "got 'list')"),
    ('{"model_type": "llava", "text_config": {}}', "a LLaVA config needs vision_config"),
    ("not json", "is not valid JSON"),
])
def test_cli_foreign_config_files_are_one_line(content, phrase, tmp_path, capsys):
    (tmp_path / "config.json").write_text(content)
    assert main(["--model-config", str(tmp_path / "config.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and phrase in err, err


def test_cli_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--budgets", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1


# ------------------------------------------------------------------ Qwen2.5-VL

QWEN_GRID = (1, 10, 14)  # 5 x 7 merged tokens: windows of 2 x 2 tokens clipped at the bottom and right edges


def test_qwen_attention_groups_by_hand():
    """Tiny model: window 56 px = 4 patches = 2 x 2 merged tokens; a 10 x 14 patch image is 5 x 7 tokens, so the
    windows are 2 x 2 tokens (16 patches) with a clipped last row (5 = 2 + 2 + 1) and column (7 = 2 + 2 + 2 + 1)."""
    s = model_shape(tiny_qwen().config)
    frames, windows = s.attention_groups(QWEN_GRID)
    assert frames == [140]
    assert windows == [16, 16, 16, 8] * 2 + [8, 8, 8, 4]
    d, m = 32, 64  # vision width, MLP
    rec = {"image_grid_thw": list(QWEN_GRID), "vision_tokens_per_layer": [140, 140]}
    windowed, full = 2 * d * (6 * 16 ** 2 + 5 * 8 ** 2 + 4 ** 2), 2 * d * 140 ** 2  # block 0 windowed, block 1 full
    assert s.vision_macs(rec) == 140 * 3 * 2 * 14 * 14 * d + 2 * (4 * 140 * d * d + 3 * 140 * d * m) + windowed + full
    assert s.projector_macs({"projector_tokens": 140}) == 35 * (128 * 128 + 128 * 64)


@pytest.mark.parametrize("method", ["full", "fastv", "divprune"])
def test_qwen_analytic_equals_flop_counter_around_generate(method):
    model = tiny_qwen(seed=2, attn="eager")
    ids, mask, pixels, grid = qwen_prompts(model, [(1, 8, 12)], seed=3)
    run = ReducedQwen(model, build(method, 7, model.config))
    measured, gen = flop_counter_macs(lambda: run.generate(ids, mask, pixels, grid, max_new_tokens=5))
    rec = gen.trace.sample(0, 24)
    assert rec["generated_tokens"] == 5
    assert count(rec, model_shape(model.config)).total == measured


def test_qwen_grid_is_the_processors():
    """`qwen_grid` resizes as Qwen2.5-VL's image processor does (at its default pixel limits)."""
    config = load_config("qwen2.5-vl-7b")
    processor = Qwen2VLImageProcessor()
    for w, h in [(640, 480), (448, 448), (30, 200), (4000, 3000)]:
        out = processor(images=[Image.new("RGB", (w, h))], return_tensors="pt")
        assert qwen_grid(config, w, h) == tuple(out["image_grid_thw"][0].tolist()), (w, h)


def test_qwen_cli_prices_the_7b_by_hand(capsys):
    code, out, err = run_flops(capsys, "--model-config", "qwen2.5-vl-7b", "--image-tokens", "16", "--text-tokens",
                               "64", "--methods", "full", "divprune", "--budgets", "0.25", "--json")
    assert code == 0, err
    full, half = json.loads(out)
    assert (full["budget"], full["image_tokens"], full["image_grid_thw"]) == (256, 256, [1, 32, 32])
    d, kv, m, layers = 3584, 512, 18944, 28  # Qwen2.5-VL-7B's LLM: 28 x 128 query and 4 x 128 key/value widths
    for row, n in ((full, 64 + 256), (half, 64 + 64)):
        assert row["llm_prefill_gflops"] * 1e9 / 2 == pytest.approx(
            layers * (2 * n * d * d + 2 * n * d * kv + 2 * n * n * d + 3 * n * d * m), rel=1e-12)
    assert (half["budget"], half["visual_tokens"]) == (0.25, 64)
    code, out, err = run_flops(capsys, "--model-config", "qwen2.5-vl-7b", "--image-size", "640x480", "--methods",
                               "fastv", "--budgets", "64")
    assert code == 0 and "an image of 34 x 46 patches (391 tokens)" in " ".join(out.split()), err


@pytest.mark.parametrize(("argv", "phrase"), [
    (["--model-config", "qwen2.5-vl-7b", "--methods", "prumerge", "--budgets", "64"],
     "prumerge does not run on Qwen2.5-VL: it needs cls_attn and keys, which require a vision CLS token"),
    (["--image-size", "640x480"], "--image-size and --image-tokens apply to Qwen2.5-VL and Qwen3-VL"),
    (["--model-config", "qwen2.5-vl-7b", "--methods", "pdrop", "--budgets", "0.25"],
     "cannot be met by its stages at layers [7, 14, 21] of 28"),
])
def test_qwen_cli_errors_are_one_line(argv, phrase, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and phrase in err, err


@pytest.mark.parametrize(("argv", "phrase"), [(["--budgets", "1.5"], "strictly between 0 and 1"),
                                              (["--budgets", "0.0"], "strictly between 0 and 1"),
                                              (["--image-tokens", "3x"], "write AxB")])
def test_qwen_cli_bad_budgets_and_sizes(argv, phrase, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and phrase in err and err.count("\n") == 1, err


def _cache_bytes(state, b: int) -> int:
    """Bytes of sample b's real keys and values in the adapter's cache (padding positions excluded)."""
    total = 0
    for j, layer in enumerate(state.cache.layers):
        real = state.key_masks[state.layer_segment[j]][b]  # (T,) True on sample b's real keys
        assert layer.keys.size(2) == real.numel() == layer.values.size(2)
        per_token = layer.keys[b, :, 0].numel() * layer.keys.element_size()  # Hkv x hd values, one position
        total += 2 * int(real.sum()) * per_token
    return total


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_kv_cache_bytes_equal_the_cache_tensors(family):
    """`kv_cache_bytes` from the trace equals the bytes of the keys and values the adapter's cache really holds
    after prefill and 3 decoding steps: at batch 1 every tensor element, in a padded batch each sample's real
    positions; FastV drops from layer 1 on, so the layers' caches differ in length."""
    if family == "llava":
        model = tiny_llava(kv_heads=2, seed=3)
        ids, mask, pixels = tiny_batch(model, 2, seed=7)
        run = ReducedLlava(model, create_reducer("fastv", 5, layer=1).eval())
        args, n = [(ids, mask, pixels), (ids[:1], mask[:1], pixels[:1])], 16
    else:
        model = tiny_qwen(seed=3, llm_layers=3)
        ids, mask, pixels, grid = qwen_prompts(model, [(1, 8, 8), (1, 6, 10)], seed=7)
        run = ReducedQwen(model, create_reducer("fastv", 5, layer=1).eval())
        real = mask[1].bool()
        args, n = [(ids, mask, pixels, grid), (ids[1:, real], mask[1:, real], pixels[64:], grid[1:])], 16
    shape = model_shape(model.config)
    for batch in args:
        with torch.no_grad():
            state = run.prefill(*batch)
            tok = state.logits.argmax(-1)
            for _ in range(3):
                tok = run._decode_step(state, tok).argmax(-1)
        state.trace.generated_tokens = torch.full((tok.numel(),), 4)
        for b in range(tok.numel()):
            rec = state.trace.sample(b, n)
            assert kv_cache_bytes(rec, shape, 4) == _cache_bytes(state, b)
        if tok.numel() == 1:
            held = sum(t.numel() * t.element_size() for layer in state.cache.layers for t in (layer.keys, layer.values))
            assert kv_cache_bytes(state.trace.sample(0, n), shape, 4) == held
