"""Run-time piece of FP8 training: `fp8_linear_train`, a linear whose three GEMMs run in FP8.

    y = fp8_linear_train(x, weight, bias, out_dtype, fast_accum=True)

computes `x @ weight.T + bias` the way torchao's Float8Linear and TransformerEngine do with dynamic
per-tensor scaling (`Fp8LinearTrain`, a torch.autograd.Function):

  forward   x [..., K] (bf16) and weight [N, K] (the fp32 master parameter) are quantized on every
            call to float8_e4m3fn, each with its dequantization scale amax / 448 (weights change every
            step: no static scales, nothing stored in FP8); y = x_fp8 @ w_fp8.T in `out_dtype`, the bias
            added in the GEMM's epilogue. Saved for backward: x_fp8, w_fp8 and their scales, 1 byte per
            element where autograd would keep the bf16 x (2 bytes).
  backward  grad_out is quantized to float8_e5m2 (5 exponent bits, 2 mantissa bits: gradients need
            range more than precision) with its dequantization scale amax / 57344, then
                grad_x    = grad_e5m2 @ w_fp8     in x's dtype
                grad_w    = grad_e5m2.T @ x_fp8   in fp32 (the master weight's gradient)
                grad_bias = grad_out summed in fp32, in the bias's dtype
            both GEMMs accumulate in fp32 without fast accumulation (torchao's backward default).

On a device with FP8 GEMMs (CUDA sm_89+, `fp8_gemm_supported`) each GEMM is one `torch._scaled_mm`:
mat1 row-major, mat2 column-major, so grad_x reads `w_fp8.t().contiguous().t()` and grad_w multiplies
`grad.t().contiguous()` by `x_fp8.t().contiguous().t()` (one transposed float8 copy each). Elsewhere the
same quantized operands are dequantized and multiplied in fp32: the emulation of rewriter/runtime/fp8_ops.py,
same numerics, no speed-up, one Fp8EmulationWarning per process. torch.compile traces the Function
(forward and backward), so inductor fuses the quantization into the neighbouring kernels.

Before: x(bf16) -> linear(x, cast(w_fp32 -> bf16), b) -> y(bf16)     forward, grad_x, grad_w in bf16
After:  x(bf16) -> fp8_linear_train(x, w_fp32, b, bf16) -> y(bf16)   forward, grad_x, grad_w in FP8
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rewriter.runtime import fp8_ops
from rewriter.runtime.fp8_ops import FP8_DIM_MULTIPLE, FP8_DTYPE, activation_scale, quantize_activation

__all__ = ["GRAD_DTYPE", "E5M2_MAX", "Fp8LinearTrain", "fp8_linear_train", "quantize_tensorwise"]

GRAD_DTYPE = torch.float8_e5m2
E5M2_MAX = float(torch.finfo(GRAD_DTYPE).max)  # 57344: largest finite float8_e5m2


def quantize_tensorwise(t2d: torch.Tensor, dtype: torch.dtype = FP8_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D tensor to `dtype` with its dynamic per-tensor scale.

    Args:
        t2d: an activation, weight or gradient, [rows, cols], any float dtype.
        dtype: float8_e4m3fn (scale amax / 448) or float8_e5m2 (GRAD_DTYPE, scale amax / 57344).

    Returns:
        (q, scale): q in `dtype`, row-major (what `torch._scaled_mm` reads, also for a transposed t2d
        such as GPT-2's [K, N] weight viewed [N, K]), scale a 0-dim fp32 dequantization scale,
        t2d ~= q.float() * scale.

    Example:
        >>> g = torch.randn(32, 16)
        >>> q, s = quantize_tensorwise(g, GRAD_DTYPE)
        >>> q.dtype, bool(s == g.abs().max() / 57344)
        (torch.float8_e5m2, True)
    """
    scale = activation_scale(t2d, per_row=False, dtype=dtype)
    return quantize_activation(t2d, scale, saturate=False, dtype=dtype).contiguous(), scale


@torch.compiler.assume_constant_result
def _fp8_gemms(device: torch.device) -> bool:
    """fp8_gemm_supported(device); under torch.compile a constant of the graph, evaluated at trace time
    (dynamo would otherwise trace into its lru_cache and warn)."""
    return fp8_ops.fp8_gemm_supported(device)


def _gemm(a: torch.Tensor, s_a: torch.Tensor, b: torch.Tensor, s_b: torch.Tensor, bias, out_dtype,
          fast_accum: bool) -> torch.Tensor:
    """(a * s_a) @ (b * s_b).T for row-major float8 a [M, K] and b [N, K] with 0-dim scales."""
    if _fp8_gemms(a.device):
        pad = -a.shape[1] % FP8_DIM_MULTIPLE  # grad_w's inner dimension is batch x seq: zero-pad it
        if pad:
            a, b = F.pad(a, (0, pad)), F.pad(b, (0, pad))
        return fp8_ops._scaled_mm(a, s_a, b, s_b, bias, out_dtype, fast_accum, False)
    if not fp8_ops._is_traced(a):
        fp8_ops._NOTICE.note(a.device)
    return fp8_ops._emulated_mm(a, s_a, b, s_b, bias, out_dtype)


class Fp8LinearTrain(torch.autograd.Function):
    """y = x @ weight.T + bias with FP8 forward and backward GEMMs (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, out_dtype, fast_accum):
        x_fp8, x_scale = quantize_tensorwise(x.reshape(-1, x.shape[-1]))
        w_fp8, w_scale = quantize_tensorwise(weight)
        y = _gemm(x_fp8, x_scale, w_fp8, w_scale, bias, out_dtype, fast_accum)
        ctx.save_for_backward(x_fp8, x_scale, w_fp8, w_scale)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x_fp8, x_scale, w_fp8, w_scale = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if need_x or need_w:
            g_fp8, g_scale = quantize_tensorwise(grad2d, GRAD_DTYPE)
        if need_x:  # [M, N] @ [N, K]
            grad_x = _gemm(g_fp8, g_scale, w_fp8.t().contiguous(), w_scale, None, ctx.x_dtype, False)
            grad_x = grad_x.reshape(ctx.x_shape)
        if need_w:  # [N, M] @ [M, K]
            grad_w = _gemm(g_fp8.t().contiguous(), g_scale, x_fp8.t().contiguous(), x_scale, None,
                           torch.float32, False).to(ctx.w_dtype)
        if need_b:
            grad_b = grad2d.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None


def fp8_linear_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     out_dtype: torch.dtype, fast_accum: bool = True) -> torch.Tensor:
    """The call_function target of an FP8 training GEMM (passes/lower/fp8.py in mode="train").

    Args:
        x: activation [..., K] (bf16 in a converted graph).
        weight: the fp32 master weight [N, K] (a parameter, or its transpose for a [K, N] weight).
        bias: [N] or None.
        out_dtype: dtype of y (bf16).
        fast_accum: forward GEMM with `torch._scaled_mm(use_fast_accum=True)`, as torchao's forward.

    Returns:
        [..., N] in `out_dtype`; differentiable in x, weight and bias.
    """
    return Fp8LinearTrain.apply(x, weight, bias, out_dtype, fast_accum)
