"""Rewrites into the form ONNX Runtime's fusions read, changing no float value.

Before: Reshape(x, [-1, K]) -> Gemm(W, C) -> Reshape(B, S, N)        Shape(q) (q an intermediate)
After:  MatMul(x, W) -> Add(C)                                       Shape(input_ids, 0, 1) ...
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from rewriter.backends.onnx.common import (const_ints, dim_key, new_initializer, remove_unread, shape_values,
                                           take_over)

__all__ = ["unflatten_gemms", "shapes_from_inputs"]


def _flattened_gemm(gemm):
    """(x, w, bias, out_reshape, shape) when `gemm` is Reshape(x, [-1, K]) -> Gemm(., W[, C]) ->
    Reshape(., shape[:-1] + [N]) with plain attributes (alpha=beta=1, no transposes, W 2-D, C 1-D):
    MatMul(Reshape(x, shape), W) + C then computes the same values, `shape` (leading dims and K) None when
    x already has it. Else None."""
    attrs = {k: v.value for k, v in gemm.attributes.items()}
    if gemm.domain not in ("", "ai.onnx") or attrs.get("transA", 0) or attrs.get("transB", 0) \
            or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    flat, w = gemm.inputs[0], gemm.inputs[1]
    bias = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    reshape = flat.producer() if flat is not None else None
    if reshape is None or reshape.op_type != "Reshape" or len(flat.uses()) != 1 or w is None \
            or w.shape is None or w.shape.rank() != 2 or not isinstance(w.shape[0], int):
        return None
    if bias is not None and (bias.shape is None or bias.shape.rank() > 1):
        return None  # a 2-D bias may differ per row: it does not broadcast like a MatMul output
    if const_ints(reshape.inputs[1]) != [-1, w.shape[0]]:
        return None
    uses = list(gemm.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Reshape" or uses[0].idx != 0:
        return None
    out_reshape = uses[0].node
    # a constant target, or one the exporter computes from Shape() with a symbolic sequence length
    # ([batch, s53, N]: names of symbolic dims in place of ints)
    target = const_ints(out_reshape.inputs[1]) or shape_values(out_reshape.inputs[1])
    # the output Reshape splits the flattened rows again: a -1 (or ints) before the last dim, which is N
    if target is None or len(target) < 3 or target[-1] != w.shape[1] or 0 in target \
            or target.count(-1) > 1 or -1 in target[-1:]:
        return None
    x = reshape.inputs[0]
    shape = target[:-1] + [w.shape[0]]
    dims = [dim_key(d) for d in x.shape.dims] if x is not None and x.shape is not None else None
    if dims is not None and len(dims) == len(shape) and all(t == -1 or t == d for t, d in zip(shape, dims)) \
            and shape[-1] == dims[-1]:
        return x, w, bias, out_reshape, None  # x is already (rows..., K): no Reshape needed
    shape = _as_reshape_target(shape, dims)
    return None if shape is None else (x, w, bias, out_reshape, shape)


def _as_reshape_target(shape: list, dims: list | None) -> list[int] | None:
    """`shape` (ints, -1 and names of symbolic dims) as a constant Reshape target of x (dims `dims`): a
    symbolic dim equal to x's dim at the same position read as 0 (copy it; the Reshape is written with
    allowzero=0). None when a symbolic dim is not x's there: a -1 in its place would also accept inputs
    on which the exporter's Reshape fails, with another shape."""
    out = []
    for i, t in enumerate(shape):
        if isinstance(t, int):
            out.append(t)
        elif dims is not None and i < len(dims) and dims[i] == t:
            out.append(0)
        else:
            return None
    return out



