"""The roofline behind the FP8 cost model (passes/plan/fp8_cost.py, passes/plan/fp8_decode.py): H100 rates,
bandwidth and the measured traffic of the activation quantization, and the speed-up estimates of one GEMM.
Split out of fp8_cost so that the decode rule (fp8_decode) and the pass share it without an import cycle;
fp8_cost re-exports every name. The sources of each constant are given where it is defined.
"""
from __future__ import annotations

import dataclasses

__all__ = ["FP8_ROOFLINE_EFFICIENCY", "BF16_FLOPS", "FP8_FLOPS", "HBM_BYTES_PER_S", "KERNEL_LAUNCH_S", "GemmShape",
           "estimate_speedup", "estimate_train_speedup", "gemm_time", "combine"]

FP8_ROOFLINE_EFFICIENCY = 0.8
"""Share of the roofline speed-up an FP8 GEMM reaches, measured on the H100 at the GEMM shapes of
BERT-large b32 s384 and GPT-2 medium b8 s1024 (tools/bench_gemm_fp8.py, results in
tools/results/bench_gemm_fp8_h100.json): `_scaled_mm` alone ran 1.48x-1.77x a bf16 F.linear where the
roofline says 1.82x (0.81-0.97), and compiled producer -> quantize -> GEMM modules reached 0.83-1.04 of
the roofline with the quantization traffic below (0.70 for GELU producers with dynamic scales).
0.8 is the lowest GEMM-alone ratio."""

BF16_FLOPS = 798e12   # shared/ANCHORS.md: bf16 GEMM 8192^3, H100 SXM, measured
FP8_FLOPS = 1449e12   # shared/ANCHORS.md: `torch._scaled_mm` e4m3, bf16 out, 8192^3, H100 SXM, measured
HBM_BYTES_PER_S = 3.35e12 * 0.92  # H100 SXM datasheet 3.35 TB/s x torchao's "pct_achievable_mem_bw"
KERNEL_LAUNCH_S = 2e-6  # torchao roofline_utils KERNEL_LAUNCH_OVERHEAD_SEC (one tiny kernel on an H100)

# Bytes moved per activation element by the quantization kernels, one entry per kernel (each costs at
# least a launch), fitted to the H100 measurements of tools/bench_gemm_fp8.py (effective bytes per
# element over all shapes: tools/results/bench_gemm_fp8_h100.json, "fit"):
#   eager dynamic: amax, clamp_min, / 448, divide + write float8: 16.5-21.4 B measured (5 in theory)
#   eager static:  bound, clamp, divide + write float8:              28.4-31.7 B measured
#   fused dynamic (torch.compile): amax in one kernel, quantize in the producer: 3.0-4.4 B after a
#                  LayerNorm, 5.3-7.8 B after a GELU
#   fused static:  the producer writes float8 as well: 0.5-1.5 B
#   own kernel (torch.compile, the producer is an extern kernel: attention, a GEMM, a bf16 input):
#                  static: read bf16, write float8, 3 B (12.2 us for 12.6 M elements after cuDNN attention
#                  in BERT-large: tools/results/bench_fp8_bert_large_profile_h100.json); dynamic: the
#                  fused figures, as the amax kernel and the quantization read the activation anyway
# Each is the largest value measured (fused dynamic: the range's middle, 6 B), so the estimate errs
# towards keeping bf16.
# (per-row scales cost the same: the division writes float8 directly, whatever dtype it computes in)
_QUANT_KERNELS = {
    ("eager", "dynamic"): (2, 0, 0, 20),
    ("eager", "static"): (0, 16, 16),
    ("fused", "dynamic"): (2, 4),
    ("fused", "static"): (1.5,),
    ("own kernel", "dynamic"): (2, 4),
    ("own kernel", "static"): (3,),
}


# ---------------------------------------------------------------- shapes and the estimate


@dataclasses.dataclass(frozen=True)
class GemmShape:
    m: int
    n: int
    k: int

    @property
    def mnk(self) -> int:
        return self.m * self.n * self.k


