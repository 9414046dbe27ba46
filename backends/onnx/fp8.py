"""ONNX translations of `rewriter::fp8_linear`: Q/DQ in float8e4m3fn around a Gemm, or com.microsoft.GemmFloat8.

    torch.onnx.export(ep, dynamo=True, opset_version=19+,
                      custom_translation_table=translation_table(mode, compute))

Before (torch): y = rewriter::fp8_linear(x, w_fp8, w_scale, bias, x_scale|None, bf16)
After, fp8_gemm="qdq" (default; every EP), C the compute dtype (float, or float16: `qdq_compute`):
    x -> Cast(float) -> Reshape[-1, K] -> QuantizeLinear(s_x: float, float8e4m3fn zero point, saturate=1)
      -> DequantizeLinear(s_x: C) -> Gemm(., DequantizeLinear(w_fp8, w_scale: C, axis=0), bias: C,
      transB=1) -> Reshape[..., N] -> Cast(out dtype)
After, fp8_gemm="com.microsoft" (CUDA EP on sm_89+ only; per-tensor scales):
    x -> Cast(float) -> Reshape[-1, K] -> QuantizeLinear(s_x) -> GemmFloat8(., w_fp8, scaleA=s_x,
      scaleB=w_scale, transB=1, dtype=out dtype) -> Add(bias) -> Reshape[..., N]

Compute dtype. ONNX Runtime has no fusion of float8 Q/DQ + Gemm into an FP8 GEMM on the CUDA EP (its QDQ
fusions make QLinearMatMul/MatMulIntegerToFloat for int8, on the CPU EP), and its constant folding leaves
DequantizeLinear alone: the "qdq" form runs, every call, a QuantizeLinear and a DequantizeLinear over the
activation, a DequantizeLinear over the weight, and a Gemm in the DequantizeLinear's output dtype. In
float that Gemm is an fp32/TF32 cuBLAS GEMM and each activation pass moves 4-byte values; in float16 it is
the fp16 tensor-core GEMM the fp16 model runs, with 2-byte passes. `qdq_compute` picks float16 for the
CUDA EP when every scale and every GEMM output the ranges pass measured fits float16 (the same float8
values, dequantized with the scales rounded to float16: a relative 2^-11 on a whole tensor). So "qdq" cannot beat the fp16 model on ORT's
CUDA EP (it adds the Q/DQ passes to the same GEMM): it is the portable form (CPU EP, TensorRT's explicit
quantization); FP8 GEMMs in ORT are "com.microsoft".

s_x is the stored static scale, or ReduceMax(Abs(x)) / 448 per call (per tensor, or per row with axis=0
when the weight has per-output-channel scales): the quantized values the torch op computes (both round
x / s_x to e4m3 with saturation to +-448). Dtypes: x is quantized from float with the float scale (the torch op's
grid, which a float16 scale would shift);
ONNX Runtime's CUDA QuantizeLinear/DequantizeLinear take float or float16, not bfloat16; GemmFloat8 takes
float scales); the weights stay float8e4m3fn initializers, stored once, 1 byte each.

Which runtimes execute what:
  * ORT CPU EP: Q/DQ with float8e4m3fn as reference kernels, the Gemm in fp32 (right values, no speed-up).
  * ORT CUDA EP: float8 Q/DQ kernels, Gemm in the compute dtype for "qdq"; "com.microsoft" runs cuBLASLt's FP8
    GEMM (GemmFloat8, sm_89+). ORT has no fusion turning float8 Q/DQ + Gemm into GemmFloat8.
  * TensorRT reads float8 Q/DQ around GEMMs as explicit FP8 quantization (FP8 kernels on sm_89+).

GemmFloat8's cost per call, from its source (onnxruntime contrib_ops/cuda/math/gemm_float8.cu,
GemmFloat8::ComputeGemm, as stored at commit e02d3fec): cudaStreamSynchronize on the compute stream,
cublasLtCreate, cublasLtMatmulAlgoGetHeuristic, cudaMalloc of a 32 MiB workspace, the cuBLASLt FP8 GEMM,
cudaFree, cublasLtDestroy. Every FP8 GEMM therefore waits for the GPU to drain and pays a handle, a
heuristic query and an allocation on the host before its kernel is queued; its C input is a full M x N
matrix (beta * C), not a bias vector, hence the separate Add. tools/bench_ort_gemm.py times a chain of
each form on one GPU (per-GEMM microseconds).
"""
from __future__ import annotations

