"""Run-time piece of adaptive precision: `adaptive_linear_train`, an FP8 training GEMM with a precision switch.

    y = adaptive_linear_train(x, weight, bias, out_dtype, fast_accum, state, stats)

is `fp8_linear_train` (rewriter/runtime/fp8_train_ops.py) plus two small per-layer buffers:

  state  int64 CPU tensor [3], read on every call (on the host: no device sync): state[0] the precision,
         0 = FP8 (e4m3 forward, e5m2 gradients, dynamic per-tensor scales), 1 = BF16 (operands cast to
         bf16, fp32 accumulation), 2 = FP32; state[1] = 1 asks for the sampled SQNR on this step;
         state[2] = 1 observes this step (0: no statistics at all, the bare GEMM). The
         controller (rewriter/adaptive.py) writes it between steps; one graph runs every layer in the
         precision its state says, nothing is recaptured or recompiled.
  stats  1-D fp32 tensor of N_STATS slots (`SLOTS`), updated in place without autograd on every call in
         every precision while observing and autograd is on (eval forwards under no_grad are not counted),
         measured in the *target* format (e4m3 for x and weight, e5m2 for grad_out) so
         a layer running BF16 keeps reporting whether FP8 would be healthy again. Slots accumulate by
         max between two controller steps (several micro-batches), the controller reads and clears them.

Statistics (all cheap reductions over tensors the GEMM reads anyway):
  *_amax       the per-tensor amax (the dynamic scale's numerator);
  *_underflow  fraction of the nonzero values that flush to zero after scaling (|v| / scale below half
               the format's smallest subnormal): a large outlier stretches the scale and erases the rest;
  *_overflow   fraction of values above the previous step's amax (what a delayed-scaling recipe would
               saturate) plus non-finite values: amax growth within a step;
  *_neg_sqnr   minus the quantization SQNR in dB (so that max-accumulation keeps the worst), computed only
               when state[1] is 1 (the controller sets it every `sample_every` steps);
  gnorm_dev    on a sampled step of an FP8 layer: | ||grad_x (e5m2 x e4m3)|| / ||grad_x (bf16)|| - 1 |, the
               gradient-norm ratio against the high-precision reference (one extra GEMM, sampled steps only);
  flops        2*M*N*K of the forwards since the last controller step (it weighs precision shares by it).

Under torch.compile the op is `torch.compiler.disable`d: dynamo breaks the graph around it and never
guards on `state`'s value, so switching a layer costs no recompilation and the number of compiled graphs
is bounded by the number of adaptive layers + 1, whatever the switches. The price is the lost fusion of
the quantization into neighbouring kernels; static FP8 (no controller) keeps the fused path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rewriter.runtime.fp8_ops import FP8_DTYPE
from rewriter.runtime.fp8_train_ops import GRAD_DTYPE, Fp8LinearTrain, quantize_tensorwise

__all__ = ["FP8", "BF16", "FP32", "PRECISIONS", "SLOTS", "ACCUMULATED", "N_STATS", "adaptive_linear_train",
           "new_buffers"]

FP8, BF16, FP32 = 0, 1, 2
PRECISIONS = ("fp8", "bf16", "fp32")
SLOTS = ("x_amax", "w_amax", "g_amax", "x_underflow", "w_underflow", "g_underflow", "x_overflow",
         "g_overflow", "x_neg_sqnr", "g_neg_sqnr", "x_prev_amax", "g_prev_amax", "flops", "nonfinite",
         "gnorm_dev")
N_STATS = len(SLOTS)
_I = {name: i for i, name in enumerate(SLOTS)}
# the accumulated slots (max between controller steps); the others are written by the controller
ACCUMULATED = ("x_amax", "w_amax", "g_amax", "x_underflow", "w_underflow", "g_underflow", "x_overflow",
               "g_overflow", "x_neg_sqnr", "g_neg_sqnr", "flops", "nonfinite", "gnorm_dev")


def new_buffers(device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(state, stats) of one layer: FP8, no sample, all statistics zero, no sampled SQNR (-inf).
    `state` stays on the CPU (read by the host), `stats` lives on `device` (the layer's)."""
    stats = torch.zeros(N_STATS, dtype=torch.float32, device=device)
    stats[_I["x_neg_sqnr"]] = stats[_I["g_neg_sqnr"]] = float("-inf")
    return torch.tensor([FP8, 0, 1], dtype=torch.int64), stats


def _reduce(t: torch.Tensor, prev_amax: torch.Tensor, fmt_max: float, tiny: float) -> torch.Tensor:
    """[amax, underflow, overflow, nonfinite] of `t` scaled to a format of largest value `fmt_max` and
    smallest subnormal `tiny` (`prev_amax` <= 0: no previous amax, overflow counts non-finite values only).
    Pure: on CUDA it runs compiled (`_reducer`), one or two fused passes over `t` instead of ten."""
    t = t.float()
    finite = torch.isfinite(t)
    a = t.abs()
    amax = torch.where(finite, a, torch.zeros_like(a)).amax()
    scale = amax / fmt_max
    nonzero = (a > 0).sum().clamp_min(1)
    under = ((a > 0) & (a < scale * tiny / 2)).sum() / nonzero
    nonfinite = (~finite).float().mean()
    over = torch.where(prev_amax > 0, ((a > prev_amax) | ~finite).float().mean(), nonfinite)
    return torch.stack([amax, under.float(), over, nonfinite])


_COMPILED: dict = {}