def gemm_time(shape: GemmShape, flops: float, in_bytes: int) -> float:
    m, n, k = shape.m, shape.n, shape.k
    compute = 2.0 * m * n * k / flops
    memory = ((m * k + k * n) * in_bytes + m * n * 2) / HBM_BYTES_PER_S
    return max(compute, memory, KERNEL_LAUNCH_S)


def combine(t_bf16: float, t_fp8: float, t_quant: float) -> tuple[float, dict]:
    """(roofline x FP8_ROOFLINE_EFFICIENCY, the times in us and the roofline) of bf16 vs fp8 + quantize."""
    roofline = t_bf16 / (t_fp8 + t_quant)
    detail = {"bf16_us": round(t_bf16 * 1e6, 2), "fp8_us": round(t_fp8 * 1e6, 2),
              "quant_us": round(t_quant * 1e6, 2), "roofline": round(roofline, 3)}
    return roofline * FP8_ROOFLINE_EFFICIENCY, detail


def estimate_speedup(shape: GemmShape, *, static: bool, fused: bool = False,
                     own_kernel: bool = False) -> tuple[float, dict]:
    """Estimated speed-up of one GEMM in FP8 (with the activation's quantization) over BF16 on an H100:
    the roofline ratio times FP8_ROOFLINE_EFFICIENCY. `fused`: under torch.compile; `own_kernel`: there,
    the producer of the activation is an extern kernel, so the quantization cannot fuse into it.

    Returns:
        (speed-up, {"bf16_us", "fp8_us", "quant_us", "roofline"}).

    Example:
        >>> estimate_speedup(GemmShape(8192, 14336, 4096), static=False)[0] > 1.1  # Llama MLP up_proj
        True
    """
    t_bf16 = gemm_time(shape, BF16_FLOPS, 2)
    t_fp8 = gemm_time(shape, FP8_FLOPS, 1)
    where = ("own kernel" if own_kernel else "fused") if fused else "eager"
    kernels = _QUANT_KERNELS[(where, "static" if static else "dynamic")]
    elements = shape.m * shape.k
    t_quant = sum(max(b * elements / HBM_BYTES_PER_S, KERNEL_LAUNCH_S) for b in kernels)
    return combine(t_bf16, t_fp8, t_quant)


def estimate_train_speedup(shape: GemmShape, *, fused: bool = False) -> tuple[float, dict]:
    """Estimated speed-up of one linear's training step in FP8 over BF16 on an H100, as
    `estimate_speedup` for the forward: three GEMMs of 2MNK FLOPs (y = x W^T [M,N,K], grad_x = g W
    [M,K,N], grad_w = g^T x [N,K,M]), and on the FP8 side the dynamic quantization kernels of x [M, K],
    the weight [N, K] and grad_out [M, N] plus one transposed float8 copy of each (read and write, one
    byte each) for the backward GEMMs' column-major operands.

    Returns:
        (speed-up, {"bf16_us", "fp8_us", "quant_us", "roofline"}), times of the whole step of the linear.

    Example:
        >>> estimate_train_speedup(GemmShape(8192, 14336, 4096), fused=True)[0] > 1.1  # Llama MLP up_proj
        True
    """
    m, n, k = shape.m, shape.n, shape.k
    gemms = (shape, GemmShape(m, k, n), GemmShape(n, k, m))
    t_bf16 = sum(gemm_time(g, BF16_FLOPS, 2) for g in gemms)
    t_fp8 = sum(gemm_time(g, FP8_FLOPS, 1) for g in gemms)
    kernels = _QUANT_KERNELS[("fused" if fused else "eager", "dynamic")]
    traffic = [b * e for e in (m * k, n * k, m * n) for b in (*kernels, 2)]  # quantize, then transpose
    t_quant = sum(max(b / HBM_BYTES_PER_S, KERNEL_LAUNCH_S) for b in traffic)
    return combine(t_bf16, t_fp8, t_quant)