import functools
from typing import Callable

import onnx
import onnx_ir as ir
import torch.fx as fx

from rewriter import meta
from rewriter.errors import BackendError, describe_node
from rewriter.runtime.fp8_ops import E4M3_MAX, SCALE_EPS, fp8_linear_op

__all__ = ["ORT_CUDA_SPEED",
           "custom_translation_table", "translation_table", "fp8_linear_onnx", "fp8_linear_gemm_float8",
           "fp8_nodes", "check_gemm_float8", "type_gemm_float8", "MIN_OPSET", "FP8_GEMMS", "qdq_compute",
           "fp8_linear_onnx_fp16"]

ORT_CUDA_SPEED = (
    "speed on ONNX Runtime's CUDA EP: an FP8 GEMM there costs 2.9x (Q/DQ, Gemm in float16) to 9.6x "
    "(com.microsoft.GemmFloat8) an fp16 MatMul of the same shape (onnxruntime-gpu 1.31.1, H200, "
    "M=12288 K=N=1024: tools/bench_ort_gemm.py), so this file is smaller (1-byte weights) but not faster "
    "than an fp16 export; for FP8 speed run the converted model in PyTorch (backend='compile') or in TensorRT")
"""What export_onnx notes for an FP8 file whose target is ort-cuda (measured: tools/results/ort_gemm_h200.json)."""

MIN_OPSET = 19  # float8 types in QuantizeLinear/DequantizeLinear/Cast
FP8_GEMMS = ("qdq", "com.microsoft")
_FLOAT = onnx.TensorProto.FLOAT
_FLOAT8 = onnx.TensorProto.FLOAT8E4M3FN
_FLOAT16 = onnx.TensorProto.FLOAT16


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


def _quantized_input(op, x, w_scale, x_scale, k: int):
    """(float8 quantization of x as [rows, K], s_x, axis) shared by both translations: x and s_x in float,
    so that x is quantized on the grid of the torch op's float scale (a float16 scale would move it)."""
    per_channel = (_rank(w_scale) or 0) >= 1 and _dim(w_scale, 0) != 1
    x2d = op.Reshape(op.Cast(x, to=_FLOAT), op.Constant(value_ints=[-1, k]))
    if x_scale is None:
        if per_channel:
            amax = op.ReduceMax(op.Abs(x2d), op.Constant(value_ints=[1]), keepdims=0)
        else:
            amax = op.ReduceMax(op.Abs(x2d), keepdims=0)
        s_x = op.Div(op.Max(amax, op.Constant(value_float=SCALE_EPS)), op.Constant(value_float=E4M3_MAX))
    else:
        s_x = op.ReduceMax(op.Cast(x_scale, to=_FLOAT), keepdims=0)  # the one stored value, as a scalar
    axis = 0 if (x_scale is None and per_channel) else 1
    if axis == 0:  # one scale per row: a zero point of the same (dynamic) shape
        zero = op.Cast(op.Mul(s_x, op.Constant(value_float=0.0)), to=_FLOAT8)
    else:  # a scalar float8 zero point makes QuantizeLinear produce float8e4m3fn
        zero = op.Constant(value=onnx.helper.make_tensor("zero_point", _FLOAT8, [], [0.0]))
    q = op.QuantizeLinear(x2d, s_x, zero, axis=axis, saturate=1)
    return q, s_x, axis


def _qdq(x, w_fp8, w_scale, bias, x_scale, out_dtype: int, compute: int):
    from onnxscript import opset19 as op

    n, k = _dim(w_fp8, 0), _dim(w_fp8, 1)
    compute = compute if x_scale is not None else _FLOAT  # a dynamic scale may be below float16's range
    q, s_x, axis = _quantized_input(op, x, w_scale, x_scale, k)
    # DequantizeLinear's output dtype is its scale's: float16 values (exact: 448 x scale fits) for the Gemm
    x_deq = op.DequantizeLinear(q, s_x if compute == _FLOAT else op.Cast(s_x, to=compute), axis=axis)
    w_deq = op.DequantizeLinear(w_fp8, op.Cast(w_scale, to=compute), axis=0)
    if bias is not None:
        y = op.Gemm(x_deq, w_deq, op.Cast(bias, to=compute), transB=1)
    else:
        y = op.Gemm(x_deq, w_deq, transB=1)
    y = op.Reshape(y, op.Concat(op.Shape(x, start=0, end=-1), op.Constant(value_ints=[n]), axis=0))
    return op.Cast(y, to=out_dtype)


