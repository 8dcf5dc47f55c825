"""The roofline time model (issue 19, `flops/roofline.py`): compute-bound it is the analytic FLOPs over the peak,
memory-bound its weight bytes are the real model's matrices, and the CPU's rate follows its measured curve."""

from __future__ import annotations

import math

import pytest
from torch import nn

from flops.analytic import count, model_shape
from flops.roofline import DEVICES, Device, calibrate_cpu, device_profile, median_profile, predict, profile_for
from flops.shapes import shape_record, stand_in_reducer
from methods import create_reducer
from methods.llava import ReducedLlava
from methods.qwen import ReducedQwen
from tests.conftest import qwen_prompts, tiny_batch, tiny_llava, tiny_qwen

FAST_MEMORY = Device("compute only", {"float32": 1.0}, 1e12, "test")  # 1 TFLOP/s, bandwidth never binds
FAST_COMPUTE = Device("memory only", {"float32": 1e9}, 1.0, "test")  # 1 GB/s, compute never binds


def counted_weights(model, family: str) -> int:
    """Elements of the matrices the model model prices: every Linear and Conv weight of the executed vision layers,
    the projector, the LLM's layers and the lm_head (LLaVA runs its vision tower up to layer -2)."""
    def mats(module):
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)))
    if family == "llava":
        vt = model.model.vision_tower
        vision = mats(vt.embeddings) + sum(mats(layer) for layer in vt.encoder.layers[:-1])  # layer -2 is the last run
        projector = mats(model.model.multi_modal_projector)
    else:
        vision, projector = mats(model.model.visual) - mats(model.model.visual.merger), mats(model.model.visual.merger)
    return vision + projector + mats(model.model.language_model) + model.lm_head.weight.numel()


def traces(family: str, b: int):
    """(model, records of a batch of b identical samples) after 3 generated tokens, FastV at layer 1."""
    if family == "llava":
        model = tiny_llava(kv_heads=2, seed=3)
        ids, mask, pixels = tiny_batch(model, 1, seed=7)
        gen = ReducedLlava(model, create_reducer("fastv", 5, layer=1).eval()).generate(
            ids.repeat(b, 1), mask.repeat(b, 1), pixels.repeat(b, 1, 1, 1), max_new_tokens=3, eos_token_id=None)
    else:
        model = tiny_qwen(seed=3, llm_layers=3)
        ids, mask, pixels, grid = qwen_prompts(model, [(1, 8, 8)], seed=7)
        gen = ReducedQwen(model, create_reducer("fastv", 5, layer=1).eval()).generate(
            ids.repeat(b, 1), mask.repeat(b, 1), pixels.repeat(b, 1), grid.repeat(b, 1), max_new_tokens=3)
    return model, [gen.trace.sample(i, 16) for i in range(b)]


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_compute_bound_is_the_analytic_flops(family):
    model, recs = traces(family, 2)
    s = model_shape(model.config)
    p = predict(recs, s, FAST_MEMORY)
    macs = [count(r, s) for r in recs]
    assert p.prefill_s == pytest.approx(2 * sum(m.prefill for m in macs) / 1e12, rel=1e-9)
    steps = recs[0]["generated_tokens"] - 1
    assert p.decode_step_s == pytest.approx(2 * sum(m.decode for m in macs) / steps / 1e12, rel=1e-9)
    assert p.memory_bound_share == 0


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_memory_bound_reads_the_weights_once_per_batch(family):
    """Memory-bound, a batch's prefill bytes are the weights (once) plus per-sample traffic, so the weights are
    2 T(1) - T(2) in bytes; they equal the real model's counted matrices; a decoding step reads them again."""
    model, one = traces(family, 1)
    _, two = traces(family, 2)
    s = model_shape(model.config)
    t1, t2 = predict(one, s, FAST_COMPUTE), predict(two, s, FAST_COMPUTE)
    weights = 4 * counted_weights(model, family)
    assert (2 * t1.prefill_s - t2.prefill_s) * 1e9 == pytest.approx(weights, rel=1e-9)
    assert t1.memory_bound_share == pytest.approx(1)  # all but the reducer's few FLOPs (no bytes counted)
    assert t1.decode_step_s * 1e9 > weights - 4 * counted_weights_vision(model, family)  # LLM and lm_head again


def test_a_decoding_step_reads_and_rewrites_the_cache_as_dynamic_cache_does():
    """Hugging Face's `DynamicCache` extends K and V by concatenating into new tensors, which reads and writes the
    whole cache at every step, and attention reads it again: 6 d_kv values per cached token and layer. Ten more
    cached tokens in every layer cost 4 bytes x layers x 6 d_kv x 10 more per step, memory-bound."""
    model, (rec,) = traces("llava", 1)
    s = model_shape(model.config)
    longer = rec | {"llm_tokens_per_layer": [n + 10 for n in rec["llm_tokens_per_layer"]]}
    extra = predict([longer], s, FAST_COMPUTE).decode_step_s - predict([rec], s, FAST_COMPUTE).decode_step_s
    assert extra * 1e9 == pytest.approx(4 * s.layers * 6 * s.kv_width * 10, rel=1e-9)


def counted_weights_vision(model, family: str) -> int:
    """The vision tower's and projector's share of `counted_weights` (a decoding step does not read them)."""
    mats = counted_weights(model, family)
    lm = sum(m.weight.numel() for m in model.model.language_model.modules() if isinstance(m, nn.Linear))
    return mats - lm - model.lm_head.weight.numel()


