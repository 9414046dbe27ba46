"""Rewrite passes: edit the graph from the annotations written by the analysis passes."""
from passes.rewrite.cast_weights import CastWeights
from passes.rewrite.causal_attention import CausalAttention
from passes.rewrite.channels_last import ChannelsLast
from passes.rewrite.fold_batch_norm import FoldBatchNorm
from passes.rewrite.fold_casts import FoldCasts
from passes.rewrite.fuse_gelu import FuseGelu
from passes.rewrite.fuse_linears import FuseLinears
from passes.rewrite.insert_casts import InsertCasts
from passes.rewrite.padding_mask import PaddingMask
from passes.rewrite.sigmoid_gelu import SigmoidGelu

__all__ = ["CausalAttention", "FuseGelu", "FuseLinears", "FoldBatchNorm", "InsertCasts", "FoldCasts", "CastWeights",
           "ChannelsLast", "PaddingMask", "SigmoidGelu"]