def _reducer(t: torch.Tensor):
    """`_reduce`, compiled once per device type (dynamic shapes) on CUDA; eager elsewhere (a CPU compile
    costs seconds and the statistics are cheap there relative to the CPU GEMMs)."""
    if t.device.type != "cuda":
        return _reduce
    if "cuda" not in _COMPILED:
        _COMPILED["cuda"] = torch.compile(_reduce, dynamic=True, fullgraph=True)
    return _COMPILED["cuda"]


def _observe(t: torch.Tensor, fmt: torch.dtype, stats: torch.Tensor, prefix: str, sample: bool) -> None:
    """Write the statistics of `t` quantized to `fmt` into `stats` (max with what is there)."""
    t = t.detach()
    info = torch.finfo(fmt)
    prev = stats[_I[prefix + "_prev_amax"]] if prefix in ("x", "g") else stats.new_zeros(())
    r = _reducer(t)(t, prev, float(info.max), float(info.smallest_normal * info.eps))
    s = stats
    s[_I["nonfinite"]] = torch.maximum(s[_I["nonfinite"]], r[3])
    s[_I[prefix + "_amax"]] = torch.maximum(s[_I[prefix + "_amax"]], r[0])
    s[_I[prefix + "_underflow"]] = torch.maximum(s[_I[prefix + "_underflow"]], r[1])
    if prefix in ("x", "g"):
        s[_I[prefix + "_overflow"]] = torch.maximum(s[_I[prefix + "_overflow"]], r[2])
        if sample:
            t = t.float()
            q, sc = quantize_tensorwise(t.reshape(-1, t.shape[-1]), fmt)
            err = (q.float() * sc - t.reshape(q.shape)).pow(2).sum()
            neg = -10 * torch.log10(t.pow(2).sum().clamp_min(1e-30) / err.clamp_min(1e-30))
            s[_I[prefix + "_neg_sqnr"]] = torch.maximum(s[_I[prefix + "_neg_sqnr"]], neg)


class _HighPrecisionLinear(torch.autograd.Function):
    """y = x @ w.T + b with operands cast to `compute` (bf16 or fp32); gradient statistics still observed."""

    @staticmethod
    def forward(ctx, x, weight, bias, out_dtype, compute, stats, sample):
        xc, wc = x.to(compute), weight.to(compute)
        y = F.linear(xc, wc, None if bias is None else bias.to(compute))
        ctx.save_for_backward(xc, wc)
        ctx.dtypes, ctx.stats = (x.dtype, weight.dtype, None if bias is None else bias.dtype), stats
        ctx.sample = sample
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xc, wc = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        if ctx.stats is not None:
            with torch.no_grad():
                _observe(grad_out, GRAD_DTYPE, ctx.stats, "g", ctx.sample)
        g = grad_out.to(xc.dtype).reshape(-1, grad_out.shape[-1])
        grad_x = (g @ wc).reshape(xc.shape).to(x_dtype) if ctx.needs_input_grad[0] else None
        grad_w = (g.t().float() @ xc.reshape(-1, xc.shape[-1]).float()).to(w_dtype) \
            if ctx.needs_input_grad[1] else None
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0, dtype=torch.float32).to(b_dtype) \
            if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None


class _GradProbe(torch.autograd.Function):
    """Identity on y whose backward observes grad_out (the e5m2 statistics of an FP8 layer)."""

    @staticmethod
    def forward(ctx, y, stats, sample, weight):
        ctx.stats, ctx.sample = stats, sample
        ctx.weight = weight.detach() if sample else None
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        with torch.no_grad():
            _observe(grad, GRAD_DTYPE, ctx.stats, "g", ctx.sample)
            if ctx.weight is not None:
                g2d = grad.reshape(-1, grad.shape[-1])
                ref = g2d.bfloat16() @ ctx.weight.bfloat16()
                gq, gs = quantize_tensorwise(g2d, GRAD_DTYPE)
                wq, ws = quantize_tensorwise(ctx.weight)
                low = (gq.float() * gs) @ (wq.float() * ws)
                dev = (low.norm() / ref.float().norm().clamp_min(1e-30) - 1).abs()
                i = _I["gnorm_dev"]
                ctx.stats[i] = torch.maximum(ctx.stats[i], dev)
        return grad, None, None, None


@torch.compiler.disable
def adaptive_linear_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          out_dtype: torch.dtype, fast_accum: bool, state: torch.Tensor,
                          stats: torch.Tensor) -> torch.Tensor:
    """The call_function target of an adaptive FP8 training GEMM (rewriter/adaptive.py installs it).

    Args:
        x, weight, bias, out_dtype, fast_accum: as `fp8_linear_train`.
        state: int64 CPU tensor [precision (FP8 / BF16 / FP32 = 0 / 1 / 2), sample SQNR (0 / 1), observe (0 / 1)].
        stats: the layer's statistics buffer (`SLOTS`), updated in place.

    Returns:
        [..., N] in `out_dtype`, differentiable in x, weight and bias.
    """
    precision, sample, observe = state.tolist()
    observe = bool(observe) and torch.is_grad_enabled()
    sample = bool(sample) and observe
    if observe:
        with torch.no_grad():
            _observe(x, FP8_DTYPE, stats, "x", sample)
            _observe(weight, FP8_DTYPE, stats, "w", False)
            stats[_I["flops"]] += 2.0 * x.numel() * weight.shape[0]
    if precision == FP8:
        y = Fp8LinearTrain.apply(x, weight, bias, out_dtype, fast_accum)
    else:
        compute = torch.bfloat16 if precision == BF16 else torch.float32
        return _HighPrecisionLinear.apply(x, weight, bias, out_dtype, compute, stats if observe else None, sample)
    return _GradProbe.apply(y, stats, sample, weight) if observe and y.requires_grad else y
