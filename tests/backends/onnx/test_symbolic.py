"""ONNX Runtime fusions (`export_onnx(optimize=True)`) on graphs whose sequence length is symbolic.

With the sequence axis symbolic, the exporter computes sizes from Shape() where a static export writes
constants: Reshape targets Concat(Shape(mask)[0], Shape(mask)[1], [N]), position ids Slice(arange buffer,
0, Shape(mask)[1]) or Range(0, S, 1). Asserted here: common.shape_values reads such sizes as named
dimensions; the Gemm -> MatMul rewrite and the EmbedLayerNormalization fusion apply to them (and not
where the size is another dimension, or the positions do not start at 0), and the fused graphs give
the unfused outputs at several lengths; BERT-tiny and GPT-2 tiny exported with optimize=True keep a
symbolic sequence dim_param on their inputs, fuse the same ops as the export at fixed sizes
(dynamic_sizes=False), and ONNX Runtime CPU runs them at two other lengths and another batch within the
fp16 tolerance of the converted PyTorch model; the fixed-size fallback is kept only when an attention
fuses at fixed sizes alone, with the reason in the report notes.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import rewriter
from rewriter.backends.onnx import export_onnx, ort_session
from rewriter.backends.onnx.common import shape_values
from rewriter.backends.onnx.embeddings import fuse_embed_layer_norm
from rewriter.backends.onnx.gemm import unflatten_gemms
from tests.backends.onnx.onnx_checks import op_counts, run_cpu
from tests.helpers import rel_l2

transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

TOLERANCE = 3e-3  # fp16: relative L2 vs the converted PyTorch model, as the other ONNX tests
H = 8


def _model(nodes, inputs, outputs, inits, value_info=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits, value_info=list(value_info))
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _ints(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _dims_of(mask: str, prefix: str) -> list:
    """Shape(mask)[0] and Shape(mask)[1] the way the dynamo exporter writes them (Squeeze, Reshape [-1])."""
    return [helper.make_node("Shape", [mask], [f"{prefix}_b"], start=0, end=1),
            helper.make_node("Shape", [mask], [f"{prefix}_s"], start=1, end=2),
            helper.make_node("Squeeze", [f"{prefix}_s"], [f"{prefix}_s0"]),
            helper.make_node("Reshape", [f"{prefix}_s0", "minus_one"], [f"{prefix}_s1"])]


# ------------------------------------------------------------------------- shape values (unit)


def test_shape_values_reads_sizes_computed_from_shape():
    nodes = _dims_of("mask", "d") + [
        helper.make_node("Concat", ["d_b", "d_s1", "four", "sixteen"], ["target"], axis=0),
        helper.make_node("Gather", ["target", "one"], ["picked"], axis=0),
        helper.make_node("Slice", ["target", "one", "big"], ["tail"]),
        helper.make_node("Shape", ["x"], ["x_shape"]),  # a dim without a name: unknown
        helper.make_node("Reshape", ["x", "target"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"]),
                           helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", None, 64])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                    helper.make_tensor_value_info("picked", TensorProto.INT64, None),
                    helper.make_tensor_value_info("tail", TensorProto.INT64, None),
                    helper.make_tensor_value_info("x_shape", TensorProto.INT64, None)],
                   [_ints("minus_one", [-1]), _ints("four", [4]), _ints("sixteen", [16]), _ints("one", [1]),
                    _ints("big", [100])])
    m = ir.serde.deserialize_model(model)
    values = {v.name: v for n in m.graph for v in n.outputs}
    assert shape_values(values["target"]) == ["batch", "seq", 4, 16]
    assert shape_values(values["picked"]) == ["seq"]
    assert shape_values(values["tail"]) == ["seq", 4, 16]
    assert shape_values(values["x_shape"]) is None


# ------------------------------------------------------------------------- Gemm -> MatMul (unit)


def _flattened_linear(rank4: bool) -> onnx.ModelProto:
    """x [batch, seq, 8] (or [batch, seq, 2, 4]) -> Reshape([-1, 8]) -> Gemm(W[8, 6], C) -> Reshape(
    Concat(Shape(mask)[0], Shape(mask)[1], [6])): GPT-2's Conv1D exported with a symbolic length."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float16), "W"),
             numpy_helper.from_array(rng.standard_normal(6).astype(np.float16), "C"),
             _ints("flat", [-1, 8]), _ints("minus_one", [-1]), _ints("n", [6])]
    nodes = _dims_of("mask", "d") + [
        helper.make_node("Concat", ["d_b", "d_s1", "n"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "flat"], ["x2"], allowzero=1, name="fc/view"),
        helper.make_node("Gemm", ["x2", "W", "C"], ["mm"], name="fc/addmm"),
        helper.make_node("Reshape", ["mm", "target"], ["y"], allowzero=1, name="fc/view_1")]
    x_dims = ["batch", "seq", 2, 4] if rank4 else ["batch", "seq", 8]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT16, x_dims),
                          helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", "seq", 6])], inits,
                  [helper.make_tensor_value_info("mm", TensorProto.FLOAT16, ["batch*seq", 6])])


