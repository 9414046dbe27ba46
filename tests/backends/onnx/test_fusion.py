"""ONNX backend fusions (`export_onnx(optimize=True)`) and tools/profile_onnx.py, on the ONNX Runtime CPU EP.

GPT-2's Conv1D exports as Reshape -> Gemm -> Reshape; the fusions need the MatMul form, and the attention
fusion used to hand the rank-2 Gemm a rank-3 tensor (the fused graph did not load). With is_causal=True the
exporter's mask reads Shape(q), Shape(k), which blocked the attention fusion. Asserted here: the rewrites on
hand-built graphs (and where they must not apply), the fused GPT-2 with a data mask and with is_causal
(packed Attention, SkipLayerNorm, FastGelu; same float Casts as the plain export, outputs as PyTorch's),
and the profile summary.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import rewriter
from rewriter.backends.onnx import cast_chains, ort_session
from rewriter.backends.onnx.attention import pack_attention
from rewriter.backends.onnx.gemm import shapes_from_inputs, unflatten_gemms
from tests.backends.onnx.onnx_checks import export_plain_and_fused, op_counts, run_cpu
from tests.helpers import rel_l2

transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")


# ------------------------------------------------------------------------- Gemm -> MatMul (unit)


def _flattened_linear(x_shape, flat_shape, out_shape, *, trans_b=0, bias=True) -> onnx.ModelProto:
    """x (fp16) -> Reshape(flat_shape) -> Gemm(W[8, 6], C[6]) -> Reshape(out_shape) -> y."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 8) if trans_b else (8, 6)).astype(np.float16)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(flat_shape, np.int64), "s1"),
             numpy_helper.from_array(np.array(out_shape, np.int64), "s2")]
    gemm_inputs = ["flat", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(6).astype(np.float16), "C"))
        gemm_inputs.append("C")
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["flat"], name="fc/view"),
             helper.make_node("Gemm", gemm_inputs, ["mm"], name="fc/addmm", transB=trans_b),
             helper.make_node("Reshape", ["mm", "s2"], ["y"], name="fc/view_1")]
    y_shape = ["batch"] + list(out_shape[1:])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, y_shape)], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


@pytest.mark.parametrize("x_shape,bias", [(["batch", 4, 8], True), (["batch", 4, 2, 4], True),
                                          (["batch", 4, 8], False)])
def test_flattened_gemm_becomes_matmul(x_shape, bias):
    before = _flattened_linear(x_shape, [-1, 8], [-1, 4, 6], bias=bias)
    model = ir.serde.deserialize_model(before)
    assert unflatten_gemms(model) == 1
    after = ir.serde.serialize_model(model)
    onnx.checker.check_model(after, full_check=True)
    ops = op_counts(after)
    assert "Gemm" not in ops and ops["MatMul"] == 1 and ops.get("Add", 0) == int(bias)
    # a rank-3 x feeds the MatMul as it is; a rank-4 one is viewed as (rows..., K) by one Reshape
    assert ops.get("Reshape", 0) == (0 if len(x_shape) == 3 else 1)
    assert [o.name for o in after.graph.output] == ["y"]
    x = np.random.default_rng(1).standard_normal([3 if d == "batch" else d for d in x_shape]).astype(np.float16)
    got, want = run_cpu(after, {"x": x})[0], run_cpu(before, {"x": x})[0]
    assert got.dtype == np.float16 and got.shape == (3, 4, 6)
    assert rel_l2(want, got) < 2e-3


def test_flattened_gemm_rows_regrouped_still_equivalent():
    """Rows flattened then regrouped differently ((2, 4) -> (4, 2)) is still a MatMul on x viewed as (4, 2, K)."""
    before = _flattened_linear([2, 4, 8], [-1, 8], [4, 2, 6])
    model = ir.serde.deserialize_model(before)
    assert unflatten_gemms(model) == 1
    after = ir.serde.serialize_model(model)
    x = np.random.default_rng(1).standard_normal((2, 4, 8)).astype(np.float16)
    got, want = run_cpu(after, {"x": x})[0], run_cpu(before, {"x": x})[0]
    assert got.shape == want.shape == (4, 2, 6) and rel_l2(want, got) < 2e-3


