"""EmbedLayerNormalization fusion (`export_onnx(optimize=True)`, backends/onnx/embeddings.py), on the ONNX Runtime CPU EP.

BERT's embeddings export as ~9 small nodes: token-type ids computed from a zero buffer (GatherElements,
Expand), three Gathers, two fp32 Adds, (a Cast to fp16 when LayerNorm is kept fp16) and LayerNormalization.
The fusion replaces them by one com.microsoft EmbedLayerNormalization in fp32, the tables' dtype.
Asserted here: the rewrite on hand-built graphs (constant and data token types, fp32 and fp16 LayerNorm)
and where it must not apply (position ids that are not arange(S), a position table shorter than S, a
sum read elsewhere as GPT-2's residual is), and on a small BERT (default, LayerNorm fp16, token_type_ids
as an input): one fused node, no embedding Gather left, the checker passes, outputs as the unfused export
and as PyTorch, the report names the fusion (and the fp32 raise for LayerNorm fp16); BERT whose position
ids are an input and GPT-2 are not fused.
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
from rewriter.backends.onnx import cast_chains, export_onnx, ort_session
from rewriter.backends.onnx.embeddings import fuse_embed_layer_norm
from rewriter.backends.onnx.fusion import precision_kept, runs_like
from tests.backends.onnx.onnx_checks import export_plain_and_fused, op_counts, run_cpu
from tests.helpers import rel_l2

transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

TOLERANCE = 3e-3  # relative L2 vs the converted PyTorch model and vs the unfused export, as the other ONNX tests
RAISED = ("LayerNorm computes in fp32, more precise than the fp16 decision; ORT's EmbedLayerNormalization has "
          "no mixed-dtype form")


# ------------------------------------------------------------------------- hand-built graphs (unit)

S, H = 6, 8


def _embeddings(*, ln16=False, token_type="constant", positions="arange", residual=False) -> onnx.ModelProto:
    """input_ids [batch, S] -> Gather(W_word) + Gather(W_type, T) + Gather(W_pos, P) -> [Cast fp16] ->
    LayerNormalization -> y. T: "constant" (BERT without token_type_ids: Expand(GatherElements(zeros,
    arange), [batch, S])) or "input"; P: arange(S) ("arange"), arange(1, S + 1) ("offset") or arange(S)
    into a table of S - 2 rows ("short"). residual: the sum is a graph output too (read elsewhere)."""
    rng = np.random.default_rng(0)
    ln_dtype = np.float16 if ln16 else np.float32
    pos_rows = S - 2 if positions == "short" else 10
    pos_ids = np.arange(1, S + 1) if positions == "offset" else np.arange(S)
    inits = [numpy_helper.from_array(rng.standard_normal((20, H)).astype(np.float32), "W_word"),
             numpy_helper.from_array(rng.standard_normal((pos_rows, H)).astype(np.float32), "W_pos"),
             numpy_helper.from_array(rng.standard_normal((2, H)).astype(np.float32), "W_type"),
             numpy_helper.from_array(pos_ids.reshape(1, S).astype(np.int64), "pos_ids"),
             numpy_helper.from_array((1 + 0.1 * rng.standard_normal(H)).astype(ln_dtype), "gamma"),
             numpy_helper.from_array((0.1 * rng.standard_normal(H)).astype(ln_dtype), "beta")]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", S])]
    nodes = []
    if token_type == "input":
        inputs.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", S]))
    else:
        inits += [numpy_helper.from_array(np.zeros((1, 10), np.int64), "type_buffer"),
                  numpy_helper.from_array(np.array([S], np.int64), "seq")]
        nodes += [helper.make_node("GatherElements", ["type_buffer", "pos_ids"], ["buffered"], axis=1,
                                   name="embeddings/gather"),
                  helper.make_node("Shape", ["input_ids"], ["batch"], start=0, end=1, name="embeddings/shape"),
                  helper.make_node("Concat", ["batch", "seq"], ["type_shape"], axis=0, name="embeddings/concat"),
                  helper.make_node("Expand", ["buffered", "type_shape"], ["token_type_ids"], name="embeddings/expand")]
    nodes += [helper.make_node("Gather", ["W_word", "input_ids"], ["e_word"], name="word_embeddings/embedding"),
              helper.make_node("Gather", ["W_type", "token_type_ids"], ["e_type"], name="token_type/embedding"),
              helper.make_node("Add", ["e_word", "e_type"], ["partial"], name="embeddings/add"),
              helper.make_node("Gather", ["W_pos", "pos_ids"], ["e_pos"], name="position_embeddings/embedding"),
              helper.make_node("Add", ["partial", "e_pos"], ["sum"], name="embeddings/add_1")]
    ln_in = "sum"
    if ln16:
        nodes.append(helper.make_node("Cast", ["sum"], ["sum16"], to=TensorProto.FLOAT16, name="LayerNorm/cast"))
        ln_in = "sum16"
    nodes.append(helper.make_node("LayerNormalization", [ln_in, "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12,
                                  name="embeddings.LayerNorm/layer_norm"))
    y_type = TensorProto.FLOAT16 if ln16 else TensorProto.FLOAT
    outputs = [helper.make_tensor_value_info("y", y_type, ["batch", S, H])]
    if residual:
        outputs.append(helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", S, H]))
    # the exporter names the batch dimension of every tensor; shape inference alone leaves Expand's unnamed
    known = [helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", S])]
    graph = helper.make_graph(nodes, "embeddings", inputs, outputs, inits,
                              value_info=known if token_type == "constant" else None)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return onnx.shape_inference.infer_shapes(model)


def _feeds(model: onnx.ModelProto, batch: int = 3) -> dict:
    rng = np.random.default_rng(4)
    feeds = {"input_ids": rng.integers(0, 20, (batch, S)).astype(np.int64)}
    if any(i.name == "token_type_ids" for i in model.graph.input):
        feeds["token_type_ids"] = rng.integers(0, 2, (batch, S)).astype(np.int64)
    return feeds


@pytest.mark.parametrize("ln16", [False, True], ids=["ln32", "ln16"])
@pytest.mark.parametrize("token_type", ["constant", "input"])
def test_embeddings_fused(ln16, token_type):
    before = _embeddings(ln16=ln16, token_type=token_type)
    m = ir.serde.deserialize_model(before)
    notes: list = []
    assert fuse_embed_layer_norm(m, notes) == 1
    after = ir.serde.serialize_model(m)
    onnx.checker.check_model(after, full_check=True)
    ops = op_counts(after)
    # one node; Cast(input_ids) [and Cast(token_type_ids)] to int32 [and the LayerNorm's fp16 Cast after it]
    assert ops == {"EmbedLayerNormalization": 1, "Cast": 1 + (token_type == "input") + ln16}
    eln = next(n for n in after.graph.node if n.op_type == "EmbedLayerNormalization")
    assert eln.name == "embeddings.LayerNorm/EmbedLayerNormalization" and eln.domain == "com.microsoft"
    inits = {i.name: i for i in after.graph.initializer}
    assert all(inits[i].data_type == TensorProto.FLOAT for i in eln.input[2:7] if i)  # tables, gamma, beta fp32
    if token_type == "constant":  # row 0 of W_type folded into the position table, no segment input
        assert eln.input[1] == "" and eln.input[4] == ""
        assert {"W_type", "W_pos", "type_buffer", "pos_ids"}.isdisjoint(inits)
    else:
        assert eln.input[1] and eln.input[4] == "W_type"
    assert notes == ([f"embeddings.LayerNorm/EmbedLayerNormalization: {RAISED} (the Cast to fp16 now follows it)"]
                     if ln16 else [])
    feeds = _feeds(before)
    got, want = run_cpu(after, feeds)[0], run_cpu(before, feeds)[0]
    assert got.dtype == want.dtype and got.shape == want.shape == (3, S, H)
    assert rel_l2(want, got) < (2e-3 if ln16 else 1e-5)
    # the guards _fuse applies accept it: same float Casts (the fp16 one moved after the node), same outputs
    assert precision_kept(before, after) is None
    assert runs_like(before, after, feeds) is None


@pytest.mark.parametrize("case", ["offset_positions", "short_position_table", "sum_read_elsewhere"])
def test_embeddings_left_alone(case):
    kwargs = {"offset_positions": dict(positions="offset"), "short_position_table": dict(positions="short"),
              "sum_read_elsewhere": dict(residual=True)}[case]
    m = ir.serde.deserialize_model(_embeddings(**kwargs))
    assert fuse_embed_layer_norm(m) == 0
    assert op_counts(m)["LayerNormalization"] == 1 and op_counts(m)["Gather"] == 3


# ------------------------------------------------------------------------- small BERT end to end


def _bench_onnx():
    from tools import bench_onnx

    return bench_onnx


class _WithInput(torch.nn.Module):
    """BertModel called with token_type_ids or position_ids as a third input."""

    def __init__(self, model, name: str):
        super().__init__()
        self.model, self.name = model, name

    def forward(self, input_ids, attention_mask, extra):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **{self.name: extra}).last_hidden_state


def _bert_inputs(name: str, batch: int, seed: int) -> dict:
    """Ids of the benchmark's shape (s32), the first row padded at the end; `name`'s extra input."""
    g = torch.Generator().manual_seed(seed)
    feeds = {"input_ids": torch.randint(0, 1000, (batch, 32), generator=g),
             "attention_mask": torch.ones(batch, 32, dtype=torch.long)}
    feeds["attention_mask"][0, 24:] = 0
    if name == "token_type":
        feeds["extra"] = torch.randint(0, 2, (batch, 32), generator=g)
    elif name == "position_input":
        feeds["extra"] = torch.arange(32).expand(batch, 32).contiguous()
    return feeds


@pytest.fixture(scope="module", params=["default", "ln16", "token_type"])
def bert(request, tmp_path_factory):
    """Small BERT (tools/bench_onnx.build, random biases and LayerNorm affine), converted to fp16 (LayerNorm
    fp32, or fp16 with "ln16"; "token_type": token_type_ids an input) and exported plain and fused."""
    model = _bench_onnx().build("bert", small=True, random_bias=True)[0]
    if request.param == "token_type":
        model = _WithInput(model.model, "token_type_ids").eval()
    overrides = {"layer_norm": "fp16"} if request.param == "ln16" else None
    gm = rewriter.convert(model, (), _bert_inputs(request.param, 2, 1), precision="fp16", overrides=overrides)
    folder = tmp_path_factory.mktemp(f"bert_embed_{request.param}")
    plain, fused = export_plain_and_fused(gm, folder)
    return request.param, gm, plain, fused


def test_bert_embeddings_fused(bert):
    kind, _, plain, fused = bert
    proto = onnx.load(fused.path)
    onnx.checker.check_model(proto, full_check=True)
    ops = op_counts(proto)
    assert ops.get("EmbedLayerNormalization") == 1 and fused.fusions.get("EmbedLayerNormalization") == 1
    tables = {i.name for i in proto.graph.initializer if len(i.dims) == 2 and "embeddings" in i.name}
    assert not [n.name for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in tables]
    assert "GatherElements" not in ops and ops.get("LayerNormalization", 0) == 0
    eln = next(n for n in proto.graph.node if n.op_type == "EmbedLayerNormalization")
    assert eln.name == "model.embeddings.LayerNorm/EmbedLayerNormalization"
    assert (eln.input[4] != "") == (kind == "token_type")  # a segment table only when the ids are data
    # the precision decisions: same float Casts as the plain export (for ln16 the fp16 one moved after it)
    assert fused.float_casts == plain.float_casts and cast_chains(proto) == 0
    assert fused.ops_by_dtype["float32"]["EmbedLayerNormalization"] == 1
    notes = "\n".join(fused.fusion_notes)
    assert "skipped" not in notes and "not applied" not in notes, notes
    assert "EmbedLayerNormalization 1" in notes
    assert (RAISED in notes) == (kind == "ln16"), notes


def test_bert_embeddings_fused_matches(bert):
    kind, gm, plain, fused = bert
    feeds = _bert_inputs(kind, 3, 5)
    got = ort_session(fused.path, device="cpu")(**feeds)[0]
    unfused = ort_session(plain.path, device="cpu")(**feeds)[0]
    with torch.no_grad():
        want = gm(**feeds)
    want = want[0] if isinstance(want, (tuple, list)) else want
    assert got.dtype == np.float32 and got.shape == tuple(want.shape)
    assert rel_l2(unfused, got) <= TOLERANCE
    assert rel_l2(want.float().numpy(), got) <= TOLERANCE


def test_bert_fused_export_keeps_any_padding(bert):
    """Right and left padding give PyTorch's outputs at every attended position: the export keeps the
    mask as a key padding mask (no sequence-length shortcut, which assumes right padding)."""
    kind, gm, _, fused = bert
    session = ort_session(fused.path, device="cpu")
    for side in ("right", "left"):
        feeds = _bert_inputs(kind, 2, 7)
        feeds["attention_mask"][:] = 1
        if side == "right":
            feeds["attention_mask"][0, 20:] = 0
        else:
            feeds["attention_mask"][0, :12] = 0
        got = session(**feeds)[0]
        with torch.no_grad():
            want = gm(**feeds)
        want = (want[0] if isinstance(want, (tuple, list)) else want).float().numpy()
        valid = feeds["attention_mask"].bool().numpy()
        assert rel_l2(want[valid], got[valid]) <= TOLERANCE, side


def test_bert_position_ids_from_input_not_fused(tmp_path):
    """Position ids read from an input are data, not arange(S): the embeddings stay as they are."""
    model = _WithInput(_bench_onnx().build("bert", small=True, random_bias=True)[0].model, "position_ids").eval()
    feeds = _bert_inputs("position_input", 2, 1)
    gm = rewriter.convert(model, (), feeds, precision="fp16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = export_onnx(gm, tmp_path / "plain.onnx")
        report = export_onnx(gm, tmp_path / "fused.onnx", optimize=True)
    # the embeddings' LayerNormalization over the three Gathers, as the fusion step would see it
    m = ir.serde.deserialize_model(onnx.load(plain.path))
    assert op_counts(m)["LayerNormalization"] == 5 and fuse_embed_layer_norm(m) == 0
    ops = op_counts(onnx.load(report.path))
    assert "EmbedLayerNormalization" not in report.fusions and "EmbedLayerNormalization" not in ops
    assert ops["Gather"] == 3  # (its position Gather is [B, S, H]: the onnxscript step makes it a SkipLayerNorm)
    assert report.fusions.get("Attention") == 2  # the other fusions still apply
    got = ort_session(report.path, device="cpu")(**feeds)[0]
    with torch.no_grad():
        want = gm(**feeds)
    assert rel_l2(want.float().numpy(), got) <= TOLERANCE


def test_gpt2_embeddings_not_fused(tmp_path):
    """GPT-2's first LayerNorm reads wte + wpe, but the sum is also the residual: left as it is."""
    bench = _bench_onnx()
    model, _, feeds, _, _ = bench.build("gpt2", small=True, random_bias=True)
    gm = rewriter.convert(model, (), dict(feeds), precision="fp16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_onnx(gm, tmp_path / "gpt2.onnx", optimize=True)
    assert "EmbedLayerNormalization" not in report.fusions
    assert report.fusions.get("Attention") == 2 and report.fusions.get("SkipLayerNormalization") == 4
    assert op_counts(onnx.load(report.path))["Gather"] == 2
