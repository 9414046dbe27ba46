"""Run-time piece of adaptive precision: `adaptive_linear_train`, an FP8 training GEMM with a precision switch.

    y = adaptive_linear_train(x, weight, bias, out_dtype, fast_accum, switch)

is `fp8_linear_train` (rewriter/runtime/fp8_train_ops.py) plus the layer's `LayerSwitch`
(rewriter/runtime/adaptive_switch.py), whose plain int flags the op reads in Python:

  switch.precision  0 = FP8 (e4m3 forward, e5m2 gradients, dynamic per-tensor scales), 1 = BF16 (operands
                    cast to bf16, fp32 accumulation), 2 = FP32;
  switch.observe    1: record statistics on this step; 0: the bare GEMM (exactly static FP8's graph);
  switch.sample     1: also the sampled SQNR and gradient-norm check on this step.
  switch.stats      fp32 [N_STATS] slots (`SLOTS`): forward statistics written in place, gradient statistics
                    merged from `switch.probe`'s gradient (see adaptive_switch.py), both by max between two
                    controller steps (several micro-batches), measured in the *target* format (e4m3 for x and
                    weight, e5m2 for grad_out) in every precision, so a layer running BF16 keeps reporting
                    whether FP8 would be healthy again; only while observing with autograd on (eval forwards
                    under no_grad are not counted).

Statistics (all cheap reductions over tensors the GEMM reads anyway; the fractions of tensors above 2^20
values are estimated on every k-th row, see `_reduce`):
  *_amax       the per-tensor amax (the dynamic scale's numerator, shared with the quantization);
  *_underflow  fraction of the nonzero values that flush to zero after scaling (|v| / scale below half
               the format's smallest subnormal): a large outlier stretches the scale and erases the rest;
  *_overflow   fraction of values above the previous step's amax (what a delayed-scaling recipe would
               saturate) plus non-finite values: amax growth within a step;
  *_neg_sqnr   minus the quantization SQNR in dB (so that max-accumulation keeps the worst), on sampled steps;
  gnorm_dev    on a sampled step of an FP8 layer: | ||grad_x (e5m2 x e4m3)|| / ||grad_x (bf16)|| - 1 |, the
               gradient-norm ratio against the high-precision reference (one extra GEMM, sampled steps only);
  flops        2*M*N*K of the forwards since the last controller step (it weighs precision shares by it).

Under torch.compile the op is traced (no graph break): dynamo specialises on the switch's ints, so the graph
holds one path per layer and inductor fuses the quantization and the statistics' reductions into the
neighbouring kernels as in static FP8. A switch is a new combination of flags: one new graph variant, compiled
once and cached (rewriter/adaptive.py bounds how many). Cost model: an unobserved step costs what static FP8
costs; an observed step adds, per layer, a few reductions over x and weight in the forward and over grad_out
in the backward (fused with the amax the quantization computes anyway), and a sampled step adds the SQNR and
one extra bf16 GEMM for the gradient-norm reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rewriter.runtime.adaptive_switch import LayerSwitch, merge_max, stat_vector
from rewriter.runtime.fp8_ops import FP8_DTYPE, quantize_activation
from rewriter.runtime.fp8_train_ops import GRAD_DTYPE, Fp8LinearTrain, quantize_tensorwise

__all__ = ["FP8", "BF16", "FP32", "PRECISIONS", "SLOTS", "ACCUMULATED", "N_STATS", "adaptive_linear_train",
           "new_switch"]

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


def new_switch(device=None) -> LayerSwitch:
    """The switch of one layer: FP8, observed, no sample, statistics zero, no sampled SQNR (-inf)."""
    switch = LayerSwitch(N_STATS, device)
    switch.stats[_I["x_neg_sqnr"]] = switch.stats[_I["g_neg_sqnr"]] = float("-inf")
    return switch


_SUBSAMPLE = 1 << 20  # the fractions are estimated on about this many values (every k-th row) of larger tensors


def _reduce(t: torch.Tensor, prev_amax: torch.Tensor, fmt_max: float, tiny: float) -> torch.Tensor:
    """[amax, underflow, overflow, nonfinite] of a 2-D `t` scaled to a format of largest value `fmt_max` and
    smallest subnormal `tiny` (`prev_amax` <= 0: no previous amax, overflow counts non-finite values only).

    amax is the quantization's own reduction (the same `vector_norm(t, inf)` as `activation_scale`, so
    AOTAutograd's common-subexpression elimination shares it with the FP8 cast of the same tensor); the
    fractions are counted on every k-th row of tensors above `_SUBSAMPLE` values (all columns, so outlier
    channels are seen; a share estimated on ~1e6 values), which makes the statistics of an observed step a
    small fraction of the traffic of the quantization itself. Non-finite values outside the sampled rows
    still show: amax is then non-finite, and the layer's non-finite share is at least one value. Pure:
    traced into the model's graph under torch.compile; compiled on its own on CUDA in eager mode."""
    amax_all = torch.linalg.vector_norm(t, float("inf"), dtype=torch.float32)
    a = _rows(t, _SUBSAMPLE).float().abs()
    finite = torch.isfinite(a)
    all_finite = torch.isfinite(amax_all)
    amax = torch.where(all_finite, amax_all, torch.where(finite, a, torch.zeros_like(a)).amax())
    scale = amax / fmt_max
    nonzero = (a > 0).sum().clamp_min(1)
    under = ((a > 0) & (a < scale * tiny / 2)).sum() / nonzero
    nonfinite = (~finite).float().mean()
    nonfinite = torch.where(all_finite, nonfinite, nonfinite.clamp_min(1.0 / t.numel()))
    over = torch.where(prev_amax > 0, ((a > prev_amax) | ~finite).float().mean(), nonfinite)
    return torch.stack([amax, under.float(), over, nonfinite])


