"""Run-time piece of weight-only FP8 GEMMs: the `rewriter::fp8_weight_linear` custom op.

    y = rewriter::fp8_weight_linear(x, w_fp8, w_scale, bias, out_dtype)

computes `x @ W.T + bias` with W stored once in float8_e4m3fn (1 byte per weight) and the activation
left as it is: the weight is widened to x's dtype inside the GEMM and each output column is multiplied
by its weight scale afterwards (W ~= w_fp8 * w_scale, w_scale 0-dim or [N]: per output channel).

    y = (linear(x, w_fp8.to(x.dtype)) * w_scale + bias).to(out_dtype)

What it is for: a decode step multiplies a handful of rows (the batch) by every weight, so it is bound
by the bytes of the weights it reads, not by FLOPs; FP8 weights halve them, and no activation is
quantized (no scale computation per call, no FP8 tensor cores needed). The widening is exact (every
e4m3 value is a bf16/fp16 value), so the only error is the weight's rounding to e4m3.

The op is registered with a CompositeImplicitAutograd kernel: torch.export keeps it as one node, and
running or tracing it (torch.compile) chooses one of two implementations:
  * `rewriter::fp8_weight_gemv` (rewriter/runtime/fp8_gemv.py), a Triton GEMV that reads each weight byte
    once, when x is on a CUDA sm_89+ device, triton is importable and x has at most GEMV_MAX_ROWS (16)
    rows in bf16/fp16 (a decode step); the same kernel eager, compiled and inside CUDA graphs;
  * otherwise the reference below (CPU, no triton, prefill-sized GEMMs, autograd): compiled, inductor may
    fuse the widening into its GEMM; eager, the widened weight is materialized on every call.
The choice depends only on static facts (device, dtypes, shapes), so a traced static decode graph makes
it once; `fp8_gemv.routing_counts()` counts the decisions (per eager call, per trace).

Before: x(bf16) -> linear(x, w_bf16, b)                                    -> y(bf16)   2 bytes per weight
After:  x(bf16) -> rewriter::fp8_weight_linear(x, w_fp8, w_scale, b, bf16) -> y(bf16)   1 byte per weight
"""
from __future__ import annotations

import warnings

import torch

from rewriter.runtime.fp8_gemv import fp8_weight_gemv, gemv_failed, gemv_skip_reason, note_route
from rewriter.runtime.fp8_ops import register_composite

__all__ = ["fp8_weight_linear", "fp8_weight_linear_reference", "fp8_weight_linear_op"]

_SCHEMA = "fp8_weight_linear(Tensor x, Tensor w_fp8, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor"


def fp8_weight_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """Implementation of `rewriter::fp8_weight_linear`: the Triton GEMV where it applies, else the reference
    (see the module docstring).

    Args:
        x: activation [..., K] (bf16 or fp16 in a converted graph; fp32 works too).
        w_fp8: weight [N, K], float8_e4m3fn.
        w_scale: fp32 dequantization scale of the weight, 0-dim or [N] (per output channel).
        bias: [N] or None.
        out_dtype: dtype of the result.

    Returns:
        [..., N] in `out_dtype`.
    """
    skip = gemv_skip_reason(x, w_fp8, w_scale, bias)
    if skip is None:
        try:
            y = fp8_weight_gemv(x, w_fp8, w_scale, bias, out_dtype)
        except Exception as exc:  # eager: Triton could not compile it here (tracing launches nothing)
            skip = gemv_failed(exc)
            warnings.warn(f"rewriter::fp8_weight_linear: {skip}; running the reference (linear on the widened "
                          "weight) instead", RuntimeWarning, stacklevel=2)
        else:
            note_route("triton gemv")
            return y
    note_route(f"reference: {skip}")
    return fp8_weight_linear_reference(x, w_fp8, w_scale, bias, out_dtype)


def fp8_weight_linear_reference(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                                bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The reference math of `fp8_weight_linear` in aten ops (what runs where the GEMV does not)."""
    y = torch.nn.functional.linear(x, w_fp8.to(x.dtype))
    y = y * w_scale.to(torch.float32)  # [N] broadcasts over the output columns; fp32 before the bias
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


_LIB = register_composite(_SCHEMA, "fp8_weight_linear", fp8_weight_linear)
fp8_weight_linear_op = torch.ops.rewriter.fp8_weight_linear.default
"""The OpOverload a converted graph calls: `torch.ops.rewriter.fp8_weight_linear.default`."""
