"""The FP8 rule of decode graphs (plan/fp8_cost calls it for a graph whose GENERATION_STEP is "decode").

A decode step of a causal LM multiplies one row per sequence (M = batch, 1 to a few dozen) by every
weight of the model. Such a GEMM does 2MNK FLOPs on 2NK bytes of bf16 weights: at M = 8 it needs
about 100 FLOPs per byte where an H100/H200 delivers 250 bf16 FLOPs per byte of HBM bandwidth, so its
time is the time to read its weights. The FLOP rules of fp8_cost (min_mnk, min_rows: "FP8 loses on
small GEMMs", measured on compute-bound shapes) say nothing about that regime; here the roofline of
fp8_cost (max(compute, bytes, launch), torchao's) is applied to the decode shape itself:

  scaled_mm    rewriter::fp8_linear: 1-byte weights, the activation quantized per call (dynamic
               scales: a decode graph has no calibration), its quantization kernels charged as in
               fp8_cost (each at least one launch; fused into the producer under torch.compile).
               `torch._scaled_mm` needs K and N multiples of 16; M may be anything (ScaledBlas.cpp
               checks mat1's trailing dimension and both dimensions of mat2, never M), so the rows
               are not padded.
  weight_only  rewriter::fp8_weight_linear: 1-byte weights widened inside the GEMM, per output channel
               scales applied to the output; no activation quantization and no FP8 tensor-core GEMM,
               so no dimension rule. On a CUDA sm_89+ machine with triton, a GEMM of at most
               GEMV_MAX_ROWS (16) rows runs the Triton GEMV rewriter::fp8_weight_gemv
               (rewriter/runtime/fp8_gemv.py), which reads each weight byte once, eager or compiled:
               estimated at the 1-byte roofline either way. Elsewhere the op's reference path runs:
               compiled (Fp8Options.fused_quantization, True for backend="compile"), inductor fuses
               the widening into the GEMM; eager, the widened weight is written and read on every
               call, which the estimate charges (it never wins). The record's "weight_kernel" says
               which ("triton_gemv" or "reference") and the reason says why.
  auto         (the default) per GEMM, the one of the two with the larger estimate.

Before: decode linear(x[B,1,K], w[N,K])  {"use": False, "rule": "size", "reason": "kept bf16: M = 2 rows < 8192 ..."}
After:  decode linear(x[B,1,K], w[N,K])  {"use": True, "rule": "decode", "kernel": "weight_only", "reason":
        "fp8: decode GEMM is weight-bandwidth bound: 2x fewer weight bytes ..."}
"""
from __future__ import annotations

from rewriter.fp8_options import Fp8Options
from rewriter.passes.plan.fp8_roofline import (BF16_FLOPS, FP8_ROOFLINE_EFFICIENCY, HBM_BYTES_PER_S, KERNEL_LAUNCH_S,
                                               combine, estimate_speedup)
from rewriter.runtime.fp8_gemv import GEMV_MAX_ROWS, TRITON_ERROR, gemv_available
from rewriter.runtime.fp8_ops import FP8_DIM_MULTIPLE, FP8_MIN_CAPABILITY

__all__ = ["judge_decode", "estimate_decode_speedup", "gemv_choice"]


