"""Run-time piece of adaptive precision for fp16 training: `adaptive_linear_fp16`, a linear with a precision switch.

    y = adaptive_linear_fp16(x, weight, bias, weight_nk, out_dtype, switch)

replaces an fp16 training GEMM (`linear(cast(x -> fp16), cast(w_fp32 -> fp16), cast(b -> fp16))`, or GPT-2's
`addmm` / `mm` with a [K, N] weight) and absorbs the casts of its operands: x, weight and bias arrive as
their sources (the fp32 master weight, an fp32 activation when x was cast, else the fp16 activation) and
are cast inside to the precision the layer runs now. `switch` is the layer's `LayerSwitch`
(rewriter/runtime/adaptive_switch.py), whose int flags the op reads in Python:

  switch.precision  0 = FP16 (what the plain conversion computes: fp16 operands, fp16 GEMM results,
                    grad_x / grad_w / grad_bias in fp16), 1 = BF16, 2 = FP32;
  switch.observe    1 observes this step (switch.sample is the FP8 op's SQNR flag, unused here).
  switch.stats      fp32 [N_STATS] slots (`SLOTS`), max-accumulated while observing (forward slots in
         place, gradient slots as `switch.probe`'s gradient, merged by max after each backward), measured
         against fp16's range whatever the layer runs now (so a BF16 layer keeps reporting whether fp16
         would overflow again):
           x_amax, w_amax      amax of the operands before the cast (non-finite values left out);
           x_overflow,         fraction of the finite values beyond fp16's max (65504): the cast to fp16
           w_overflow          overflows whatever the loss scale (non-finite values came so from upstream:
                               not this layer's doing);
           g_amax              amax of grad_out (as it arrives: already scaled by the loss scale);
           g_nonfinite         fraction of non-finite grad_out values: an overflow downstream, inherited
                               (the slots below are then left alone, as when x held non-finite values:
                               this layer is not the culprit);
           gw_amax             amax of the layer's scaled weight gradient, computed in its precision;
           grad_overflow       fraction of grad_w / grad_x / grad_bias values beyond 65504 or non-finite:
                               the overflow the loss scaler sees and skips the step for;
           gw_subnormal        fraction of the nonzero scaled weight-gradient values below fp16's smallest
                               normal (2^-14, precision lost, next to flushing): the loss scale is too low
                               for this layer;
           nonfinite           fraction of non-finite values in grad_x / grad_w / grad_bias;
           flops               2*M*N*K of the forwards since the last controller step.

With the layer in FP16 and the step not observed, the numerics are the plain fp16 conversion's (the same
fp16 GEMMs). Under torch.compile the op is traced, as the FP8 one (adaptive_ops.py): dynamo specialises on
the switch's ints, each combination is one cached graph variant, and nothing breaks the graph.

Before: x16 = cast(x, fp16); y = linear(x16, cast(w_fp32, fp16), cast(b, fp16))   always fp16
After:  y = adaptive_linear_fp16(x, w_fp32, b, True, fp16, switch)                   fp16 | bf16 | fp32
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rewriter.runtime.adaptive_switch import LayerSwitch, merge_max, stat_vector

__all__ = ["FP16", "BF16", "FP32", "PRECISIONS", "SLOTS", "ACCUMULATED", "N_STATS", "FP16_MAX",
           "FP16_TINY", "adaptive_linear_fp16", "new_switch"]

FP16, BF16, FP32 = 0, 1, 2
PRECISIONS = ("fp16", "bf16", "fp32")
COMPUTE = (torch.float16, torch.bfloat16, torch.float32)
SLOTS = ("x_amax", "w_amax", "x_overflow", "w_overflow", "g_amax", "g_nonfinite", "gw_amax", "grad_overflow",
         "gw_subnormal", "nonfinite", "flops")
ACCUMULATED = SLOTS  # every slot is max-accumulated between two controller steps (flops summed)
N_STATS = len(SLOTS)
FP16_MAX = float(torch.finfo(torch.float16).max)             # 65504
FP16_TINY = float(torch.finfo(torch.float16).smallest_normal)  # 2^-14
_I = {name: i for i, name in enumerate(SLOTS)}


def new_switch(device=None) -> LayerSwitch:
    """The switch of one layer: FP16, observed, all statistics zero."""
    return LayerSwitch(N_STATS, device)


def _operand_stats(t: torch.Tensor, prefix: str) -> dict:
    a = t.detach().float().abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    return {prefix + "_amax": a.amax(), prefix + "_overflow": (a > FP16_MAX).float().mean()}


def _overflow(grads) -> torch.Tensor:
    """Largest fraction, over `grads`, of values beyond fp16's max or non-finite; and of non-finite ones."""
    over, bad = [], []
    for g in grads:
        a = g.float().abs()
        finite = torch.isfinite(a)
        over.append(((a > FP16_MAX) | ~finite).float().mean())
        bad.append((~finite).float().mean())
    return torch.stack(over).amax(), torch.stack(bad).amax()


