"""ONNX translation of `rewriter::fp8_linear`: QuantizeLinear/DequantizeLinear in float8e4m3fn around a Gemm.

    torch.onnx.export(ep, dynamo=True, opset_version=19+, custom_translation_table=custom_translation_table())

Before (torch): y = rewriter::fp8_linear(x, w_fp8, w_scale, bias, x_scale|None, bf16)
After (ONNX, opset >= 19):
    x -> Cast(float) -> Reshape[-1, K] -> QuantizeLinear(s_x, zero point float8e4m3fn) -> DequantizeLinear(s_x)
    w_fp8 (float8e4m3fn initializer) -> DequantizeLinear(w_scale[, axis=0])
    -> Gemm(x_deq, w_deq, bias, transB=1) -> Reshape[..., N] -> Cast(out dtype)
where s_x is the stored static scale, or for dynamic scaling ReduceMax(Abs(x)) / 448 (per tensor, or
per row with axis=0 when the weight has per-output-channel scales). These are the same quantized
values the torch op computes (both round x / s_x to e4m3 with saturation to +-448), multiplied in fp32.

Which runtimes execute what:
  * ONNX Runtime CPU EP (checked in tests): QuantizeLinear/DequantizeLinear with float8e4m3fn (opset 19)
    run as reference kernels, the Gemm in fp32 (no FP8 arithmetic): right values, no speed-up.
  * ONNX Runtime CUDA EP: has float8 QuantizeLinear/DequantizeLinear kernels (opset 19) and runs the
    Gemm in fp32/TF32 after them. Its float8 GEMM is the contrib op com.microsoft.GemmFloat8 (cuBLASLt,
    sm_89+); ORT's Q/DQ fusions target the int8 ops, and none we found in its sources turns float8 Q/DQ
    + Gemm into GemmFloat8. Expect 1-byte weights in the file and in memory, and fp32 GEMM time, not
    FP8's. Not measured (no GPU here).
  * TensorRT (EP or trtexec) reads Q/DQ float8e4m3fn around GEMMs as explicit FP8 quantization and builds
    FP8 kernels on sm_89+: the runtime that turns this graph into FP8 tensor-core GEMMs.

Example:
    >>> prog = torch.onnx.export(ep, (), dynamo=True, opset_version=21,
    ...                          custom_translation_table=custom_translation_table())
    >>> onnx.checker.check_model(prog.model_proto, full_check=True)
"""
from __future__ import annotations

from typing import Callable

import onnx

__all__ = ["custom_translation_table", "fp8_linear_onnx", "MIN_OPSET"]

MIN_OPSET = 19  # float8 types in QuantizeLinear/DequantizeLinear/Cast
_E4M3_MAX = 448.0
_SCALE_EPS = 1e-12  # = rewriter.runtime.fp8_ops.SCALE_EPS
_FLOAT = onnx.TensorProto.FLOAT
_FLOAT8 = onnx.TensorProto.FLOAT8E4M3FN


def _rank(value) -> int | None:
    shape = getattr(value, "shape", None)
    try:
        return None if shape is None else len(shape)
    except TypeError:
        return None


def _dim(value, axis: int) -> int:
    size = value.shape[axis]
    value_int = getattr(size, "value", size)
    if not isinstance(value_int, int):
        raise ValueError(f"fp8_linear ONNX export needs a static weight shape, got {value.shape}")
    return value_int


def fp8_linear_onnx(x, w_fp8, w_scale, bias=None, x_scale=None, out_dtype: int = onnx.TensorProto.BFLOAT16,
                    fast_accum: bool = True):
    """onnxscript translation of `rewriter::fp8_linear` (see the module docstring).

    `out_dtype` arrives as an ONNX TensorProto data type; `fast_accum` has no ONNX meaning (ignored).
    """
    from onnxscript import opset19 as op

    n, k = _dim(w_fp8, 0), _dim(w_fp8, 1)
    per_channel = (_rank(w_scale) or 0) >= 1 and _dim(w_scale, 0) != 1
    xf = op.Cast(x, to=_FLOAT)
    x2d = op.Reshape(xf, op.Constant(value_ints=[-1, k]))
    if x_scale is None:
        if per_channel:
            amax = op.ReduceMax(op.Abs(x2d), op.Constant(value_ints=[1]), keepdims=0)
        else:
            amax = op.ReduceMax(op.Abs(x2d), keepdims=0)
        s_x = op.Div(op.Max(amax, op.Constant(value_float=_SCALE_EPS)), op.Constant(value_float=_E4M3_MAX))
    else:
        s_x = op.Cast(x_scale, to=_FLOAT)
    # a float8 zero point (shaped like the scale) makes QuantizeLinear produce float8e4m3fn at opset 19
    zero = op.Cast(op.Mul(s_x, op.Constant(value_float=0.0)), to=_FLOAT8)
    axis = 0 if (x_scale is None and per_channel) else 1
    q = op.QuantizeLinear(x2d, s_x, zero, axis=axis, saturate=1)
    x_deq = op.DequantizeLinear(q, s_x, axis=axis)
    w_deq = op.DequantizeLinear(w_fp8, op.Cast(w_scale, to=_FLOAT), axis=0)
    if bias is not None:
        y = op.Gemm(x_deq, w_deq, op.Cast(bias, to=_FLOAT), transB=1)
    else:
        y = op.Gemm(x_deq, w_deq, transB=1)
    lead = op.Shape(x, start=0, end=-1)
    y = op.Reshape(y, op.Concat(lead, op.Constant(value_ints=[n]), axis=0))
    return op.Cast(y, to=out_dtype)


def custom_translation_table() -> dict[object, Callable]:
    """{torch op: ONNX translation} for the rewriter's custom ops, for torch.onnx.export(dynamo=True).

    Returns:
        A dict to pass as `custom_translation_table=` (merge it with others'); needs opset >= MIN_OPSET.
    """
    from rewriter.runtime.fp8_ops import fp8_linear_op

    return {fp8_linear_op: fp8_linear_onnx}