def estimate_decode_speedup(shape, kernel: str, *, fused: bool, own_kernel: bool,
                            gemv: bool = False) -> tuple[float, dict]:
    """Estimated speed-up over bf16 of one decode GEMM with FP8 weights (roofline x efficiency).

    Args:
        shape: GemmShape (M = rows of the decode step, the batch).
        kernel: "scaled_mm" (FP8 GEMM, activation quantized) or "weight_only" (weights widened).
        fused: the decode graph runs under torch.compile: scaled_mm's activation quantization fuses into
            its producer (as fp8_cost.estimate_speedup), weight_only's widening into the GEMM. Eager
            weight_only pays a kernel that writes the widened weight (so it never wins).
        own_kernel: as fp8_cost.estimate_speedup.
        gemv: weight_only runs our Triton GEMV (`gemv_choice`): 1-byte weight reads, eager or compiled.

    Returns:
        (speed-up, {"bf16_us", "fp8_us", "quant_us", "roofline", "weight_mb_bf16", "weight_mb_fp8"}).

    Example:
        >>> from rewriter.passes.plan.fp8_roofline import GemmShape
        >>> estimate_decode_speedup(GemmShape(1, 16384, 2048), "weight_only", fused=True, own_kernel=False)[0] > 1.5
        True
    """
    if kernel == "scaled_mm":
        speedup, detail = estimate_speedup(shape, static=False, fused=fused, own_kernel=own_kernel)
    else:  # the bf16 GEMM's FLOPs and activation bytes, half its weight bytes, nothing to quantize
        m, n, k = shape.m, shape.n, shape.k
        compute = 2.0 * m * n * k / BF16_FLOPS
        t_bf16 = max(compute, (2 * m * k + 2 * n * k + 2 * m * n) / HBM_BYTES_PER_S, KERNEL_LAUNCH_S)
        t_fp8 = max(compute, (2 * m * k + n * k + 2 * m * n) / HBM_BYTES_PER_S, KERNEL_LAUNCH_S)
        widen = 0.0
        if not fused and not gemv:  # eager reference: a kernel writes the widened weight, the GEMM reads 2
            widen = max(3 * n * k / HBM_BYTES_PER_S, KERNEL_LAUNCH_S)
            t_fp8 = t_bf16
        speedup, detail = combine(t_bf16, t_fp8, widen)
    detail.update({"weight_mb_bf16": round(2 * shape.n * shape.k / 1e6, 3),
                   "weight_mb_fp8": round(shape.n * shape.k / 1e6, 3)})
    return speedup, detail


def gemv_choice(m: int, cap) -> tuple[bool, str]:
    """(whether a weight-only decode GEMM of `m` rows runs the Triton GEMV, the words saying why) for the
    target capability `cap` (None: an FP8 GPU assumed); decided on this machine (triton, CUDA)."""
    if m > GEMV_MAX_ROWS:
        return False, f"M={m} rows > {GEMV_MAX_ROWS}: not a GEMV"
    if cap is not None and cap < FP8_MIN_CAPABILITY:
        return False, "the target has no FP8 conversions in Triton"
    if not gemv_available():
        return False, TRITON_ERROR or "no CUDA sm_89+ device on this machine"
    return True, f"M={m} <= {GEMV_MAX_ROWS} rows, triton and a CUDA sm_89+ device here"


