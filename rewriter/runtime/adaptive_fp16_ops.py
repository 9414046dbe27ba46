"""Run-time piece of adaptive precision for fp16 training: `adaptive_linear_fp16`, a linear with a precision switch.

    y = adaptive_linear_fp16(x, weight, bias, weight_nk, out_dtype, state, stats)

replaces an fp16 training GEMM (`linear(cast(x -> fp16), cast(w_fp32 -> fp16), cast(b -> fp16))`, or GPT-2's
`addmm` / `mm` with a [K, N] weight) and absorbs the casts of its operands: x, weight and bias arrive as
their sources (the fp32 master weight, an fp32 activation when x was cast, else the fp16 activation) and
are cast inside to the precision the layer runs now:

  state  int64 CPU tensor [3], read on the host on every call: state[0] the precision, 0 = FP16 (what the
         plain conversion computes: fp16 operands, fp16 GEMM results, grad_x / grad_w / grad_bias in fp16),
         1 = BF16, 2 = FP32; state[1] unused (the FP8 op's SQNR sample flag); state[2] = 1 observes this
         step. The controller (rewriter/adaptive.py) writes it between steps; nothing is recompiled.
  stats  1-D fp32 tensor of N_STATS slots (`SLOTS`), max-accumulated without autograd while observing,
         measured against fp16's range whatever the layer runs now (so a BF16 layer keeps reporting
         whether fp16 would overflow again):
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
fp16 GEMMs). Under torch.compile the op is `torch.compiler.disable`d, as the FP8 one (adaptive_ops.py).

Before: x16 = cast(x, fp16); y = linear(x16, cast(w_fp32, fp16), cast(b, fp16))   always fp16
After:  y = adaptive_linear_fp16(x, w_fp32, b, True, fp16, state, stats)            fp16 | bf16 | fp32
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["FP16", "BF16", "FP32", "PRECISIONS", "SLOTS", "ACCUMULATED", "N_STATS", "FP16_MAX",
           "FP16_TINY", "adaptive_linear_fp16", "new_buffers"]

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


def new_buffers(device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(state, stats) of one layer: FP16, observed, all statistics zero. `state` stays on the CPU."""
    return (torch.tensor([FP16, 0, 1], dtype=torch.int64),
            torch.zeros(N_STATS, dtype=torch.float32, device=device))


def _max_into(stats: torch.Tensor, name: str, value: torch.Tensor) -> None:
    stats[_I[name]] = torch.maximum(stats[_I[name]], value.float())


def _observe_operand(t: torch.Tensor, stats: torch.Tensor, prefix: str) -> None:
    a = t.detach().float().abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    _max_into(stats, prefix + "_amax", a.amax())
    _max_into(stats, prefix + "_overflow", (a > FP16_MAX).float().mean())


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
    the plain fp16 graph computes), each gradient cast back to its operand's dtype; statistics observed."""

    @staticmethod
    def forward(ctx, x, weight, bias, compute, out_dtype, stats):
        xc, wc = x.to(compute), weight.to(compute)
        y = F.linear(xc, wc, None if bias is None else bias.to(compute))
        ctx.save_for_backward(xc, wc)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.stats = stats
        # non-finite inputs came from upstream: the gradients they spoil are not this layer's overflow
        ctx.x_finite = torch.isfinite(x).all() if stats is not None else None
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xc, wc = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad_out.to(xc.dtype).reshape(-1, grad_out.shape[-1])
        grad_x = (g @ wc).reshape(xc.shape) if ctx.needs_input_grad[0] else None
        grad_w = g.t() @ xc.reshape(-1, xc.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0, dtype=torch.float32).to(xc.dtype) if ctx.needs_input_grad[2] else None
        stats = ctx.stats
        if stats is not None:
            with torch.no_grad():
                a = grad_out.detach().float().abs()
                finite = torch.isfinite(a)
                _max_into(stats, "g_amax", torch.where(finite, a, torch.zeros_like(a)).amax())
                inherited = (~finite).float().mean()
                _max_into(stats, "g_nonfinite", inherited)
                # 0 when the trouble came from elsewhere (no host sync)
                own = ((inherited == 0) & ctx.x_finite).float()
                grads = [t for t in (grad_x, grad_w, grad_b) if t is not None]
                if grads:
                    over, bad = _overflow(grads)
                    _max_into(stats, "grad_overflow", over * own)
                    _max_into(stats, "nonfinite", bad * own)
                if grad_w is not None:
                    aw = grad_w.float().abs()
                    fin = torch.isfinite(aw)
                    _max_into(stats, "gw_amax", torch.where(fin, aw, torch.zeros_like(aw)).amax() * own)
                    nonzero = (aw > 0).sum().clamp_min(1)
                    _max_into(stats, "gw_subnormal", ((aw > 0) & (aw < FP16_TINY)).sum() / nonzero * own)
        return (None if grad_x is None else grad_x.to(x_dtype), None if grad_w is None else grad_w.to(w_dtype),
                None if grad_b is None else grad_b.to(b_dtype), None, None, None)


@torch.compiler.disable
def adaptive_linear_fp16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_nk: bool,
                         out_dtype: torch.dtype, state: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """The call_function target of an adaptive fp16 training GEMM (rewriter/adaptive_fp16.py installs it).

    Args:
        x: the activation [..., K] as its producer made it (the fp16 cast absorbed).
        weight: the fp32 master weight, [N, K] when `weight_nk`, else [K, N] (GPT-2's Conv1D).
        bias: the fp32 bias [N] or None.
        out_dtype: the dtype the replaced GEMM returned (fp16): the graph after it is unchanged.
        state: int64 CPU tensor [precision (FP16 / BF16 / FP32 = 0 / 1 / 2), unused, observe (0 / 1)].
        stats: the layer's statistics buffer (`SLOTS`), updated in place.

    Returns:
        [..., N] in `out_dtype`, differentiable in x, weight and bias.
    """
    precision, _, observe = state.tolist()
    observe = bool(observe) and torch.is_grad_enabled()
    w = weight if weight_nk else weight.t()
    if observe:
        with torch.no_grad():
            _observe_operand(x, stats, "x")
            _observe_operand(w, stats, "w")
            stats[_I["flops"]] += 2.0 * x.numel() * w.shape[0]
    return _SwitchedLinear.apply(x, w, bias, COMPUTE[precision], out_dtype, stats if observe else None)