def fp8_linear_onnx(x, w_fp8, w_scale, bias=None, x_scale=None, out_dtype: int = onnx.TensorProto.BFLOAT16,
                    fast_accum: bool = True):
    """Q/DQ translation of `rewriter::fp8_linear` in float (module docstring); `fast_accum` has no ONNX
    meaning."""
    return _qdq(x, w_fp8, w_scale, bias, x_scale, out_dtype, _FLOAT)


def fp8_linear_onnx_fp16(x, w_fp8, w_scale, bias=None, x_scale=None, out_dtype: int = onnx.TensorProto.BFLOAT16,
                         fast_accum: bool = True):
    """Q/DQ translation of `rewriter::fp8_linear` with the DequantizeLinear outputs and the Gemm in float16
    (static activation scales; with a dynamic one all in float): qdq_compute."""
    return _qdq(x, w_fp8, w_scale, bias, x_scale, out_dtype, _FLOAT16)


def fp8_linear_gemm_float8(x, w_fp8, w_scale, bias=None, x_scale=None,
                           out_dtype: int = onnx.TensorProto.BFLOAT16, fast_accum: bool = True):
    """com.microsoft.GemmFloat8 translation of `rewriter::fp8_linear` (module docstring); per-tensor scales."""
    from onnxscript import opset19 as op
    from onnxscript.values import Op, Opset

    gemm_float8 = Op(Opset("com.microsoft", 1), "GemmFloat8", _gemm_float8_schema())
    n, k = _dim(w_fp8, 0), _dim(w_fp8, 1)
    q, s_x, _ = _quantized_input(op, x, w_scale, x_scale, k)
    s_w = op.ReduceMax(op.Cast(w_scale, to=_FLOAT), keepdims=0)  # per tensor: one value, as a scalar
    y = gemm_float8(q, w_fp8, None, s_x, s_w, transA=0, transB=1, dtype=out_dtype)
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=out_dtype))
    return op.Reshape(y, op.Concat(op.Shape(x, start=0, end=-1), op.Constant(value_ints=[n]), axis=0))



@functools.lru_cache(maxsize=None)
def _gemm_float8_schema():
    """The schema of com.microsoft.GemmFloat8 (ONNX Runtime's contrib op; onnx itself does not know it),
    as ONNX Runtime 1.2x registers it, so that onnxscript can trace the translation."""
    from onnx.defs import OpSchema

    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    operands = ["tensor(float8e4m3fn)", "tensor(float8e5m2)", "tensor(float16)", "tensor(bfloat16)", "tensor(float)"]
    floats = ["tensor(float16)", "tensor(bfloat16)", "tensor(float)"]
    attrs = [("transA", OpSchema.AttrType.INT), ("transB", OpSchema.AttrType.INT), ("dtype", OpSchema.AttrType.INT),
             ("alpha", OpSchema.AttrType.FLOAT), ("beta", OpSchema.AttrType.FLOAT),
             ("activation", OpSchema.AttrType.STRING)]
    return OpSchema(
        "GemmFloat8", "com.microsoft", 1,
        inputs=[param("A", "TA"), param("B", "TB"), param("C", "TC", param_option=optional),
                param("scaleA", "TS", param_option=optional), param("scaleB", "TS", param_option=optional),
                param("scaleY", "TS", param_option=optional)],
        outputs=[param("Y", "TR")],
        type_constraints=[("TA", operands, ""), ("TB", operands, ""), ("TC", floats, ""), ("TS", ["tensor(float)"], ""),
                          ("TR", operands, "")],
        attributes=[OpSchema.Attribute(name, kind, "") for name, kind in attrs])


def type_gemm_float8(model) -> int:
    """Give each GemmFloat8 output its dtype (its `dtype` attribute): ONNX shape inference does not know
    contrib ops, and the report and the checks read value dtypes. Returns how many were typed."""
    count = 0
    for node in model.graph:
        if node.op_type == "GemmFloat8" and node.domain == "com.microsoft" and "dtype" in node.attributes:
            node.outputs[0].dtype = ir.DataType(node.attributes["dtype"].as_int())
            count += 1
    return count