@pytest.mark.parametrize("case", ["transB", "columns_mixed_into_rows", "flatten_not_to_rows"])
def test_flattened_gemm_left_alone_when_not_equivalent(case):
    kwargs = {"transB": dict(x_shape=["batch", 4, 8], flat_shape=[-1, 8], out_shape=[-1, 4, 6], trans_b=1),
              "columns_mixed_into_rows": dict(x_shape=[2, 4, 8], flat_shape=[-1, 8], out_shape=[-1, 2, 12]),
              "flatten_not_to_rows": dict(x_shape=[2, 4, 8], flat_shape=[4, 16], out_shape=[-1, 4, 6])}[case]
    model = _flattened_linear(**kwargs)
    if case == "flatten_not_to_rows":  # the Gemm reads K=16 columns: W is (16, 6)
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((16, 6), np.float16), "W"))
    m = ir.serde.deserialize_model(model)
    assert unflatten_gemms(m) == 0
    assert op_counts(m)["Gemm"] == 1


def test_shape_of_intermediate_read_from_inputs():
    """Shape(Transpose(x)) -> Shape(x, batch axis) + constants; the Transpose is then read by nothing else."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], name="t", perm=[0, 2, 1]),
             helper.make_node("Shape", ["t"], ["s"], name="s", start=0, end=2),
             helper.make_node("Relu", ["t"], ["y"], name="r")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5, 3]),
                               helper.make_tensor_value_info("s", TensorProto.INT64, [2])])
    before = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    m = ir.serde.deserialize_model(before)
    assert shapes_from_inputs(m) == 1
    after = ir.serde.serialize_model(m)
    onnx.checker.check_model(after, full_check=True)
    transposed = {n.output[0] for n in after.graph.node if n.op_type == "Transpose"}
    assert not any(i in transposed for n in after.graph.node if n.op_type == "Shape" for i in n.input)
    x = np.zeros((4, 3, 5), np.float32)
    assert run_cpu(after, {"x": x})[1].tolist() == [4, 5] == run_cpu(before, {"x": x})[1].tolist()


# ------------------------------------------------------------------------- packed attention (unit)


def _split_mha(extra_reader: bool) -> onnx.ModelProto:
    """x -> MatMul(W[8, 24]) -> Add(b) -> Split(3) -> MultiHeadAttention(q, k, v, attention_bias)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 24)).astype(np.float32) * 0.3, "W"),
             numpy_helper.from_array(rng.standard_normal(24).astype(np.float32) * 0.1, "b")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="c_attn/MatMul"),
             helper.make_node("Add", ["mm", "b"], ["qkv"], name="c_attn/Add"),
             helper.make_node("Split", ["qkv"], ["q", "k", "v"], name="split", axis=2, num_outputs=3),
             helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "", "mask"], ["y"],
                              name="attn/MultiHeadAttention", domain="com.microsoft", num_heads=2)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5, 8])]
    if extra_reader:
        nodes.append(helper.make_node("Identity", ["q"], ["q_out"], name="peek"))
        outputs.append(helper.make_tensor_value_info("q_out", TensorProto.FLOAT, ["batch", 5, 8]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, 8]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, 5, 5])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return onnx.shape_inference.infer_shapes(model)


def test_split_multihead_attention_packed_into_attention():
    before = _split_mha(extra_reader=False)
    m = ir.serde.deserialize_model(before)
    assert pack_attention(m) == 1
    after = ir.serde.serialize_model(m)
    assert op_counts(after) == {"Attention": 1}
    node = after.graph.node[0]
    assert list(node.input[:3]) == ["x", "W", "b"] and node.input[5] == "mask"
    rng = np.random.default_rng(2)
    causal = np.triu(np.full((5, 5), -10000.0, np.float32), 1)
    feeds = {"x": rng.standard_normal((3, 5, 8)).astype(np.float32),
             "mask": np.broadcast_to(causal, (3, 1, 5, 5)).copy()}
    assert rel_l2(run_cpu(before, feeds)[0], run_cpu(after, feeds)[0]) < 1e-5


