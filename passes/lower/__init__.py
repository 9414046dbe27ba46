"""Stage 5, lower: edit the graph from the annotations (casts, FP8 GEMMs, stored weight dtypes)."""
from rewriter.passes.lower.cast_weights import CastWeights
from rewriter.passes.lower.fold_casts import FoldCasts
from rewriter.passes.lower.fp8 import Fp8Rewrite
from rewriter.passes.lower.insert_casts import InsertCasts
from rewriter.passes.lower.saturate_constants import SaturateConstants
from rewriter.passes.lower.train_batch_norm import TrainBatchNorm

__all__ = ["InsertCasts", "FoldCasts", "SaturateConstants", "Fp8Rewrite", "CastWeights", "TrainBatchNorm"]
