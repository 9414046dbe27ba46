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


# ---------------------------------------------------------------- export_onnx of a precision="fp8" model

_FP8_TOLERANCE = 2e-2  # relative L2 vs the converted PyTorch model: same quantized GEMMs; the file computes
# attention and GELU in fp32 for the CPU EP where torch rounds them to bf16 (measured 8e-4 and 6e-3)


@pytest.fixture(scope="module")
def bert_fp8():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, 12:] = 0
    gm = rewriter.convert(model, (ids,), {"attention_mask": mask}, precision="fp8", fp8=Fp8Options.always())
    return model, gm, ids, mask


def _initializers(proto, data_type, rank):
    return [i for i in proto.graph.initializer if i.data_type == data_type and len(i.dims) == rank]


def test_export_onnx_writes_fp8_gemms_as_qdq_and_runs_on_ort_cpu(bert_fp8, tmp_path):
    from rewriter.backends.onnx import cast_chains, export_onnx, ort_session

    model, gm, ids, mask = bert_fp8
    gemms = [n for n in gm.graph.nodes if n.target is fp8_linear_op]
    assert len(gemms) == 9  # per layer: fused QKV, attention output, intermediate, output; the pooler
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_onnx(gm, tmp_path / "bert-fp8.onnx", target="ort-cpu")
    assert not [w for w in caught if "decided" in str(w.message)]  # no precision mismatch
    assert report.precision_mismatches == [] and report.fp8_gemms == {"count": 9, "form": "qdq"}
    proto = onnx.load(report.path)
    onnx.checker.check_model(proto, full_check=True)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["QuantizeLinear"] == 9 and ops["DequantizeLinear"] == 18 and ops["Gemm"] == 9
    assert cast_chains(proto) == 0 and report.cast_chains == 0
    assert report.cast_rules.get("rounding before quantize", 0) > 0
    weights = _initializers(proto, onnx.TensorProto.FLOAT8E4M3FN, 2)
    assert len(weights) == 9 and not _initializers(proto, onnx.TensorProto.BFLOAT16, 2)  # stored once, 1 byte
    readers = {i for n in proto.graph.node if n.op_type == "DequantizeLinear" for i in n.input[:1]}
    assert {w.name for w in weights} <= readers
    quantize = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert all(any(a.name == "saturate" and a.i == 1 for a in q.attribute) for q in quantize)
    # ORT's CUDA Q/DQ kernels take float/float16: every scale and quantized input here is float
    types = {vi.name: vi.type.tensor_type.elem_type for vi in onnx.shape_inference.infer_shapes(proto).graph.value_info}
    types.update({i.name: i.data_type for i in proto.graph.initializer})
    assert {types[q.input[0]] for q in quantize} == {onnx.TensorProto.FLOAT}
    assert {types[n.input[1]] for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")} \
        == {onnx.TensorProto.FLOAT}

    hidden, pooled = ort_session(report.path, device="cpu")(ids, mask)
    with torch.no_grad():
        ours = gm(ids, attention_mask=mask)
    for got, want in ((hidden, ours.last_hidden_state), (pooled, ours.pooler_output)):
        want = want.float().numpy()
        assert np.linalg.norm(got - want) / np.linalg.norm(want) <= _FP8_TOLERANCE


def test_export_onnx_gemm_float8_structure(bert_fp8, tmp_path):
    from rewriter.backends.onnx import export_onnx

    _, gm, _, _ = bert_fp8
    report = export_onnx(gm, tmp_path / "bert-gemmfp8.onnx", target="ort-cuda", fp8_gemm="com.microsoft")
    proto = onnx.load(report.path)
    onnx.checker.check_model(proto, full_check=True)  # GemmFloat8 is a contrib op: checked as far as onnx knows
    gemms = [n for n in proto.graph.node if n.op_type == "GemmFloat8"]
    assert len(gemms) == 9 and all(n.domain == "com.microsoft" for n in gemms)
    assert "com.microsoft" in {o.domain for o in proto.opset_import}
    weights = {w.name for w in _initializers(proto, onnx.TensorProto.FLOAT8E4M3FN, 2)}
    assert {n.input[1] for n in gemms} == weights and len(weights) == 9  # read in float8 by the GEMM itself
    assert all({(a.name, a.i) for a in n.attribute} >= {("transB", 1), ("dtype", onnx.TensorProto.BFLOAT16)}
               for n in gemms)
    assert not [n for n in proto.graph.node if n.op_type in ("DequantizeLinear", "Gemm")]
    assert report.cast_chains == 0 and report.precision_mismatches == []
    assert report.ops_by_dtype["bfloat16"]["GemmFloat8"] == 9


def test_gemm_float8_refusals(bert_fp8, tmp_path):
    from rewriter.backends.onnx import export_onnx

    _, gm, _, _ = bert_fp8
    with pytest.raises(rewriter.BackendError, match="only ONNX Runtime's CUDA EP runs"):
        export_onnx(gm, tmp_path / "x.onnx", target="ort-cpu", fp8_gemm="com.microsoft")
    x = torch.randn(4, 16, 64)
    rows = rewriter.convert(_model(), (x,), precision="fp8", fp8=Fp8Options.always(granularity="row"))
    with pytest.raises(rewriter.BackendError, match=r"per-channel scales.*granularity='tensor'"):
        export_onnx(rows, tmp_path / "y.onnx", target="ort-cuda", fp8_gemm="com.microsoft")
    with pytest.raises(rewriter.ConfigError, match="fp8_gemm"):
        export_onnx(gm, tmp_path / "z.onnx", fp8_gemm="cublas")


# ---------------------------------------------------------------- the Q/DQ form for the CUDA EP: fp16 GEMMs

def _float_types(proto) -> dict:
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(inferred.graph.value_info) + list(proto.graph.output)}
    types.update({i.name: i.data_type for i in proto.graph.initializer})
    return types


