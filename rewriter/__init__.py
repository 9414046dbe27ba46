"""rewriter: a compiler pass that rewrites PyTorch models for FP16, BF16 and FP8.

    >>> import rewriter
    >>> fast = rewriter.convert(model, (x,), precision="bf16")
    >>> print(rewriter.diff(model, fast))
    >>> rewriter.save(fast, "model-bf16.pt2"); again = rewriter.load("model-bf16.pt2")
"""
import os as _os

# The repository keeps passes/ and backends/ beside rewriter/ (the layout its users asked for); an
# installed wheel maps them to rewriter/passes and rewriter/backends (pyproject's package-dir). In a source
# checkout or an editable install, the same names resolve through the repository root, so `rewriter` is
# the one top-level import name either way.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (not _os.path.isdir(_os.path.join(__path__[0], "passes"))
        and _os.path.isfile(_os.path.join(_root, "passes", "__init__.py"))):
    __path__.append(_root)

from rewriter.config import ConvertConfig, Mode, Override, Precision
from rewriter.diff import diff
from rewriter.errors import BackendError, CaptureError, ConfigError, InputError, PassError, RewriterError
from rewriter.io import load, save
from rewriter.pipeline import convert

__version__ = "0.1.0"

__all__ = ["convert", "diff", "save", "load", "export_onnx", "ConvertConfig", "Precision", "Mode",
           "Override", "RewriterError", "ConfigError", "CaptureError", "InputError", "PassError", "BackendError",
           "__version__"]


def __getattr__(name):
    # export_onnx pulls in onnx/onnxscript: imported on first use so `import rewriter` stays fast
    if name == "export_onnx":
        from rewriter.backends.onnx import export_onnx

        return export_onnx
    raise AttributeError(f"module 'rewriter' has no attribute {name!r}")