def test_cpu_rate_follows_its_curve_and_named_devices():
    dev = Device("cpu", {"float32": 0.2}, 10.0, "test", rows={"float32": ((1, 0.01), (100, 0.1), (10000, 0.2))})
    assert dev.flops_per_s("float32", 1) == pytest.approx(0.01e12)
    assert dev.flops_per_s("float32", 10) == pytest.approx(0.055e12)  # halfway in log M
    assert dev.flops_per_s("float32", 10**6) == pytest.approx(0.2e12)  # clamped
    assert device_profile("h100") is DEVICES["h100"]
    with pytest.raises(ValueError, match="known profiles are h100, h200, a100, l40s, cpu"):
        device_profile("tpu")
    names = {"NVIDIA H200": "h200", "NVIDIA H100 80GB HBM3": "h100", "NVIDIA A100-SXM4-80GB": "a100",
             "NVIDIA L40S": "l40s", "Tesla T4": None}  # as torch.cuda.get_device_name() spells them
    assert {n: profile_for(n) for n in names} == names
    with pytest.raises(ValueError, match="has no int8 rate"):
        DEVICES["a100"].flops_per_s("int8", 1)
    measured = calibrate_cpu(rows=(1, 64), width=256, copy_mb=8, repeats=1)
    assert [m for m, _ in measured.rows["float32"]] == [1, 64]
    assert all(r > 0 and math.isfinite(r) for _, r in measured.rows["float32"]) and measured.bandwidth_gbs > 0
    rounds = [Device("cpu", {"float32": t}, bw, "test", rows={"float32": ((1, t / 10), (64, t))})
              for t, bw in ((0.1, 30.0), (0.3, 10.0), (0.2, 20.0))]  # three rounds' calibrations
    median = median_profile(rounds)
    assert median.rows["float32"] == ((1, pytest.approx(0.02)), (64, 0.2)) and median.tflops == {"float32": 0.2}
    assert median.bandwidth_gbs == 20.0 and median.source == "test; the median of 3 calibrations"


def test_7b_prefill_is_compute_bound_and_decode_memory_bound_on_h100():
    """LLaVA-1.5-7B on an H100 in bfloat16, batch 1: a 640-token prefill is compute-bound (about 2 x 7e9 x 640 FLOPs
    at 989 TFLOP/s, ~9 ms), a decoding step reads the 13.5 GB of weights at 3.35 TB/s (~4 ms)."""
    from flops.shapes import load_config  # noqa: PLC0415

    config = load_config("llava-1.5-7b")
    rec = shape_record(config, stand_in_reducer("full", None, config), 64, generated_tokens=8)
    p = predict([rec], model_shape(config), DEVICES["h100"], "bfloat16")
    assert 8e-3 < p.prefill_s < 12e-3 and p.memory_bound_share < 0.2
    assert 3.5e-3 < p.decode_step_s < 4.5e-3


def test_flops_cli_prices_a_batch_on_a_device(capsys):
    """`python -m flops --device-profile`: the rows carry the roofline's times for the batch, equal to `predict` on
    the same shape-only records; a bad profile is one line."""
    import json  # noqa: PLC0415

    from flops.__main__ import main  # noqa: PLC0415
    from flops.shapes import load_config  # noqa: PLC0415

    assert main(["--model-config", "llava-1.5-7b", "--methods", "full", "divprune", "--budgets", "64",
                 "--device-profile", "a100", "--batch-size", "8", "--generated-tokens", "4", "--json"]) == 0
    full, divprune = json.loads(capsys.readouterr().out)
    config = load_config("llava-1.5-7b")
    rec = shape_record(config, stand_in_reducer("full", None, config), 64, generated_tokens=4)
    p = predict([rec] * 8, model_shape(config), DEVICES["a100"], "bfloat16")
    assert full["roofline_prefill_ms"] == pytest.approx(1e3 * p.prefill_s)
    assert full["roofline_decode_ms_per_token"] == pytest.approx(1e3 * p.decode_step_s)
    assert (full["roofline_device"], full["roofline_batch_size"], full["roofline_dtype"]) == (
        "NVIDIA A100 SXM 80GB", 8, "bfloat16")
    assert divprune["roofline_prefill_ms"] < full["roofline_prefill_ms"]
    with pytest.raises(SystemExit):
        main(["--device-profile", "tpu"])
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


def test_a_methods_own_work_is_priced_over_the_images_tokens():
    """A method's own work is over the image's tokens (PyramidDrop's k projections at each stage, similarities), so
    it is priced at the rate of a matmul over that many rows, not at the skinny one-row rate of a decoding step."""
    from flops.shapes import load_config  # noqa: PLC0415

    config = load_config("llava-1.5-7b")
    rec = shape_record(config, stand_in_reducer("pdrop", 192, config), 64, generated_tokens=2)
    dev = Device("cpu", {"float32": 0.1}, 1e9, "test", rows={"float32": ((1, 0.001), (576, 0.1))})
    assert rec["reducer_macs"] > 1e10  # 3 stages of k projections of every token
    for b in (1, 2):
        p = predict([rec] * b, model_shape(config), dev)
        assert p.parts["reducer"] == pytest.approx(2 * b * rec["reducer_macs"] / 0.1e12, rel=1e-9)
