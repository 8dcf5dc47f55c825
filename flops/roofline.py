"""A roofline time model: how long a batch's prefill and each decoding step should take on a named device, from the
same token traces the FLOPs counter prices.

Every part of the forward pass (the patch embedding, each vision layer, the projector, the reducer, each LLM layer,
the lm_head) takes max(FLOPs / peak compute, bytes / peak bandwidth) and the parts add up. Per part, for a batch:

* FLOPs: 2 x the analytic MACs (`flops.analytic`) summed over the batch's samples, at the device's rate for a
  matmul over as many rows as the part has tokens (the reducer: the image's tokens, which its work is over);
* bytes: its weights, read once per batch (the floor that FLOPs cannot see: at batch 1 a short prompt streams the
  whole model for few multiply-adds), plus its activations read and written once per token (each linear layer's
  input and output, attention's q, k, v and output; an LLM layer: 9 d + 4 d_kv + 3 m values per token, LLaVA's vision
  layer 12 d + 2 m, Qwen2.5-VL's 13 d + 3 m), plus the KV cache: written in prefill (2 d_kv per token and layer),
  and at every decoding step read and written whole by Hugging Face's `DynamicCache`, which extends K and V by
  concatenating into new tensors, then read whole again by attention (6 d_kv per cached token and layer).
  Attention scores are taken as never written to memory (fused attention); norms, activations and the embedding
  lookup are ignored, as in the FLOPs count (on a GPU their unfused kernels add memory traffic this leaves out).

Peaks: `DEVICES` lists dense matmul throughput per dtype and memory bandwidth from the vendors' datasheets; "cpu"
is this machine, measured by `calibrate_cpu` (a matmul at several row counts, since a CPU's GEMM rate falls for
skinny matrices, and a large copy for the bandwidth). Predicted times are lower bounds on an ideal implementation:
kernel launches, Python overhead and cache effects are not in them, which is what `benchmarks.tools.speed` compares.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import dataclass, field, replace

import torch

from flops.analytic import ModelShape, QwenShape, llm_layer_macs, llm_layer_weights

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Device:
    """Peak rates of one device.

    Attributes:
        name: as printed.
        tflops: dense matmul TFLOP/s per dtype (float32 without TF32, as PyTorch runs it by default).
        bandwidth_gbs: memory bandwidth, GB/s (1e9 bytes).
        source: where the numbers come from.
        rows: for a measured CPU, (matmul rows, TFLOP/s) per dtype: the rate at M rows, interpolated in log M
            (clamped at the ends); empty for a GPU (one rate).
    """

    name: str
    tflops: dict[str, float]
    bandwidth_gbs: float
    source: str
    rows: dict[str, tuple[tuple[int, float], ...]] = field(default_factory=dict)

    def flops_per_s(self, dtype: str, m: int) -> float:
        """Peak FLOP/s for a matmul over `m` rows (tokens) in `dtype`."""
        curve = self.rows.get(dtype)
        if not curve:
            if dtype not in self.tflops:
                raise ValueError(f"{self.name} has no {dtype} rate; it has {', '.join(self.tflops)}")
            return self.tflops[dtype] * 1e12
        if m <= curve[0][0]:
            return curve[0][1] * 1e12
        for (m0, r0), (m1, r1) in itertools.pairwise(curve):
            if m <= m1:
                w = (math.log(m) - math.log(m0)) / (math.log(m1) - math.log(m0))
                return (r0 + w * (r1 - r0)) * 1e12
        return curve[-1][1] * 1e12


# Datasheet peaks (dense, no sparsity): H100 SXM5 and H200 SXM (989 TFLOP/s BF16, 67 FP32; 3.35 and 4.8 TB/s),
# A100 SXM4 80GB (312 BF16, 19.5 FP32; 2.04 TB/s), L40S (362 BF16, 91.6 FP32; 864 GB/s).
DEVICES = {
    "h100": Device("NVIDIA H100 SXM", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}, 3350.0,
                   "NVIDIA H100 datasheet (SXM5, dense)"),
    "h200": Device("NVIDIA H200 SXM", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}, 4800.0,
                   "NVIDIA H200 datasheet (SXM, dense)"),
    "a100": Device("NVIDIA A100 SXM 80GB", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}, 2039.0,
                   "NVIDIA A100 datasheet (SXM4 80GB, dense)"),
    "l40s": Device("NVIDIA L40S", {"bfloat16": 362.0, "float16": 362.0, "float32": 91.6}, 864.0,
                   "NVIDIA L40S datasheet (dense)"),
}
PROFILES = (*DEVICES, "cpu")


CALIBRATION_ROWS = (1, 8, 64, 512, 2048)


def calibrate_cpu(dtype: str = "float32", width: int = 2048, rows: tuple[int, ...] = CALIBRATION_ROWS,
                  copy_mb: int = 256, repeats: int = 3) -> Device:
    """This CPU's peaks, measured: the best of `repeats` (M x width) @ (width x width) matmuls at each M of `rows`
    (give the model's width: a CPU's rate depends on how the weights fit its caches), and the best of `repeats`
    copies of a `copy_mb` MiB tensor (bytes read + written per second). At width 4096 with `repeats=1`, about 4 s
    on this project's 2-core CPU."""
    torch_dtype = getattr(torch, dtype)
    w = torch.randn(width, width, dtype=torch_dtype)
    curve = []
    for m in rows:
        x = torch.randn(m, width, dtype=torch_dtype)
        x @ w  # warm-up
        n = max(1, min(64, 2048 // m))  # a few milliseconds at least for small matmuls, at most 64 of them
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(n):
                x @ w
            best = min(best, (time.perf_counter() - t0) / n)
        curve.append((m, 2 * m * width * width / best / 1e12))
    a = torch.empty(copy_mb * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    b = torch.empty_like(a)
    b.copy_(a)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    bandwidth = 2 * a.numel() * 4 / best / 1e9
    name = f"this CPU ({torch.get_num_threads()} threads)"
    return Device(name, {dtype: curve[-1][1]}, bandwidth, f"measured by flops.roofline.calibrate_cpu at "
                  f"{width}-wide {dtype} matmuls and a {copy_mb} MiB copy", rows={dtype: tuple(curve)})


def median_profile(runs: list[Device]) -> Device:
    """One profile from several calibrations of the same CPU (e.g. one per round of a benchmark, so that the peaks
    see the same conditions as the times they price): the median rate at each row count, the median bandwidth."""
    first = runs[0]
    rows = {dtype: tuple((m, statistics.median(d.rows[dtype][i][1] for d in runs)) for i, (m, _) in enumerate(curve))
            for dtype, curve in first.rows.items()}
    return replace(first, tflops={dtype: curve[-1][1] for dtype, curve in rows.items()}, rows=rows,
                   bandwidth_gbs=statistics.median(d.bandwidth_gbs for d in runs),
                   source=f"{first.source}; the median of {len(runs)} calibrations")


def profile_for(gpu_name: str) -> str | None:
    """The profile of a CUDA device by its name (`torch.cuda.get_device_name()`), or None when no profile has it.
    PCIe and NVL variants match their SXM profile: their peaks are lower, so the roofline is a bound all the same."""
    upper = gpu_name.upper()
    return next((k for k in DEVICES if k.upper() in upper), None)


def device_profile(name: str, dtype: str = "float32", width: int = 2048) -> Device:
    """A named device (`PROFILES`); "cpu" calibrates this machine first, at matmuls `width` wide (a few seconds)."""
    if name == "cpu":
        return calibrate_cpu(dtype, width)
    if name not in DEVICES:
        raise ValueError(f"--device-profile {name}: known profiles are {', '.join(PROFILES)}")
    return DEVICES[name]


@dataclass(frozen=True)
class Prediction:
    """Predicted seconds for one batch: its prefill, one decoding step (the mean over the batch's steps) and each
    part of the prefill; `memory_bound_share` is the share of the prefill time spent in memory-bound parts."""

    prefill_s: float
    decode_step_s: float
    parts: dict[str, float]
    memory_bound_share: float


def _part(flops: float, nbytes: float, rows: int, dev: Device, dtype: str) -> tuple[float, bool]:
    """(seconds, memory-bound) of one part."""
    compute = flops / dev.flops_per_s(dtype, max(rows, 1)) if flops else 0.0
    memory = nbytes / (dev.bandwidth_gbs * 1e9)
    return max(compute, memory), memory > compute


def _vision(records: list[dict], s: ModelShape | QwenShape, e: int) -> list[tuple[str, float, float, int]]:
    """(part, FLOPs, bytes, rows) of the vision encoder and projector for the batch."""
    dv, m = s.vision_width, s.vision_mlp
    parts = []
    embeds, layers = zip(*(s.vision_parts(r) for r in records), strict=True)
    if isinstance(s, QwenShape):
        pixels = [math.prod(r["image_grid_thw"]) for r in records]
        embed_weights, layer_weights, per_token = s.vision_channels * s.temporal_patch * s.patch ** 2 * dv, \
            4 * dv * dv + 3 * dv * m, 13 * dv + 3 * m
        wide = s.merge ** 2 * dv
        proj_weights, proj_tokens = wide * wide + wide * s.width, [r["projector_tokens"] // s.merge ** 2
                                                                   for r in records]  # merged tokens
        proj_act = 3 * wide + s.width
    else:
        pixels = [s.num_patches] * len(records)
        embed_weights, layer_weights, per_token = s.vision_channels * s.patch ** 2 * dv, 4 * dv * dv + 2 * dv * m, \
            12 * dv + 2 * m
        proj_weights = dv * s.feature_layers * s.width + s.width ** 2
        proj_tokens, proj_act = [r["projector_tokens"] for r in records], dv * s.feature_layers + 3 * s.width
    parts.append(("vision_embed", 2 * sum(embeds), e * (embed_weights + sum(pixels) * dv), sum(pixels)))
    for j in range(len(layers[0])):
        tokens = sum(r["vision_tokens_per_layer"][j] for r in records)
        parts.append((f"vision_{j}", 2 * sum(ls[j] for ls in layers), e * (layer_weights + tokens * per_token),
                      tokens))
    parts.append(("projector", 2 * sum(s.projector_macs(r) for r in records),
                  e * (proj_weights + sum(proj_tokens) * proj_act), sum(proj_tokens)))
    return parts


def predict(records: list[dict], s: ModelShape | QwenShape, dev: Device, dtype: str = "float32") -> Prediction:
    """The roofline times of one batch of samples (`TokenTrace.sample` or `flops.shapes.shape_record` records)."""
    e = DTYPE_BYTES[dtype]
    d, kv, mlp = s.width, s.kv_width, s.mlp
    parts = _vision(records, s, e)
    # the reducer's own work (projections, similarities, attention rows) is over the image's tokens: priced at the
    # rate of a matmul over that many rows
    parts.append(("reducer", 2 * sum(int(r.get("reducer_macs") or 0) for r in records), 0,
                  sum(s.image_tokens(r) for r in records)))
    for j in range(s.layers):
        tokens = [r["llm_tokens_per_layer"][j] for r in records]
        flops = 2 * sum(llm_layer_macs(n, s) for n in tokens)
        nbytes = e * (llm_layer_weights(s) + sum(tokens) * (9 * d + 4 * kv + 3 * mlp + 2 * kv))
        parts.append((f"llm_{j}", flops, nbytes, sum(tokens)))
    b = len(records)
    head = (2 * b * d * s.vocab, e * (d * s.vocab + b * (d + s.vocab)), b)  # FLOPs, bytes, rows: the last position
    parts.append(("lm_head", *head))
    times, memory_s = {}, 0.0
    for name, flops, nbytes, rows in parts:
        t, bound = _part(flops, nbytes, rows, dev, dtype)
        times[name] = t
        memory_s += t if bound else 0.0
    prefill = sum(times.values())
    steps = max(max((r.get("generated_tokens") or 1) for r in records) - 1, 1)
    decode = 0.0
    for i in range(1, steps + 1):
        for j in range(s.layers):
            keys = sum(r["llm_tokens_per_layer"][j] + i for r in records)
            flops = 2 * (b * llm_layer_weights(s) + 2 * keys * s.queries)
            nbytes = e * (llm_layer_weights(s) + b * (9 * d + 4 * kv + 3 * mlp) + 6 * kv * keys)  # cat, attention
            decode += _part(flops, nbytes, b, dev, dtype)[0]
        decode += _part(*head, dev, dtype)[0]
    return Prediction(prefill_s=prefill, decode_step_s=decode / steps, parts=times,
                      memory_bound_share=memory_s / prefill if prefill else 0.0)