def unflatten_gemms(model) -> int:
    """Rewrite Reshape(x, [-1, K]) -> Gemm(W, C) -> Reshape(rows..., N) as MatMul(x', W) -> Add(C), with x'
    x viewed as (rows..., K).

    torch's addmm on a flattened activation (GPT-2's Conv1D) exports as the Gemm form; ONNX Runtime's
    fusions read the MatMul form: the attention fusions match up to the Reshape before the output
    projection and then feed it a (B, S, D) tensor, which a Gemm (rank 2 only) refuses, and the bias
    fusions (SkipLayerNormalization, FastGelu, attention bias) look for MatMul + Add. Same dtype, same
    kernel (a MatMul of a 3-D input by a 2-D weight is one GEMM). Returns how many were rewritten.
    """
    graph = model.graph
    count = 0
    for gemm in [n for n in graph if n.op_type == "Gemm"]:
        found = _flattened_gemm(gemm)
        if found is None:
            continue
        x, w, bias, out_reshape, shape = found
        result, flat_reshape = out_reshape.outputs[0], gemm.inputs[0].producer()
        new_nodes = []
        if shape is not None:
            const = new_initializer(graph, f"{result.name}__rows_k", np.array(shape, np.int64))
            view = ir.node("Reshape", [x, const], name=f"{flat_reshape.name}/Reshape")
            view.outputs[0].dtype = x.dtype
            new_nodes.append(view)
            x = view.outputs[0]
            x.name = f"{result.name}__in"
        matmul = ir.node("MatMul", [x, w], name=f"{gemm.name}/MatMul")
        new_nodes.append(matmul)
        value = matmul.outputs[0]
        if bias is not None:
            add = ir.node("Add", [value, bias], name=f"{gemm.name}/Add")
            new_nodes.append(add)
            value.name, value.dtype, value.shape = f"{result.name}__matmul", result.dtype, result.shape
            value = add.outputs[0]
        value.dtype, value.shape = result.dtype, result.shape
        graph.insert_after(out_reshape, new_nodes)
        take_over(result, value)
        remove_unread(graph, [out_reshape])  # with the Gemm, the flattening and the target's Shape() ops
        count += 1
    return count


def _shape_pieces(value, start, end, sources: dict):
    """The dims `Shape(value, start, end)` returns, as ints or (graph input, axis) of the same named
    dimension; None when a dim is neither (unknown, or a symbol no graph input has)."""
    if value is None or value.shape is None:
        return None
    dims = list(value.shape.dims)
    rank = len(dims)
    lo = max(0, min(rank, start + rank if start < 0 else start))
    hi = rank if end is None else max(0, min(rank, end + rank if end < 0 else end))
    pieces = []
    for d in dims[lo:hi]:
        if isinstance(d, int):
            pieces.append(d)
        elif getattr(d, "value", None) in sources:
            pieces.append(sources[d.value])
        else:
            return None
    return pieces


def shapes_from_inputs(model) -> int:
    """Read each Shape of an intermediate tensor from the graph inputs instead, when every dimension it
    returns is a number or a named dimension of an input ('batch').

    The exporter builds masks from shapes, e.g. the causal mask of SDPA(is_causal=True) from Shape(q) and
    Shape(k): those extra readers of q and k keep the fusions from replacing the attention subgraph
    ("matched nodes have other uses"). Integers only: no float value changes. Returns how many Shapes
    were rewritten.
    """
    graph = model.graph
    sources: dict = {}
    for value in graph.inputs:
        for axis, d in enumerate(value.shape.dims if value.shape is not None else ()):
            if getattr(d, "value", None):
                sources.setdefault(d.value, (value, axis))
    count = 0
    for node in [n for n in graph if n.op_type == "Shape" and n.domain in ("", "ai.onnx")]:
        value = node.inputs[0]
        if value is None or value.producer() is None:
            continue  # a graph input or an initializer already
        start = node.attributes["start"].as_int() if "start" in node.attributes else 0
        end = node.attributes["end"].as_int() if "end" in node.attributes else None
        pieces = _shape_pieces(value, start, end, sources)
        if not pieces:
            continue
        parts, new_nodes = [], []
        for k, piece in enumerate(pieces):
            if isinstance(piece, int):
                const = new_initializer(graph, f"{node.outputs[0].name}__dim{k}", np.array([piece], np.int64))
                parts.append(const)
            else:
                inp, axis = piece
                shape = ir.node("Shape", [inp], {"start": axis, "end": axis + 1}, name=f"{node.name}/dim{k}")
                new_nodes.append(shape)
                parts.append(shape.outputs[0])
        if len(parts) == 1 and new_nodes:
            result = parts[0]
        else:
            concat = ir.node("Concat", parts, {"axis": 0}, name=f"{node.name}/from_inputs")
            new_nodes.append(concat)
            result = concat.outputs[0]
        for v in (n.outputs[0] for n in new_nodes):
            v.dtype = ir.DataType.INT64
        result.shape = node.outputs[0].shape
        graph.insert_before(node, new_nodes)
        take_over(node.outputs[0], result)
        graph.remove(node, safe=True)
        count += 1
    return count