@pytest.mark.parametrize("rank4", [False, True], ids=["rank3", "rank4"])
def test_gemm_with_symbolic_target_becomes_matmul(rank4):
    before = _flattened_linear(rank4)
    m = ir.serde.deserialize_model(before)
    assert unflatten_gemms(m) == 1
    after = ir.serde.serialize_model(m)
    onnx.checker.check_model(after, full_check=True)
    ops = op_counts(after)
    assert "Gemm" not in ops and ops["MatMul"] == 1 and ops["Add"] == 1
    # rank 3: x feeds the MatMul as it is; rank 4: one Reshape(x, [0, 0, 8]) (batch and length copied)
    reshapes = [n for n in after.graph.node if n.op_type == "Reshape"]
    if rank4:
        assert len(reshapes) == 1
        target = next(i for i in after.graph.initializer if i.name == reshapes[0].input[1])
        assert numpy_helper.to_array(target).tolist() == [0, 0, 8]
    else:
        assert not reshapes
    rng = np.random.default_rng(1)
    for batch, length in ((2, 5), (3, 11)):
        x = rng.standard_normal((batch, length) + ((2, 4) if rank4 else (8,))).astype(np.float16)
        feeds = {"x": x, "mask": np.ones((batch, length), np.int64)}
        got, want = run_cpu(after, feeds)[0], run_cpu(before, feeds)[0]
        assert got.shape == want.shape == (batch, length, 6)
        assert rel_l2(want, got) < 2e-3


def test_gemm_target_of_another_dimension_left_alone():
    """The target's second size is the batch again: rows are not (batch, seq), no rewrite."""
    before = _flattened_linear(False)
    for node in before.graph.node:
        if node.op_type == "Concat" and node.output[0] == "target":
            node.input[1] = "d_b"
    m = ir.serde.deserialize_model(before)
    assert unflatten_gemms(m) == 0


# ------------------------------------------------------------------------- embeddings (unit)