def _rows(t2d: torch.Tensor, values: int) -> torch.Tensor:
    """Every k-th row of `t2d`, k chosen so that about `values` values remain (all rows of a smaller tensor)."""
    stride = max(1, t2d.numel() // values)
    return t2d[::stride] if stride > 1 else t2d


_SAMPLED_VALUES = 1 << 18  # the sampled SQNR and grad-norm check look at about this many values (rows)

_COMPILED: dict = {}


def _reducer(t: torch.Tensor):
    """`_reduce` itself while torch.compile traces the model (it fuses into the graph); in eager mode compiled
    once per device type (dynamic shapes) on CUDA, eager elsewhere (a CPU compile costs seconds)."""
    if t.device.type != "cuda" or torch.compiler.is_compiling():
        return _reduce
    if "cuda" not in _COMPILED:
        _COMPILED["cuda"] = torch.compile(_reduce, dynamic=True, fullgraph=True)
    return _COMPILED["cuda"]


def _stats_of(t: torch.Tensor, fmt: torch.dtype, prev_amax: torch.Tensor, prefix: str, sample: bool) -> dict:
    """{slot: 0-dim tensor} of `t` quantized to `fmt`: amax, underflow, (overflow, sampled SQNR for x and g)."""
    info = torch.finfo(fmt)  # (called under no_grad: no detach, whose alias would hide the shared amax)
    t2d = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])  # the view the quantization reduces over
    r = _reducer(t2d)(t2d, prev_amax, float(info.max), float(info.smallest_normal * info.eps))
    out = {prefix + "_amax": r[0], prefix + "_underflow": r[1], "nonfinite": r[3]}
    if prefix in ("x", "g"):
        out[prefix + "_overflow"] = r[2]
        if sample:  # on a row sample, quantized with the whole tensor's scale (what the GEMM uses)
            sub = _rows(t2d, _SAMPLED_VALUES).float()
            sc = (r[0] / float(info.max)).clamp_min(1e-30)
            q = quantize_activation(sub, sc, saturate=False, dtype=fmt)
            err = (q.float() * sc - sub).pow(2).sum()
            out[prefix + "_neg_sqnr"] = -10 * torch.log10(sub.pow(2).sum().clamp_min(1e-30) / err.clamp_min(1e-30))
    return out


def _grad_vector(grad: torch.Tensor, prev_amax: torch.Tensor, sample: bool, weight) -> torch.Tensor:
    """The gradient statistics of one backward as probe's gradient (-inf in the forward slots)."""
    values = _stats_of(grad, GRAD_DTYPE, prev_amax, "g", sample)
    if weight is not None:  # sampled FP8 step: grad_x norm against its bf16 reference, on a row sample of
        # grad_out quantized with the whole tensor's scale: two GEMMs of a few hundred rows, not of the batch
        g2d = _rows(grad.detach().reshape(-1, grad.shape[-1]), _SAMPLED_VALUES)
        ref = g2d.bfloat16() @ weight.bfloat16()
        gs = (values["g_amax"] / float(torch.finfo(GRAD_DTYPE).max)).clamp_min(1e-30)
        gq = quantize_activation(g2d.float(), gs, saturate=False, dtype=GRAD_DTYPE)
        wq, ws = quantize_tensorwise(weight)
        # e5m2 and e4m3 values are exact in bf16 and their products exact in the GEMM's fp32 accumulator (as in
        # the FP8 GEMM itself); the result is rounded to bf16 once, like `ref`: a bf16 GEMM, not an fp32 one
        low = (gq.to(torch.bfloat16) @ wq.to(torch.bfloat16)).float() * (gs * ws)
        values["gnorm_dev"] = (low.norm() / ref.float().norm().clamp_min(1e-30) - 1).abs()
    return stat_vector(SLOTS, values, grad)


