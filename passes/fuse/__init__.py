"""Stage 3, fuse: merge ops that share an input and a decision (q/k/v, gate/up) into one GEMM."""
from rewriter.passes.fuse.fuse_linears import FuseLinears

__all__ = ["FuseLinears"]