def judge_decode(shape, dims: dict, opts: Fp8Options, cap, where: str, keep, producer: tuple[str, bool]) -> dict:
    """The FP8 record of one GEMM of a decode graph (see the module docstring); `keep(rule, reason,
    **extra)` makes fp8_cost's "kept" record, `producer` is (name, own kernel) of the activation."""
    n, k = shape.n, shape.k
    fused = bool(opts.fused_quantization)
    name, own = producer
    kernel, other = opts.decode_gemms, None
    fits = not (k % FP8_DIM_MULTIPLE or n % FP8_DIM_MULTIPLE)  # torch._scaled_mm takes K and N
    gemv, gemv_why = gemv_choice(shape.m, cap)
    if kernel == "auto":  # the kernel with the larger estimate; scaled_mm only where _scaled_mm takes K and N
        wo = estimate_decode_speedup(shape, "weight_only", fused=fused, own_kernel=own, gemv=gemv)[0]
        sm = estimate_decode_speedup(shape, "scaled_mm", fused=fused, own_kernel=own)[0] if fits else 0.0
        kernel = "scaled_mm" if sm > wo else "weight_only"
        other = (f"chosen by decode_gemms='auto' over {'weight_only' if kernel == 'scaled_mm' else 'scaled_mm'} "
                 f"(estimated {min(sm, wo):.2f}x{'' if fits else ': K or N not a multiple of 16'})")
    dims = {**dims, "kernel": kernel}
    if kernel == "scaled_mm" and not fits:
        bad = " and ".join(f"{d}={v}" for d, v in (("K", k), ("N", n)) if v % FP8_DIM_MULTIPLE)
        return keep("dims", f"{bad} not a multiple of {FP8_DIM_MULTIPLE} (torch._scaled_mm needs K and N "
                    f"divisible by {FP8_DIM_MULTIPLE}; Fp8Options(decode_gemms='weight_only') has no such rule)",
                    **dims)
    if cap is not None and cap < FP8_MIN_CAPABILITY:
        what = "the CPU has" if cap == (0, 0) else f"sm_{cap[0]}{cap[1]} has"
        return keep("hardware", f"target {where}: {what} no FP8 support (decode GEMMs with FP8 weights need "
                    f"sm_{FP8_MIN_CAPABILITY[0]}{FP8_MIN_CAPABILITY[1]}+)", **dims)
    speedup, detail = estimate_decode_speedup(shape, kernel, fused=fused, own_kernel=own, gemv=gemv)
    if kernel == "weight_only":
        dims["weight_kernel"] = "triton_gemv" if gemv else "reference"
    scaling = "weight-only" if kernel == "weight_only" else "dynamic"
    granularity = "row" if kernel == "weight_only" else opts.granularity
    dims.update({"est_speedup": round(speedup, 3), **detail, "scaling": scaling, "granularity": granularity})
    run = ("compiled (widening fused into the GEMM)" if fused else
           "eager (the widened weight is written and read again: compile the decode graph)")
    kernel_text = (f"runs the Triton GEMV rewriter::fp8_weight_gemv (each weight byte read once, eager, compiled "
                   f"or in CUDA graphs: {gemv_why})" if gemv else
                   f"the Triton GEMV rewriter::fp8_weight_gemv does not apply ({gemv_why}): the reference "
                   f"(linear on the widened weight) runs, estimated {run}")
    how = ("rewriter::fp8_weight_linear: float8_e4m3fn weights (per output channel scales) widened inside the "
           f"GEMM, activation not quantized; {kernel_text}"
           if kernel == "weight_only" else
           f"rewriter::fp8_linear (torch._scaled_mm, any M): float8_e4m3fn weights, dynamic per-"
           f"{'row' if opts.granularity == 'row' else 'tensor'} activation scale, its quantization "
           f"{'fused into ' + name if fused and not own else 'in kernels of its own'}")
    extra = ("" if not detail["quant_us"] else
             f" + {'quantizing the activation' if kernel == 'scaled_mm' else 'widening the weight'} "
             f"{detail['quant_us']} us")
    estimate = (f"estimated {speedup:.2f}x vs bf16 on an H100 (roofline {detail['roofline']:.2f}x x "
                f"{FP8_ROOFLINE_EFFICIENCY:g}: bf16 GEMM {detail['bf16_us']} us, fp8 GEMM {detail['fp8_us']} us"
                f"{extra}; "
                f"M={shape.m} rows (the decode batch), N={n}, K={k})")
    if opts.min_speedup and speedup < opts.min_speedup:
        return keep("cost", f"decode GEMM: {estimate} < {opts.min_speedup:g}x; {how}", **dims)
    if other:
        how += f"; {other}"
    if speedup < 1.0:
        how += f"; rewritten although below 1x, because Fp8Options(min_speedup={opts.min_speedup:g})"
    reason = (f"fp8: decode GEMM is weight-bandwidth bound: 2x fewer weight bytes ({detail['weight_mb_bf16']} MB "
              f"bf16 -> {detail['weight_mb_fp8']} MB float8_e4m3fn per step); {estimate}; {how}")
    return {"use": True, "rule": "decode", "reason": reason, **dims}