def test_split_read_elsewhere_is_not_packed():
    m = ir.serde.deserialize_model(_split_mha(extra_reader=True))
    assert pack_attention(m) == 0
    assert op_counts(m)["MultiHeadAttention"] == 1


# ------------------------------------------------------------------------- GPT-2 end to end


def _gpt2_inputs(kind: str, batch: int, seed: int) -> dict:
    """"mask": input_ids and an attention_mask padded at the end of the first row (as in the benchmark:
    the mask is data, the attention keeps an additive mask); "causal": input_ids only (the SDPA becomes
    is_causal=True and the exporter builds the causal mask from Shape(q) and Shape(k))."""
    ids = torch.randint(0, 100, (batch, 16), generator=torch.Generator().manual_seed(seed))
    if kind == "causal":
        return {"input_ids": ids}
    mask = torch.ones(batch, 16, dtype=torch.long)
    mask[0, 12:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module", params=["mask", "causal"])
def gpt2(request, tmp_path_factory):
    """Tiny GPT-2 with non-zero biases (as in a checkpoint; random init has all-zero biases, which the
    export drops), converted to fp16 and exported plain and fused."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                  use_cache=False, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    gm = rewriter.convert(model, (), _gpt2_inputs(request.param, 2, 1), precision="fp16")
    folder = tmp_path_factory.mktemp("gpt2fuse")
    plain, fused = export_plain_and_fused(gm, folder)
    return request.param, gm, plain, fused


def test_gpt2_fusion_loads_and_fuses_attention(gpt2):
    _, _, plain, fused = gpt2
    notes = "\n".join(fused.fusion_notes)
    assert "skipped" not in notes and "not applied" not in notes, notes
    assert "flattened Gemm read as MatMul" in notes
    assert fused.fusions.get("Attention") == 2  # packed QKV: MatMul + Add + Split + MHA in one node
    assert fused.fusions.get("SkipLayerNormalization") == 4 and fused.fusions.get("FastGelu") == 2
    proto = onnx.load(fused.path)
    ops = op_counts(proto)
    for gone in ("Gemm", "Split", "Softmax", "MultiHeadAttention", "Tanh"):
        assert gone not in ops, gone
    # the precision decisions: same float Casts as the plain export, no chains, fp32 LayerNorm islands
    assert fused.float_casts == plain.float_casts and cast_chains(proto) == 0
    assert fused.precision_mismatches == []
    assert fused.ops_by_dtype["float32"]["SkipLayerNormalization"] == 4
    assert fused.ops_by_dtype["float16"]["Attention"] == 2 and fused.ops_by_dtype["float16"]["FastGelu"] == 2


def test_gpt2_fused_matches_pytorch(gpt2):
    kind, gm, _, fused = gpt2
    session = ort_session(fused.path, device="cpu")
    feeds = _gpt2_inputs(kind, 3, 5)
    got = session(**feeds)
    with torch.no_grad():
        want = gm(**feeds)
    want = want[0] if isinstance(want, (tuple, list)) else getattr(want, "last_hidden_state", want)
    assert got[0].dtype == np.float32 and got[0].shape == tuple(want.shape)
    assert rel_l2(want.float().numpy(), got[0]) <= 3e-3


# ------------------------------------------------------------------------- tools/profile_onnx.py


@pytest.fixture(scope="module")
def profile_tool():
    from tools import profile_onnx

    return profile_onnx


def test_profile_model_on_cpu(profile_tool, tmp_path):
    before = _flattened_linear(["batch", 4, 8], [-1, 8], [-1, 4, 6])
    path = tmp_path / "linear.onnx"
    onnx.save(before, path)
    summary = profile_tool.profile_model(path, device="cpu", dims={"batch": 64}, runs=4, warmup=2)
    assert summary["source"] == "node" and summary["runs"] == 4 and summary["provider"] == "CPU"
    assert "Gemm" in summary["by_op"] and summary["by_op"]["Gemm"]["count"] == 1
    assert summary["total_ms"] == pytest.approx(sum(v["ms"] for v in summary["by_op"].values()), rel=1e-2, abs=1e-3)
    ms = [n["ms"] for n in summary["top_nodes"]]
    assert ms == sorted(ms, reverse=True) and summary["top_nodes"][0]["name"]
    assert set(summary["by_dtype"]) <= {"float16", "float32"}  # the CPU EP may run fp16 Gemm in fp32
    assert profile_tool.op_counts(path) == {"float16": {"Reshape": 2, "Gemm": 1}}
    text = profile_tool.format_summary(summary, "linear")
    assert "Gemm" in text and "top" in text


def test_summarize_prefers_gpu_kernel_events_and_skips_warmup(profile_tool, tmp_path):
    def node(name, op, ts, dur, dtype="float16"):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur,
                "args": {"op_name": op, "provider": "CUDAExecutionProvider",
                         "output_type_shape": [{dtype: [2, 4]}]}}

    def kernel(parent, ts, dur):
        return {"cat": "Kernel", "name": "sm90_gemm", "ts": ts, "dur": dur, "args": {"parent_name": parent}}

    events = []
    for run, start in enumerate((0, 1000, 2000)):  # run 0 is the warm-up
        events.append({"cat": "Session", "name": "model_run", "ts": start, "dur": 900})
        events += [node("mm", "MatMul", start + 10, 5), node("ln", "SkipLayerNormalization", start + 20, 3, "float32"),
                   kernel("mm", start + 30, 100 * (run + 1)), kernel("mm", start + 40, 10),
                   kernel("ln", start + 50, 20)]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(events))
    s = profile_tool.summarize(trace, skip_runs=1)
    assert s["source"] == "kernel" and s["runs"] == 2
    # mm: (200 + 10 + 300 + 10) us over 2 runs = 0.26 ms; ln: 0.02 ms
    assert s["by_op"]["MatMul"]["ms"] == pytest.approx(0.26)
    assert s["by_op"]["SkipLayerNormalization"]["ms"] == pytest.approx(0.02)
    assert s["by_op_dtype"]["SkipLayerNormalization"] == {"float32": pytest.approx(0.02)}
    assert s["by_dtype"]["float16"] == pytest.approx(0.26) and s["top_nodes"][0]["name"] == "mm"
    with pytest.raises(ValueError, match="enable_profiling"):
        bad = tmp_path / "empty.json"
        bad.write_text("[]")
        profile_tool.summarize(bad)


def test_dtype_inference_does_not_copy_the_weights():
    """precision_kept types every tensor by shape inference on a copy whose weights are typed inputs: the
    same dtypes as on the full model (and the 1.4 GB of GPT-2 medium is not copied twice per fusion step)."""
    from rewriter.backends.onnx.fusion import _float_value_dtypes, _typing_copy

    w = numpy_helper.from_array(np.ones((64, 64), np.float16), "w")
    shape = numpy_helper.from_array(np.array([-1, 64], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["x2"]), helper.make_node("MatMul", ["x2", "w"], ["y16"]),
             helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 3, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, shape])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    typed = _typing_copy(proto)
    assert [i.name for i in typed.graph.initializer] == ["shape"]  # small constants stay (shape inference reads them)
    assert "w" in {i.name for i in typed.graph.input}
    types = _float_value_dtypes(proto)
    full = onnx.shape_inference.infer_shapes(proto)
    assert {vi.name: vi.type.tensor_type.elem_type for vi in full.graph.value_info}.items() <= types.items()
    assert types["y16"] == TensorProto.FLOAT16 and types["w"] == TensorProto.FLOAT16


def test_runs_like_reuses_known_outputs():
    """A fusion step compares with the previous step's outputs when given (no second session of the
    unfused graph) and hands its own outputs on."""
    from rewriter.backends.onnx.fusion import runs_like

    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    before = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feeds = {"x": np.array([-1.0, 0.5, 2.0, -3.0], np.float32)}
    got: list = []
    assert runs_like(before, before, feeds, None, got) is None
    np.testing.assert_array_equal(got[0], [0.0, 0.5, 2.0, 0.0])
    wrong = [np.array([5.0, 5.0, 5.0, 5.0], np.float32)]  # stale outputs given as the unfused ones are used as such
    assert "differ from the unfused ones" in runs_like(before, before, feeds, wrong)