class _HighPrecisionLinear(torch.autograd.Function):
    """y = x @ w.T + b with operands cast to `compute` (bf16 or fp32); with a probe, its gradient carries the
    statistics of grad_out."""

    @staticmethod
    def forward(ctx, x, weight, bias, out_dtype, compute, probe, prev_g_amax, sample):
        xc, wc = x.to(compute), weight.to(compute)
        y = F.linear(xc, wc, None if bias is None else bias.to(compute))
        ctx.save_for_backward(xc, wc, prev_g_amax)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.sample = sample
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xc, wc, prev_g_amax = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_probe = None
        if ctx.needs_input_grad[5]:
            with torch.no_grad():
                grad_probe = _grad_vector(grad_out, prev_g_amax, ctx.sample, None)
        g = grad_out.to(xc.dtype).reshape(-1, grad_out.shape[-1])
        grad_x = (g @ wc).reshape(xc.shape).to(x_dtype) if ctx.needs_input_grad[0] else None
        grad_w = (g.t().float() @ xc.reshape(-1, xc.shape[-1]).float()).to(w_dtype) \
            if ctx.needs_input_grad[1] else None
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0, dtype=torch.float32).to(b_dtype) \
            if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, grad_probe, None, None


class _GradProbe(torch.autograd.Function):
    """Identity on y whose backward returns the e5m2 statistics of grad_out as the probe's gradient."""

    @staticmethod
    def forward(ctx, y, probe, prev_g_amax, weight, sample):
        ctx.sample = sample
        ctx.save_for_backward(prev_g_amax, weight.detach() if sample else None)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        prev_g_amax, weight = ctx.saved_tensors
        with torch.no_grad():
            grad_probe = _grad_vector(grad, prev_g_amax, ctx.sample, weight)
        return grad, grad_probe, None, None, None


def adaptive_linear_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          out_dtype: torch.dtype, fast_accum: bool, switch: LayerSwitch) -> torch.Tensor:
    """The call_function target of an adaptive FP8 training GEMM (rewriter/adaptive.py installs it).

    Args:
        x, weight, bias, out_dtype, fast_accum: as `fp8_linear_train`.
        switch: the layer's `LayerSwitch` (`new_switch`): precision (FP8 / BF16 / FP32 = 0 / 1 / 2), sample and
            observe flags, statistics (`SLOTS`) and gradient probe.

    Returns:
        [..., N] in `out_dtype`, differentiable in x, weight and bias.
    """
    precision = switch.precision
    # grad mode first: a no_grad forward reads (and guards on) no flag but the precision
    observe = torch.is_grad_enabled() and bool(switch.observe)
    sample = observe and bool(switch.sample)
    stats = switch.stats
    if observe:
        with torch.no_grad():
            values = _stats_of(x, FP8_DTYPE, stats[_I["x_prev_amax"]], "x", sample)
            w_values = _stats_of(weight, FP8_DTYPE, stats.new_zeros(()), "w", False)
            values["nonfinite"] = torch.maximum(values["nonfinite"], w_values.pop("nonfinite"))
            merge_max(stats, stat_vector(SLOTS, {**values, **w_values}, stats))
            stats[_I["flops"]] += 2.0 * x.numel() * weight.shape[0]
            prev_g = stats[_I["g_prev_amax"]].clone()
    if precision != FP8:
        compute = torch.bfloat16 if precision == BF16 else torch.float32
        if not observe:
            return _HighPrecisionLinear.apply(x, weight, bias, out_dtype, compute, None, None, False)
        return _HighPrecisionLinear.apply(x, weight, bias, out_dtype, compute, switch.probe, prev_g, sample)
    y = Fp8LinearTrain.apply(x, weight, bias, out_dtype, fast_accum)
    return _GradProbe.apply(y, switch.probe, prev_g, weight, sample) if observe and y.requires_grad else y
