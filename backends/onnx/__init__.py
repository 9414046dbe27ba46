"""ONNX backend: export a converted GraphModule to ONNX for an ONNX Runtime target, and run it.

    >>> report = rewriter.export_onnx(fast, "model.onnx", target="ort-cuda", optimize=True)
    >>> sess = ort_session("model.onnx", device="cuda")
    >>> logits, = sess(ids)

Modules, in the order an export runs them (no module imports one after it):
    common      ONNX IR helpers
    report      ExportReport, Cast counters
    trace       torch.export + torch.onnx.export, provenance of every ONNX node
    folding     constant folding, CAST_RULES, node names
    kernels     the target's fp32 decisions applied to the ONNX graph, decision check
    fp8         FP8 GEMMs as QuantizeLinear/DequantizeLinear or com.microsoft.GemmFloat8
    gemm, attention, embeddings, fusion   ONNX Runtime fusions (optimize=True)
    padding     assume_right_padding
    export      export_onnx
    session     ort_session / OrtSession
The decision which ops a target cannot run in 16 bits is made before export by
passes/target/ort_kernels.py from passes/op_tables.py (node.meta[TARGET]).
"""
from rewriter.backends.onnx.export import DEFAULT_OPSET, TARGETS, default_target, export_onnx
from rewriter.backends.onnx.fp8 import FP8_GEMMS
from rewriter.backends.onnx.report import ExportReport, cast_chains, count_casts
from rewriter.backends.onnx.session import OrtSession, ort_package, ort_session

__all__ = ["export_onnx", "ExportReport", "OrtSession", "ort_session", "ort_package", "count_casts", "cast_chains",
           "default_target", "DEFAULT_OPSET", "TARGETS", "FP8_GEMMS"]
