"""Measured MACs, to check the analytic counter: fvcore on a traced prefill, torch's FlopCounterMode on anything.

Both count what really executes, on the same conventions as `flops.analytic` (matmul-like ops only, full n x n
attention). Two gaps in the tools are closed here, in scope (no global registration):

* fvcore skips `aten::scaled_dot_product_attention` (HF's default "sdpa" attention): `fvcore_prefill_macs` adds a
  handle counting QK^T and PV over the full matrix. Any other matmul-like op fvcore cannot count raises
  `UncountedOpError` instead of being silently left out.
* fvcore counts normalisation layers (5 per element); the conventions leave them out, so their handles are removed.
* FlopCounterMode knows SDPA's CUDA kernels but not the CPU one: `flop_counter_macs` maps it to torch's own formula.

fvcore traces with `torch.jit.trace`, so the data-dependent selections (top-k, merges) are baked into the trace with
their concrete shapes: count one sample per call to get that sample's MACs.

fvcore comes with the `test` extra (`pip install -e ".[test]" -c requirements.lock`): only the tests check the
counter; no command of the harness needs it.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop

NORMS = ("aten::layer_norm", "aten::group_norm", "aten::batch_norm", "aten::instance_norm")
# op names (substrings) that do multiply-accumulate work; fvcore must have a handle for every one it meets
MATMUL_LIKE = ("matmul", "mm", "linear", "conv", "einsum", "attention", "addmm", "baddbmm", "bmm", "mv", "dot")
# elementwise / bookkeeping ops fvcore reports as unsupported: O(n d) work the conventions leave out
IGNORED = ("add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "mean", "sum", "exp", "log", "softmax",
           "silu", "gelu", "sigmoid", "cos", "sin", "where", "cumsum", "topk", "sort", "argsort", "gather", "scatter",
           "clamp", "max", "min", "layer_norm", "embedding", "quantile", "masked_fill", "lt", "gt", "le", "ge", "eq",
           "ne", "rsub", "floor", "remainder", "fill", "zeros", "ones", "full", "arange", "expand", "repeat", "abs")


class UncountedOpError(RuntimeError):
    """fvcore met a matmul-like op it has no handle for: its count would silently miss real work."""


def _sdpa_handle(inputs, outputs) -> int:
    """fvcore handle (returns MACs) for aten::scaled_dot_product_attention: QK^T plus PV, full matrix."""
    from fvcore.nn.jit_handles import get_shape  # noqa: PLC0415 - fvcore is a test-only dependency

    q, k, v = (get_shape(inputs[i]) for i in range(3))  # (..., Lq, E), (..., Lk, E), (..., Lk, Ev)
    batch_heads = math.prod(q[:-2])
    return batch_heads * q[-2] * k[-2] * (q[-1] + v[-1])


def _no_macs(inputs, outputs) -> int:
    return 0


class _Prefill(nn.Module):
    """Tensor-in, tensor-out wrapper that fvcore can trace: the reduced prefill's last-position logits."""

    def __init__(self, runner) -> None:
        super().__init__()
        self.runner = runner
        self.model, self.reducer = runner.model, runner.reducer  # registered: the trace sees their weights

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.runner.prefill(*inputs).logits


def fvcore_prefill_macs(runner, *inputs: Tensor) -> int:
    """MACs of `runner.prefill(*inputs)` (a `methods.llava.ReducedLlava` on input ids, attention mask and pixels, a
    `methods.qwen.ReducedQwen` also on the image grids) as fvcore's `FlopCountAnalysis` counts them.

    Raises:
        UncountedOpError: fvcore met a matmul-like op with no handle.
    """
    return _fvcore_total(_Prefill(runner).eval(), inputs)


def _fvcore_total(wrapper: torch.nn.Module, inputs: tuple) -> int:
    """fvcore's MACs of `wrapper(*inputs)`, with this project's handles (SDPA counted, norms left out).

    Raises:
        UncountedOpError: fvcore met a matmul-like op with no handle.
    """
    from fvcore.nn import FlopCountAnalysis  # noqa: PLC0415 - fvcore is a test-only dependency

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # jit deprecation and tracer warnings about data-dependent shapes
        fa = FlopCountAnalysis(wrapper, inputs)
        fa.set_op_handle("aten::scaled_dot_product_attention", _sdpa_handle)
        for norm in NORMS:  # fvcore counts norms elementwise; the conventions leave them out
            fa.set_op_handle(norm, _no_macs)  # (None would not replace fvcore's built-in handle)
        fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = fa.total()
        unsupported = fa.unsupported_ops()
    missed = sorted(op for op in unsupported if _matmul_like(op))
    if missed:
        raise UncountedOpError(f"fvcore has no FLOP handle for {missed}; add one with set_op_handle or the count "
                               "misses real work")
    return int(total)


class _FollowUp(torch.nn.Module):
    """A follow-up turn's prefill on a copy of a conversation's decoding state, as a module fvcore can trace."""

    def __init__(self, runner, state) -> None:
        super().__init__()
        self.runner, self.state = runner, state
        self.model = runner.model  # registered: the trace sees its weights

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.runner._extend(copy.deepcopy(self.state), ids, mask.bool())  # noqa: SLF001 - the prefill alone


def fvcore_follow_up_macs(runner, state, ids: Tensor, mask: Tensor) -> int:
    """MACs of a follow-up turn's prefill (`ids`, `mask` (B, T), left-padded) on the cache `state` holds (a
    `Generation.state` kept by `generate(..., keep_state=True)`; left as it was) as fvcore counts them: the chunk
    through every layer over the cached keys, then lm_head on its last position."""
    return _fvcore_total(_FollowUp(runner, state).eval(), (ids, mask))


def _matmul_like(op: str) -> bool:
    name = op.split("::")[-1].strip("_")
    if any(name == i or name.startswith(i + "_") for i in IGNORED):
        return False
    return any(m in name for m in MATMUL_LIKE)


def flop_counter_macs(fn: Callable[[], object]) -> tuple[int, object]:
    """Run `fn()` under torch's FlopCounterMode; return (MACs = FLOPs / 2, fn's result).

    The CPU SDPA kernel, absent from torch's registry, is counted with torch's own SDPA formula.
    """
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop(query_shape, key_shape, value_shape)  # FlopCounterMode passes shapes

        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = cpu_sdpa
    with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        out = fn()
    return fc.get_total_flops() // 2, out
