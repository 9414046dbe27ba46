"""ONNX translation of rewriter::fp8_linear (backends/onnx/fp8.py): QuantizeLinear/DequantizeLinear in
float8e4m3fn around Gemm, valid for onnx.checker, and run by ONNX Runtime's CPU EP to the same values
as the torch op (its emulation path)."""
from __future__ import annotations

import collections
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import rewriter
from rewriter.backends.onnx.fp8 import MIN_OPSET, custom_translation_table
from rewriter.passes.plan.fp8_cost import Fp8Options
from rewriter.runtime.fp8_ops import fp8_linear_op


def _model():
    # linear -> fp32 layer_norm -> linear: every op outside the FP8 GEMMs has an ORT CPU kernel
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.Linear(128, 64)).eval()


def _export(gm, x, opset):
    ep = torch.export.export(gm, (x,), strict=False, dynamic_shapes=({0: torch.export.Dim.AUTO},))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(ep, (), dynamo=True, opset_version=opset, verbose=False, report=False,
                                    custom_translation_table=custom_translation_table())
    return program.model_proto


@pytest.mark.parametrize("granularity, calibrated, opset", [
    ("tensor", False, MIN_OPSET), ("row", True, 21),
], ids=["per-tensor-dynamic-opset19", "per-channel-static-opset21"])
def test_fp8_linear_exports_as_qdq_and_runs_on_ort_cpu(granularity, calibrated, opset, tmp_path):
    import onnxruntime as ort

    model = _model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, 64, generator=g)
    calibration = [(torch.randn(4, 16, 64, generator=g),)] if calibrated else None
    gm = rewriter.convert(model, (x,), precision="fp8", calibration=calibration,
                          fp8=Fp8Options.always(granularity=granularity))
    layers = [n for n in gm.graph.nodes if n.target is fp8_linear_op]
    assert len(layers) == 2

    proto = _export(gm, x, opset)
    onnx.checker.check_model(proto, full_check=True)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["QuantizeLinear"] == 2 and ops["DequantizeLinear"] == 4 and ops["Gemm"] == 2
    assert ops["ReduceMax"] == (0 if calibrated else 2)  # dynamic scales are computed in the graph
    quantized = [q for q in proto.graph.node if q.op_type == "QuantizeLinear"]
    fp8_weights = [i for i in proto.graph.initializer
                   if i.data_type == onnx.TensorProto.FLOAT8E4M3FN and len(i.dims) == 2]  # not zero points
    assert sorted(tuple(i.dims) for i in fp8_weights) == [(64, 128), (128, 64)]  # stored 1 byte each
    assert all(any(a.name == "saturate" and a.i == 1 for a in q.attribute) for q in quantized)

    path = tmp_path / "fp8.onnx"
    onnx.save(proto, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (x, torch.randn(7, 16, 64, generator=g)):  # the batch dimension stays dynamic
        (out,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
        with torch.no_grad():
            ours = gm(batch).numpy()
        # same quantized values; the fp32 GEMMs may sum in another order
        np.testing.assert_allclose(out, ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())


def test_translation_table_names_the_op():
    table = custom_translation_table()
    assert list(table) == [fp8_linear_op] and callable(table[fp8_linear_op])
