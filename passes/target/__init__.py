"""Stage 6, target: layout and kernel-shape choices for the backend that runs the graph."""
from rewriter.passes.target.channels_last import ChannelsLast
from rewriter.passes.target.ort_kernels import OrtKernels
from rewriter.passes.target.sigmoid_gelu import SigmoidGelu

__all__ = ["ChannelsLast", "OrtKernels", "SigmoidGelu"]