@pytest.fixture(scope="module")
def calibrated_fp8():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, 64, generator=g)
    gm = rewriter.convert(_model(), (x,), precision="fp8", calibration=[(torch.randn(4, 16, 64, generator=g),)],
                          fp8=Fp8Options.always())
    return gm, x


def test_qdq_for_cuda_dequantizes_to_fp16_and_quantizes_on_the_float_grid(calibrated_fp8, tmp_path):
    """ORT's CUDA EP has no FP8 GEMM behind Q/DQ: the Gemm runs in DequantizeLinear's output dtype, so for
    ort-cuda that is float16 (tensor-core GEMM, 2-byte passes), while x is still quantized with the float
    scale (the torch op's grid)."""
    import onnxruntime as ort
    from rewriter.backends.onnx import export_onnx

    gm, x = calibrated_fp8
    cuda = export_onnx(gm, tmp_path / "cuda.onnx", target="ort-cuda")
    cpu = export_onnx(gm, tmp_path / "cpu.onnx", target="ort-cpu")
    assert any("FP8 GEMMs quantize from float16" in n for n in cuda.notes)
    assert any("FP8 GEMMs quantize from float32: target ort-cpu" in n for n in cpu.notes)
    # the user is told that on ORT's CUDA EP the FP8 file buys size, not speed (measured per kernel)
    assert any("not faster than an fp16 export" in n for n in cuda.notes)
    assert not any("not faster" in n for n in cpu.notes)
    proto = onnx.load(cuda.path)
    types = _float_types(proto)
    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    quantize = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    dequantize = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(quantize) == 2 and len(dequantize) == 4
    assert {(types[q.input[0]], types[q.input[1]]) for q in quantize} == {(F32, F32)}
    assert {types[d.input[1]] for d in dequantize} == {F16} and {types[d.output[0]] for d in dequantize} == {F16}
    gemms = [n for n in proto.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 2 and {types[g.output[0]] for g in gemms} == {F16}
    # one chain in both files: the output's bf16 rounding (the torch model returns bf16 values)
    assert cuda.cast_chains == cpu.cast_chains == 1 and cuda.precision_mismatches == []
    # the Gemm's fp16 result is widened for the fp32 LayerNorm, not rounded through bf16 first
    assert cuda.cast_rules.get("rounding after FP8 GEMM", 0) == 1
    runs = {}
    for report in (cuda, cpu):
        session = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"])
        (runs[report.path],) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    got, want = runs[cuda.path].astype(np.float64), runs[cpu.path].astype(np.float64)
    # same float8 values; fp16 scales (2^-11), fp16 GEMM outputs and the output's bf16 rounding
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 5e-3


def test_qdq_compute_keeps_float_where_fp16_does_not_fit(calibrated_fp8, bert_fp8):
    from rewriter.backends.onnx.fp8 import qdq_compute

    gm, _ = calibrated_fp8
    assert qdq_compute(gm, "ort-cuda")[0] == "float16"
    assert qdq_compute(gm, "tensorrt") == ("float32", "target tensorrt: Q/DQ and the GEMM in float (fp16 is "
                                                      "chosen for ort-cuda only)")
    _, dynamic, _, _ = bert_fp8  # uncalibrated: activation scales computed per call
    compute, why = qdq_compute(dynamic, "ort-cuda")
    assert compute == "float32" and "scales its activation dynamically" in why
    node = next(n for n in gm.graph.nodes if n.target is fp8_linear_op)
    scale = gm.get_buffer(node.args[2].target) if "." in node.args[2].target else getattr(gm, node.args[2].target)
    old = scale.clone()
    try:
        with torch.no_grad():
            scale.fill_(1e-6)  # below float16's normals
        compute, why = qdq_compute(gm, "ort-cuda")
        assert compute == "float32" and f"{node.name}: its weight scale" in why and "does not fit float16" in why
    finally:
        with torch.no_grad():
            scale.copy_(old)