def _embeddings(positions: str) -> onnx.ModelProto:
    """input_ids [batch, seq] -> Gather(W_word) + Gather(W_type, zeros) + Gather(W_pos, P) -> LayerNorm,
    as BERT exports with a symbolic length. P: "slice" (Slice(arange buffer [1, 10], 0, Shape(ids)[1]),
    BERT's position_ids buffer), "range" (Unsqueeze(Range(0, S, 1)), GPT-2's arange), "slice_batch" (the
    Slice ends at the batch size), "range_from_1" (Range(1, S + 1)): the last two are not positions 0..S-1."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((20, H)).astype(np.float32), "W_word"),
             numpy_helper.from_array(rng.standard_normal((10, H)).astype(np.float32), "W_pos"),
             numpy_helper.from_array(rng.standard_normal((2, H)).astype(np.float32), "W_type"),
             numpy_helper.from_array(np.arange(10, dtype=np.int64).reshape(1, 10), "pos_buffer"),
             numpy_helper.from_array(np.zeros((1, 10), np.int64), "type_buffer"),
             numpy_helper.from_array((1 + 0.1 * rng.standard_normal(H)).astype(np.float32), "gamma"),
             numpy_helper.from_array((0.1 * rng.standard_normal(H)).astype(np.float32), "beta"),
             _ints("zero", [0]), _ints("one", [1]), _ints("minus_one", [-1]),
             numpy_helper.from_array(np.array(0, np.int64), "start0"),
             numpy_helper.from_array(np.array(1, np.int64), "start1"),
             numpy_helper.from_array(np.array(1, np.int64), "delta")]
    nodes = _dims_of("input_ids", "d")[:2]  # Shape(ids)[0], Shape(ids)[1]
    if positions in ("slice", "slice_batch"):
        end = "d_s" if positions == "slice" else "d_b"
        nodes.append(helper.make_node("Slice", ["pos_buffer", "zero", end, "one", "one"], ["pos_ids"]))
    else:
        nodes.append(helper.make_node("Squeeze", ["d_s"], ["length"]))
        if positions == "range":
            nodes.append(helper.make_node("Range", ["start0", "length", "delta"], ["positions"]))
        else:
            nodes += [helper.make_node("Add", ["length", "start1"], ["limit"]),
                      helper.make_node("Range", ["start1", "limit", "delta"], ["positions"])]
        nodes.append(helper.make_node("Unsqueeze", ["positions", "zero"], ["pos_ids"]))
    nodes += [
        helper.make_node("Slice", ["pos_buffer", "zero", "d_s", "one", "one"], ["type_index"]),
        helper.make_node("GatherElements", ["type_buffer", "type_index"], ["buffered"], axis=1),
        helper.make_node("Concat", ["d_b", "d_s"], ["type_shape"], axis=0),
        helper.make_node("Expand", ["buffered", "type_shape"], ["token_type_ids"]),
        helper.make_node("Gather", ["W_word", "input_ids"], ["e_word"], name="word_embeddings/embedding"),
        helper.make_node("Gather", ["W_type", "token_type_ids"], ["e_type"], name="token_type/embedding"),
        helper.make_node("Add", ["e_word", "e_type"], ["partial"], name="embeddings/add"),
        helper.make_node("Gather", ["W_pos", "pos_ids"], ["e_pos"], name="position_embeddings/embedding"),
        helper.make_node("Add", ["partial", "e_pos"], ["sum"], name="embeddings/add_1"),
        helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12,
                         name="embeddings.LayerNorm/layer_norm")]
    # the exporter annotates every tensor with its symbolic shape; shape inference alone leaves some unnamed
    known = [helper.make_tensor_value_info(n, TensorProto.INT64, d) for n, d in (
        ("pos_ids", [1, "seq"]), ("type_index", [1, "seq"]), ("buffered", [1, "seq"]),
        ("token_type_ids", ["batch", "seq"]))] + [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in (
            ("e_word", ["batch", "seq", H]), ("e_type", ["batch", "seq", H]), ("partial", ["batch", "seq", H]),
            ("e_pos", [1, "seq", H]), ("sum", ["batch", "seq", H]))]
    return _model(nodes, [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", H])], inits, known)


@pytest.mark.parametrize("positions", ["slice", "range"])
def test_embeddings_with_symbolic_length_fused(positions):
    before = _embeddings(positions)
    m = ir.serde.deserialize_model(before)
    assert fuse_embed_layer_norm(m) == 1
    after = ir.serde.serialize_model(m)
    onnx.checker.check_model(after, full_check=True)
    # the whole position and token-type computation is gone: the node reads the ids and the tables
    assert op_counts(after) == {"EmbedLayerNormalization": 1, "Cast": 1}
    assert [d.dim_param for d in after.graph.input[0].type.tensor_type.shape.dim] == ["batch", "seq"]
    rng = np.random.default_rng(4)
    for batch, length in ((3, 6), (1, 10), (2, 1)):
        feeds = {"input_ids": rng.integers(0, 20, (batch, length)).astype(np.int64)}
        got, want = run_cpu(after, feeds)[0], run_cpu(before, feeds)[0]
        assert got.shape == want.shape == (batch, length, H)
        assert rel_l2(want, got) < 1e-5


@pytest.mark.parametrize("positions", ["slice_batch", "range_from_1"])
def test_embeddings_positions_not_arange_left_alone(positions):
    m = ir.serde.deserialize_model(_embeddings(positions))
    assert fuse_embed_layer_norm(m) == 0
    assert op_counts(m)["LayerNormalization"] == 1 and op_counts(m)["Gather"] == 3


# ------------------------------------------------------------------------- BERT-tiny and GPT-2 tiny end to end


def _bench_onnx():
    from tools import bench_onnx

    return bench_onnx


def _inputs(vocab: int, batch: int, length: int, seed: int, causal: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    if causal:
        return {"input_ids": ids}
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length * 3 // 4:] = 0  # one row padded at the end
    return {"input_ids": ids, "attention_mask": mask}


def _export_both(gm, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        symbolic = export_onnx(gm, folder / "symbolic.onnx", optimize=True)
        fixed = export_onnx(gm, folder / "fixed.onnx", optimize=True, dynamic_sizes=False)
    return symbolic, fixed


@pytest.fixture(scope="module", params=["bert", "gpt2", "gpt2_causal"])
def exported(request, tmp_path_factory):
    """BERT-tiny / GPT-2 tiny (tools/bench_onnx.build: random biases and LayerNorm affine, as a checkpoint)
    converted to fp16 at one length and exported with optimize=True at symbolic and at fixed sizes.
    "gpt2_causal": input_ids only (SDPA is_causal=True, the exporter builds the causal mask from shapes)."""
    name = request.param.split("_")[0]
    model, _, feeds, _, _ = _bench_onnx().build(name, small=True, random_bias=True)
    vocab = model.model.config.vocab_size
    if request.param == "gpt2_causal":
        model, feeds = _IdsOnly(model.model).eval(), {"input_ids": feeds["input_ids"]}
    gm = rewriter.convert(model, (), dict(feeds), precision="fp16")
    symbolic, fixed = _export_both(gm, tmp_path_factory.mktemp(request.param))
    return request.param, gm, vocab, tuple(feeds["input_ids"].shape), symbolic, fixed


class _IdsOnly(torch.nn.Module):
    """GPT-2 called with input_ids alone (no attention_mask): its attention is is_causal=True SDPA."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).last_hidden_state


