"""Compatibility name of the ONNX backend (rewriter/cli.py imports it): everything lives in backends/onnx/."""
from rewriter.backends.onnx import (DEFAULT_OPSET, TARGETS, ExportReport, OrtSession, cast_chains, count_casts,
                                    export_onnx, ort_session)

__all__ = ["export_onnx", "ExportReport", "OrtSession", "ort_session", "count_casts", "cast_chains",
           "DEFAULT_OPSET", "TARGETS"]
