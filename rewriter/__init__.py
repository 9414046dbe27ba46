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

from rewriter.backend_options import BackendOptions
from rewriter.backends.torch_backend import graph_module_of, optimize
from rewriter.config import ConvertConfig, Mode, Override, Precision
from rewriter.diff import diff
from rewriter.errors import BackendError, CaptureError, ConfigError, InputError, PassError, RewriterError
from rewriter.fp8_options import Fp8Options
from rewriter.io import load, save
from rewriter.loss_scale import make_scaler
from rewriter.api import convert
from rewriter.training import TrainEvalGraphModule

__version__ = "0.1.0"

__all__ = ["AdaptivePrecision", "convert", "diff", "save", "load", "export_onnx", "ort_session", "optimize", "graph_module_of",
           "make_scaler", "ConvertConfig", "Fp8Options", "BackendOptions", "Precision", "Mode", "Override",
           "TrainEvalGraphModule", "RewriterError", "ConfigError", "CaptureError", "InputError", "PassError",
           "BackendError", "__version__"]

# Names imported on first use: the ONNX backend pulls in onnx and onnxscript, which `import rewriter`
# (and `rewrite --help`) should not pay for. name -> module that defines it.
_LAZY = {
    "export_onnx": "rewriter.backends.onnx",
    "AdaptivePrecision": "rewriter.adaptive",
    "ort_session": "rewriter.backends.onnx",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rewriter' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
