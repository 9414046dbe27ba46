"""Small helpers shared by the ONNX fusion tests: a CPU EP run, op counts (the error: tests/helpers.rel_l2)."""
from __future__ import annotations

import onnx
import onnx_ir as ir


def run_cpu(model: onnx.ModelProto, feeds: dict) -> list:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def op_counts(model) -> dict:
    """{op type: count} of an onnx_ir.Model or an onnx.ModelProto."""
    nodes = model.graph if isinstance(model, ir.Model) else model.graph.node
    counts: dict = {}
    for n in nodes:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def export_plain_and_fused(gm, folder):
    """(report of the plain export, report of the export with ONNX Runtime fusions) into `folder`."""
    import warnings

    from rewriter.backends.onnx import export_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_onnx(gm, folder / "plain.onnx"), export_onnx(gm, folder / "fused.onnx", optimize=True)