def translation_table(fp8_gemm: str = "qdq", compute: str = "float32") -> dict[object, Callable]:
    """{torch op: ONNX translation} of the FP8 GEMMs for torch.onnx.export(custom_translation_table=...);
    `compute`: "float32" or "float16" (qdq_compute)."""
    if fp8_gemm not in FP8_GEMMS:
        raise ValueError(f"fp8_gemm={fp8_gemm!r}: one of {FP8_GEMMS}")
    if compute not in ("float32", "float16"):
        raise ValueError(f"compute={compute!r}: 'float32' or 'float16'")
    if fp8_gemm == "com.microsoft":  # the GEMM reads float8 itself; x is quantized from float either way
        return {fp8_linear_op: fp8_linear_gemm_float8}
    return {fp8_linear_op: fp8_linear_onnx_fp16 if compute == "float16" else fp8_linear_onnx}


_FP16_MAX = 65504.0
_FP16_TINY = 2.0 ** -14  # smallest normal float16: a smaller scale would lose bits or round to zero


def qdq_compute(gm: fx.GraphModule, target: str) -> tuple[str, str]:
    """(compute dtype of the FP8 GEMMs' translation, why): "float16" for the CUDA EP when every FP8 GEMM
    has a static activation scale, its scales are float16 normals whose float8 range (448 x scale) fits
    float16, and its output amax (the ranges pass's, where measured) is below half of float16's maximum;
    else "float32"."""
    if target != "ort-cuda":
        return "float32", f"target {target}: Q/DQ and the GEMM in float (fp16 is chosen for ort-cuda only)"
    for node in fp8_nodes(gm):
        x_scale, w_scale = node.args[4] if len(node.args) > 4 else None, node.args[2]
        if x_scale is None:
            return "float32", f"{node.name} scales its activation dynamically: Q/DQ in float"
        for name, scale in (("activation", x_scale), ("weight", w_scale)):
            value = _constant(gm, scale)
            if value is None:
                return "float32", f"{node.name}: its {name} scale is not a stored constant: Q/DQ in float"
            lo, hi = float(value.min()), float(value.max())
            if lo < _FP16_TINY or hi * 448.0 > _FP16_MAX:
                return "float32", (f"{node.name}: its {name} scale ({lo:.3g}..{hi:.3g}) does not fit float16 "
                                   "(a normal, with 448 x scale <= 65504): Q/DQ in float")
        amax = (meta.get(node, meta.RANGE) or {}).get("amax")
        if amax is not None and float(amax) > _FP16_MAX / 2:
            return "float32", f"{node.name}: its output reaches {float(amax):.3g} (measured): the GEMM in float"
    return "float16", ("target ort-cuda: scales, dequantized values and GEMM outputs fit float16, so the "
                       "Q/DQ and the GEMM run in float16 (ORT's CUDA Q/DQ kernels take float and float16; "
                       "a float GEMM is an fp32/TF32 GEMM)")


def _constant(gm: fx.GraphModule, value):
    """The tensor a get_attr node reads, or None."""
    if not isinstance(value, fx.Node) or value.op != "get_attr":
        return None
    obj = gm
    for part in value.target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj.detach().float() if hasattr(obj, "detach") else None


def custom_translation_table() -> dict[object, Callable]:
    """The Q/DQ translation table (needs opset >= MIN_OPSET)."""
    return translation_table("qdq")


def fp8_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The FP8 GEMMs (`rewriter::fp8_linear`) of a converted graph."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fp8_linear_op]


def check_gemm_float8(gm: fx.GraphModule) -> None:
    """Refuse, naming the node, an FP8 GEMM that GemmFloat8 cannot compute (it takes one scale per tensor)."""
    for node in fp8_nodes(gm):
        w_scale = node.args[2]
        val = w_scale.meta.get("val") if isinstance(w_scale, fx.Node) else None
        if val is not None and val.numel() != 1:
            raise BackendError(
                f"fp8_gemm='com.microsoft' cannot export {describe_node(node)}: its weight has "
                f"{val.numel()} per-channel scales and com.microsoft.GemmFloat8 takes one scale per tensor. "
                "Convert with Fp8Options(granularity='tensor') or export with fp8_gemm='qdq'.")
