"""Graph passes, one folder per stage in the order the pipeline runs them.

    canonicalize/  exact rewrites of the captured graph (attention masks, GELU, batch norm)
    analysis/      annotate node.meta: op class, measured ranges, sensitivity, the dtype of each node
    fuse/          merge linears that share an input and a decision
    plan/          FP8: which GEMMs pay (annotations only)
    lower/         casts, FP8 GEMMs, weights stored in their consumer's precision
    target/        layout and kernel forms for the backend that runs the graph

The order and the condition under which each pass runs live in one table, `rewriter.pipeline.PASS_TABLE`.
Every pass follows one contract (`infra.Pass`): `call(gm) -> PassResult(gm, modified)`.
"""
from rewriter.passes.infra import AnalysisPass, Pass, PassManager, PassResult
from rewriter.passes.canonicalize import CausalAttention, FoldBatchNorm, FuseGelu, PaddingMask
from rewriter.passes.analysis import Assign, BudgetLowering, Classify, Ranges, Sensitivity, TransferMeasurements
from rewriter.passes.fuse import FuseLinears
from rewriter.passes.plan import Fp8Cost, Fp8Options
from rewriter.passes.lower import CastWeights, FoldCasts, Fp8Rewrite, InsertCasts, SaturateConstants, TrainBatchNorm
from rewriter.passes.target import ChannelsLast, OrtKernels, SigmoidGelu

__all__ = ["Pass", "AnalysisPass", "PassResult", "PassManager",
           "CausalAttention", "PaddingMask", "FuseGelu", "FoldBatchNorm", "TrainBatchNorm",
           "Classify", "Ranges", "Sensitivity", "BudgetLowering", "Assign", "TransferMeasurements", "FuseLinears",
           "Fp8Cost", "Fp8Options", "InsertCasts", "FoldCasts", "SaturateConstants", "Fp8Rewrite", "CastWeights",
           "ChannelsLast", "OrtKernels", "SigmoidGelu"]
