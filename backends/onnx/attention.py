"""Packed-QKV attention: MatMul + Split + MultiHeadAttention as one com.microsoft Attention.

Before: x -> MatMul(W_qkv) -> Add(b) -> Split(3) -> MultiHeadAttention(q, k, v, mask)
After:  x -> Attention(x, W_qkv, b, mask)
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from rewriter.backends.onnx.common import const_ints, new_initializer, take_over

__all__ = ["pack_attention"]


def _packed_qkv(mha):
    """(x, w, bias, nodes) when the q, k, v of MultiHeadAttention `mha` are the three equal parts of one
    Split of MatMul(x, W) [+ bias] and nothing else reads them (`nodes`: that Split, Add, MatMul); else None."""
    if mha.domain != "com.microsoft" or len(mha.inputs) < 3 or any(
            v is not None for i, v in enumerate(mha.inputs) if i in (3, 4) or i >= 6):
        return None  # a packed bias, key padding mask, past or cache already set: not the plain form
    q, k, v = mha.inputs[:3]
    split = q.producer() if q is not None else None
    if split is None or split.op_type != "Split" or list(split.outputs) != [q, k, v] \
            or any(len(o.uses()) != 1 for o in split.outputs):
        return None
    y = split.inputs[0]
    axis = split.attributes["axis"].as_int() if "axis" in split.attributes else 0
    if y is None or y.shape is None or y.shape.rank() != 3 or axis not in (2, -1) \
            or not isinstance(y.shape[2], int) or y.shape[2] % 3 or len(y.uses()) != 1:
        return None
    width = y.shape[2]
    sizes = const_ints(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
    if sizes is not None and sizes != [width // 3] * 3:
        return None
    nodes, bias, producer = [split], None, y.producer()
    if producer is not None and producer.op_type == "Add":
        a, b = producer.inputs
        a, b = (a, b) if b is not None and b.const_value is not None else (b, a)
        if a is None or b is None or b.const_value is None or b.shape is None or list(b.shape.dims) != [width] \
                or len(a.uses()) != 1:
            return None
        nodes.append(producer)
        bias, producer = b, a.producer()
    if producer is None or producer.op_type != "MatMul":
        return None
    nodes.append(producer)
    x, w = producer.inputs
    if x is None or w is None or w.const_value is None or w.shape is None or list(w.shape.dims)[1:] != [width] \
            or x.shape is None or x.shape.rank() != 3 or w.dtype != x.dtype \
            or x.dtype not in (ir.DataType.FLOAT16, ir.DataType.FLOAT) or (bias is not None and bias.dtype != x.dtype):
        return None
    return x, w, bias, nodes


def pack_attention(model) -> int:
    """MatMul(x, W_qkv) [+ b] -> Split(3) -> MultiHeadAttention(q, k, v, mask) as one Attention(x, W_qkv, b,
    mask): ONNX Runtime's packed-QKV attention (the form BERT fuses to), which adds the bias while it
    lays out q, k, v for the attention kernel instead of an Add and a Split over the whole projection.
    Same dtype everywhere (the inputs', checked); a zero bias of that dtype where the model has none.
    Returns how many were packed."""
    graph = model.graph
    count = 0
    for mha in [n for n in graph if n.op_type == "MultiHeadAttention"]:
        found = _packed_qkv(mha)
        if found is None:
            continue
        x, w, bias, nodes = found
        if bias is None:
            zeros = np.zeros(w.shape[1], np.float16 if x.dtype == ir.DataType.FLOAT16 else np.float32)
            bias = new_initializer(graph, f"{mha.outputs[0].name}__qkv_bias", zeros)
        mask = mha.inputs[5] if len(mha.inputs) > 5 else None
        attrs = {"num_heads": mha.attributes["num_heads"].as_int()}
        if "scale" in mha.attributes:
            attrs["scale"] = mha.attributes["scale"].as_float()
        if "mask_filter_value" in mha.attributes:
            attrs["mask_filter_value"] = mha.attributes["mask_filter_value"].as_float()
        attention = ir.node("Attention", [x, w, bias, None, None, mask], attrs, domain="com.microsoft",
                            name=mha.name.replace("MultiHeadAttention", "Attention"))
        out, new = mha.outputs[0], attention.outputs[0]
        new.dtype, new.shape = out.dtype, out.shape
        graph.insert_before(mha, attention)
        take_over(out, new)
        for node in [mha] + nodes:  # readers first: Split, Add, MatMul
            if not any(o.uses() or o.is_graph_output() for o in node.outputs):
                graph.remove(node, safe=True)
        count += 1
    return count