class _SwitchedLinear(torch.autograd.Function):
    """y = x @ w.T + b with x, w, b cast to `compute`; the backward GEMMs in `compute` too (what autograd of
    the plain fp16 graph computes), each gradient cast back to its operand's dtype; with a probe, its gradient
    carries the gradient statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, compute, out_dtype, probe):
        xc, wc = x.to(compute), weight.to(compute)
        y = F.linear(xc, wc, None if bias is None else bias.to(compute))
        # non-finite inputs came from upstream: the gradients they spoil are not this layer's overflow
        x_finite = torch.isfinite(x).all() if probe is not None else None
        ctx.save_for_backward(xc, wc, x_finite)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xc, wc, x_finite = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad_out.to(xc.dtype).reshape(-1, grad_out.shape[-1])
        grad_x = (g @ wc).reshape(xc.shape) if ctx.needs_input_grad[0] else None
        grad_w = g.t() @ xc.reshape(-1, xc.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0, dtype=torch.float32).to(xc.dtype) if ctx.needs_input_grad[2] else None
        grad_probe = None
        if ctx.needs_input_grad[5]:
            with torch.no_grad():
                grad_probe = _grad_vector(grad_out, x_finite, grad_x, grad_w, grad_b)
        return (None if grad_x is None else grad_x.to(x_dtype), None if grad_w is None else grad_w.to(w_dtype),
                None if grad_b is None else grad_b.to(b_dtype), None, None, grad_probe)


def _grad_vector(grad_out, x_finite, grad_x, grad_w, grad_b) -> torch.Tensor:
    """The gradient statistics of one backward as the probe's gradient (-inf in the forward slots)."""
    a = grad_out.detach().float().abs()
    finite = torch.isfinite(a)
    inherited = (~finite).float().mean()
    values = {"g_amax": torch.where(finite, a, torch.zeros_like(a)).amax(), "g_nonfinite": inherited}
    own = ((inherited == 0) & x_finite).float()  # 0 when the trouble came from elsewhere (no host sync)
    grads = [t for t in (grad_x, grad_w, grad_b) if t is not None]
    if grads:
        over, bad = _overflow(grads)
        values["grad_overflow"], values["nonfinite"] = over * own, bad * own
    if grad_w is not None:
        aw = grad_w.float().abs()
        fin = torch.isfinite(aw)
        values["gw_amax"] = torch.where(fin, aw, torch.zeros_like(aw)).amax() * own
        nonzero = (aw > 0).sum().clamp_min(1)
        values["gw_subnormal"] = ((aw > 0) & (aw < FP16_TINY)).sum() / nonzero * own
    return stat_vector(SLOTS, values, grad_out)


def adaptive_linear_fp16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_nk: bool,
                         out_dtype: torch.dtype, switch: LayerSwitch) -> torch.Tensor:
    """The call_function target of an adaptive fp16 training GEMM (rewriter/adaptive_fp16.py installs it).

    Args:
        x: the activation [..., K] as its producer made it (the fp16 cast absorbed).
        weight: the fp32 master weight, [N, K] when `weight_nk`, else [K, N] (GPT-2's Conv1D).
        bias: the fp32 bias [N] or None.
        out_dtype: the dtype the replaced GEMM returned (fp16): the graph after it is unchanged.
        switch: the layer's `LayerSwitch` (`new_switch`): precision (FP16 / BF16 / FP32 = 0 / 1 / 2), observe
            flag, statistics (`SLOTS`) and gradient probe.

    Returns:
        [..., N] in `out_dtype`, differentiable in x, weight and bias.
    """
    observe = torch.is_grad_enabled() and bool(switch.observe)  # a no_grad forward guards on no flag
    w = weight if weight_nk else weight.t()
    if observe:
        stats = switch.stats
        with torch.no_grad():
            merge_max(stats, stat_vector(SLOTS, {**_operand_stats(x, "x"), **_operand_stats(w, "w")}, stats))
            stats[_I["flops"]] += 2.0 * x.numel() * w.shape[0]
    return _SwitchedLinear.apply(x, w, bias, COMPUTE[switch.precision], out_dtype,
                                 switch.probe if observe else None)
