"""Stage 1, canonicalize: exact rewrites of the captured graph into the forms later stages expect."""
from rewriter.passes.canonicalize.causal_attention import CausalAttention
from rewriter.passes.canonicalize.fold_batch_norm import FoldBatchNorm
from rewriter.passes.canonicalize.fuse_gelu import FuseGelu
from rewriter.passes.canonicalize.padding_mask import PaddingMask

__all__ = ["CausalAttention", "PaddingMask", "FuseGelu", "FoldBatchNorm"]
