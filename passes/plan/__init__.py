"""Stage 4, plan: decide per GEMM whether FP8 pays (annotations only)."""
from rewriter.passes.plan.fp8_cost import Fp8Cost, Fp8Options

__all__ = ["Fp8Cost", "Fp8Options"]
