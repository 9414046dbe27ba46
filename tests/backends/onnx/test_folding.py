"""CAST_RULES (backends/onnx/folding.py): each rule on a small graph, what it removes and what it keeps."""
from __future__ import annotations

import onnx_ir as ir
from onnx import TensorProto as T
from onnx import helper

from rewriter.backends.onnx.folding import CAST_RULES, fold_casts


def _model(nodes, inputs, outputs):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, [2, 4]) for n, t in inputs],
                              [helper.make_tensor_value_info(n, t, None) for n, t in outputs])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def _casts(model) -> list[tuple[str, int]]:
    return [(n.inputs[0].name, n.attributes["to"].as_int()) for n in model.graph if n.op_type == "Cast"]


def test_rules_have_names_and_reasons():
    assert [r.name for r in CAST_RULES] == ["same dtype", "widening chain", "duplicate", "shape reader",
                                           "rounding before quantize", "rounding after FP8 GEMM"]
    assert all(r.reason for r in CAST_RULES) and [r.name for r in CAST_RULES if r.fp8_only] == [
        "rounding before quantize", "rounding after FP8 GEMM"]


def test_exact_rules():
    model = _model([
        helper.make_node("Cast", ["x"], ["same"], to=T.FLOAT16),             # x is fp16 already
        helper.make_node("Cast", ["same"], ["wide"], to=T.FLOAT),            # fp16 -> fp32 holds every value
        helper.make_node("Cast", ["wide"], ["back"], to=T.BFLOAT16),         # -> Cast(x, bf16)
        helper.make_node("Cast", ["x"], ["dup1"], to=T.FLOAT),
        helper.make_node("Cast", ["x"], ["dup2"], to=T.FLOAT),               # duplicate of dup1
        helper.make_node("Add", ["dup1", "dup2"], ["y"]),
        helper.make_node("Cast", ["y"], ["r16"], to=T.FLOAT16),
        helper.make_node("Shape", ["r16"], ["shape"]),                       # reads the shape only
    ], [("x", T.FLOAT16)], [("back", T.BFLOAT16), ("y", T.FLOAT), ("shape", T.INT64)])
    removed = fold_casts(model)
    assert removed == {"same dtype": 1, "widening chain": 1, "duplicate": 1, "shape reader": 1}
    assert sorted(_casts(model)) == [("x", T.FLOAT), ("x", T.BFLOAT16)]
    assert fold_casts(model) == {}  # nothing left to fold


def test_rounding_chain_kept_unless_it_feeds_a_quantizer_in_fp8_graphs():
    def chain():
        zero = helper.make_tensor("zp", T.FLOAT8E4M3FN, [], [0.0])
        scale = helper.make_tensor("s", T.FLOAT, [], [0.5])
        return _model([
            helper.make_node("Constant", [], ["zp"], value=zero), helper.make_node("Constant", [], ["s"], value=scale),
            helper.make_node("Cast", ["x"], ["r"], to=T.BFLOAT16),
            helper.make_node("Cast", ["r"], ["f"], to=T.FLOAT),                 # a rounding to bf16: not exact
            helper.make_node("QuantizeLinear", ["f", "s", "zp"], ["q"], saturate=1),
        ], [("x", T.FLOAT)], [("q", T.FLOAT8E4M3FN)])

    plain = chain()
    assert fold_casts(plain) == {} and len(_casts(plain)) == 2
    fp8 = chain()
    assert fold_casts(fp8, fp8=True) == {"rounding before quantize": 2}
    assert _casts(fp8) == [] and next(n for n in fp8.graph if n.op_type == "QuantizeLinear").inputs[0].name == "x"