_FUSED = {"bert": {"EmbedLayerNormalization": 1, "Attention": 2, "SkipLayerNormalization": 4, "BiasGelu": 2},
          "gpt2": {"Attention": 2, "SkipLayerNormalization": 4, "FastGelu": 2}}


def test_fused_export_has_symbolic_sequence_and_same_fusions(exported):
    kind, _, _, (batch, length), symbolic, fixed = exported
    proto = onnx.load(symbolic.path)
    onnx.checker.check_model(proto, full_check=True)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    names = ["input_ids"] + ([] if kind == "gpt2_causal" else ["attention_mask"])
    assert list(dims) == names
    sequence = dims["input_ids"][1]
    assert isinstance(sequence, str) and sequence and all(d == ["batch", sequence] for d in dims.values()), dims
    assert symbolic.symbolic_sizes == [f"{n}[1]" for n in names]
    # the export at fixed sizes: the sequence length is the example's
    fixed_dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                  for i in onnx.load(fixed.path).graph.input]
    assert fixed_dims == [["batch", length]] * len(names) and fixed.symbolic_sizes == []
    # the same fused ops at symbolic and at fixed sizes, and the ops they replace are gone
    assert symbolic.fusions == fixed.fusions == _FUSED[kind.split("_")[0]]
    ops = op_counts(proto)
    for gone in ("Gemm", "Split", "Softmax", "MultiHeadAttention", "LayerNormalization"):
        if not (gone == "LayerNormalization" and kind != "bert"):  # GPT-2's first LN reads the residual too
            assert gone not in ops, gone
    notes = "\n".join(symbolic.fusion_notes + symbolic.notes)
    assert "skipped" not in notes and "not applied" not in notes and "fixed at" not in notes, notes
    assert symbolic.float_casts == fixed.float_casts and symbolic.precision_mismatches == []


def test_fused_export_runs_at_other_lengths_and_batch(exported):
    kind, gm, vocab, (batch, length), symbolic, _ = exported
    session = ort_session(symbolic.path, device="cpu")
    for i, (b, s) in enumerate(((batch, length // 2 + 1), (batch, length + 16), (batch + 1, length - 5))):
        feeds = _inputs(vocab, b, s, seed=10 + i, causal=kind == "gpt2_causal")
        got = session(**feeds)[0]
        with torch.no_grad():
            want = gm(**feeds)
        want = (want[0] if isinstance(want, (tuple, list)) else want).float().numpy()
        assert got.shape == want.shape == (b, s, want.shape[-1])
        valid = feeds["attention_mask"].bool().numpy() if "attention_mask" in feeds else np.ones((b, s), bool)
        assert rel_l2(want[valid], got[valid]) <= TOLERANCE, (b, s)


def test_fixed_sizes_kept_only_when_attention_fuses_at_fixed_sizes_alone(monkeypatch, tmp_path):
    """The fallback: an attention left unfused at symbolic sizes and fused at fixed ones (simulated: the
    count of unfused attention ops reported as 2 at symbolic sizes) gives the file at fixed sizes, and the
    note names the symbolic sizes, the counts and optimize=False; unfused at both keeps the sizes symbolic."""
    import rewriter.backends.onnx.export as export_module

    model, _, feeds, _, _ = _bench_onnx().build("bert", small=True, random_bias=True)
    gm = rewriter.convert(model, (), dict(feeds), precision="fp16")
    real = export_module.unfused_attention
    symbolic_unfused = {"value": 2}

    def unfused(converted, fusions):  # 2 at symbolic sizes (the first build), the real count at fixed ones
        value, symbolic_unfused["value"] = symbolic_unfused["value"], None
        return real(converted, fusions) if value is None else value

    monkeypatch.setattr(export_module, "unfused_attention", unfused)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_onnx(gm, tmp_path / "fixed.onnx", optimize=True)
    assert report.symbolic_sizes == [] and report.fusions.get("Attention") == 2
    note = next(n for n in report.notes if n.startswith("optimize=True"))
    assert "(input_ids[1], attention_mask[1]) are fixed at the example's" in note
    assert "left 2 of the model's attention ops unfused, with them fixed 0" in note and "optimize=False" in note
    dims = [[d.dim_value for d in i.type.tensor_type.shape.dim][1] for i in onnx.load(report.path).graph.input]
    assert dims == [feeds["input_ids"].shape[1]] * 2

    monkeypatch.setattr(export_module, "unfused_attention", lambda converted, fusions: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_onnx(gm, tmp_path / "symbolic.onnx", optimize=True)
    assert report.symbolic_sizes == ["input_ids[1]", "attention_mask[1]"]
    assert any("stay unfused at symbolic and at fixed sizes alike" in n for n in report.notes)
