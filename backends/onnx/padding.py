"""Right-padding attention masks for ONNX Runtime: `export_onnx(..., assume_right_padding=True)`.

Before: attention_mask[B, S] -> Cast(bool) -> Unsqueeze(1, 2) -> Expand -> Where(0, -inf) -> Attention(bias)
After:  attention_mask[B, S] -> Cast(int32) -> ReduceSum(axis 1) -> Attention(mask_index [B])

The exact export keeps a key padding mask as an additive bias [B, 1, S, S], which ONNX Runtime's
Attention reads in every head. A 1-D mask_index (the valid length of each row) lets it run its fused
variable-length kernels instead; this is what the onnxruntime.transformers optimizer builds for BERT.
It means "keys at and after position length[b] are masked", which equals the mask only when every
row is ones followed by zeros (right padding, what BERT tokenizers produce by default). On a left-padded
row it attends to the padding and misses real tokens, so it is never done silently: only with the
option, only on the form `passes/canonicalize/padding_mask.py` produces (a key padding mask of one 2-D graph
input), and only when the example inputs are right-padded. The report says it was assumed.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from rewriter.backends.onnx.common import constant, new_initializer, remove_unread

__all__ = ["use_mask_index", "is_right_padded"]


def _padding_input(bias):
    """The 2-D integer graph input whose key padding mask `bias` is (Where(Expand(Unsqueeze(Cast(x,
    bool), [1, 2])), 0, -inf)), else None."""
    where = bias.producer() if bias is not None else None
    if where is None or where.op_type != "Where" or len(where.inputs) != 3:
        return None
    zero, neg = constant(where.inputs[1]), constant(where.inputs[2])
    if zero is None or neg is None or zero.size != 1 or neg.size != 1 or float(zero.reshape(-1)[0]) != 0.0 \
            or not float(neg.reshape(-1)[0]) <= -1e4:
        return None
    node = where.inputs[0].producer()
    if node is not None and node.op_type == "Expand":
        node = node.inputs[0].producer()
    if node is None or node.op_type != "Unsqueeze":
        return None
    axes = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if axes is None or sorted(int(a) for a in axes.reshape(-1)) != [1, 2]:
        return None
    cast = node.inputs[0].producer()
    if cast is None or cast.op_type != "Cast" or cast.attributes["to"].as_int() != ir.DataType.BOOL:
        return None
    source = cast.inputs[0]
    if source is None or not source.is_graph_input() or source.shape is None or source.shape.rank() != 2 \
            or source.dtype not in (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL):
        return None
    return source


def _lengths(graph, source, before):
    """ReduceSum(Cast(source, int32), axis 1): the valid length of each row, int32 [B]."""
    cast = ir.node("Cast", [source], {"to": ir.DataType.INT32}, name=f"{source.name}/mask_index/Cast")
    axes = new_initializer(graph, f"{source.name}__mask_index_axes", np.array([1], np.int64))
    total = ir.node("ReduceSum", [cast.outputs[0], axes], {"keepdims": 0}, name=f"{source.name}/mask_index")
    cast.outputs[0].dtype = ir.DataType.INT32
    out = total.outputs[0]
    out.name, out.dtype = f"{source.name}__mask_index", ir.DataType.INT32
    graph.insert_before(before, [cast, total])
    return out


def use_mask_index(model) -> list[str]:
    """Attention nodes whose bias is a key padding mask read a 1-D mask_index instead; the names of the
    padding inputs done (empty when nothing matched)."""
    graph = model.graph
    done: dict = {}
    for attention in [n for n in graph if n.op_type == "Attention" and n.domain == "com.microsoft"]:
        inputs = list(attention.inputs)
        if len(inputs) < 6 or inputs[5] is None or inputs[3] is not None or (len(inputs) > 4 and inputs[4] is not None):
            continue
        source = _padding_input(inputs[5])
        if source is None:
            continue
        if source.name not in done:
            first = next(n for n in graph if n is attention or any(v is inputs[5] for v in n.outputs))
            done[source.name] = _lengths(graph, source, first)
        bias = inputs[5]
        attention.replace_input_with(3, done[source.name])
        attention.replace_input_with(5, None)
        remove_unread(graph, [bias.producer()])
    return sorted(done)


def is_right_padded(mask) -> bool:
    """True when every row of a 2-D mask is ones (non-zero) followed by zeros."""
    mask = np.asarray(mask) != 0
    if mask.ndim != 2:
        return False
    lengths = mask.sum(axis=1)
    positions = np.arange(mask.shape[1])[None, :]
    return bool(np.array_equal(mask, positions < lengths[:, None]))
