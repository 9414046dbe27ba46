"""rewriter: a compiler pass that rewrites PyTorch models for FP16, BF16 and FP8.

    >>> import rewriter
    >>> fast = rewriter.convert(model, (x,), precision="bf16")
"""
from rewriter.config import ConvertConfig, Mode, Override, Precision
from rewriter.errors import CaptureError, ConfigError, InputError, PassError, RewriterError
from rewriter.pipeline import convert

__version__ = "0.1.0"

__all__ = ["convert", "ConvertConfig", "Precision", "Mode", "Override", "RewriterError",
           "ConfigError", "CaptureError", "InputError", "PassError", "__version__"]
