"""BERT's embeddings as one com.microsoft EmbedLayerNormalization (`export_onnx(optimize=True)`).

Before: Gather(W_word, ids) + Gather(W_pos, arange(S)) [+ Gather(W_type, T)] -> LayerNormalization
After:  EmbedLayerNormalization(ids, T, W_word, W_pos, W_type, gamma, beta)
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from rewriter.backends.onnx.common import (COPYING_OPS, SEARCH_DEPTH, const_ints, constant, dim_key, is_int,
                                           new_initializer, remove_unread, same_dims, shape_values, take_over)

__all__ = ["fuse_embed_layer_norm"]


def _is_arange(value, length) -> bool:
    """`value` is proven to hold 0, 1, ..., length - 1 as [length] or [1, length]: position ids. `length`
    is an int, or the name of a symbolic dimension (see `_is_symbolic_arange`)."""
    if not isinstance(length, int):
        return _is_symbolic_arange(value, length)
    data = constant(value)
    return (data is not None and data.shape in ((length,), (1, length)) and np.issubdtype(data.dtype, np.integer)
            and np.array_equal(data.reshape(-1), np.arange(length)))


def _is_symbolic_arange(value, length: str) -> bool:
    """`value` [length] or [1, length] holds 0, 1, ..., length - 1 for every value of the symbolic `length`:
    the first `length` elements of a constant arange (Slice(arange(N)[None], 0, Shape(mask)[1]), BERT's
    position_ids buffer) or Range(0, length, 1) (GPT-2's arange), possibly viewed as [1, length]. The
    end and the limit must be `length` itself (shape_values), not only have an output annotated so."""
    dims = [dim_key(d) for d in value.shape.dims] if value is not None and value.shape is not None else None
    if dims not in ([length], [1, length]):
        return False
    node = value.producer()
    while node is not None and node.domain in ("", "ai.onnx") and node.op_type in ("Unsqueeze", "Reshape",
                                                                                    "Identity", "Squeeze"):
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Range":
        return _scalar_int(node.inputs[0]) == 0 and _scalar_int(node.inputs[2]) == 1 \
            and shape_values(node.inputs[1]) == [length]
    if node.op_type != "Slice" or len(node.inputs) < 3:
        return False
    data = constant(node.inputs[0])
    inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
    axes = const_ints(inputs[3]) if inputs[3] is not None else [0]
    steps = const_ints(inputs[4]) if inputs[4] is not None else [1]
    if data is None or data.ndim not in (1, 2) or (data.ndim == 2 and data.shape[0] != 1) \
            or not np.issubdtype(data.dtype, np.integer) or axes not in ([data.ndim - 1], [-1]) or steps != [1]:
        return False
    return const_ints(inputs[1]) == [0] and shape_values(inputs[2]) == [length] \
        and np.array_equal(data.reshape(-1), np.arange(data.size))


def _scalar_int(value) -> int | None:
    """The int a constant scalar or one-element int tensor holds, else None."""
    data = constant(value)
    if data is None or data.size != 1 or not np.issubdtype(data.dtype, np.integer):
        return None
    return int(data.reshape(-1)[0])


def _single_value(value, depth: int = 0) -> int | None:
    """c when every element of the int tensor `value` is proven to be c, else None. BERT called without
    token_type_ids reads them from a zero buffer: Expand(GatherElements(zeros, arange), Shape(batch))."""
    data = constant(value)
    if data is not None:
        flat = data.reshape(-1)
        if flat.size and np.issubdtype(flat.dtype, np.integer) and (flat == flat[0]).all():
            return int(flat[0])
        return None
    node = value.producer() if value is not None else None
    if node is None or depth > SEARCH_DEPTH or node.domain not in ("", "ai.onnx") or not node.inputs:
        return None
    if node.op_type in COPYING_OPS or (node.op_type == "Cast" and is_int(node.outputs[0]) and is_int(node.inputs[0])):
        return _single_value(node.inputs[0], depth + 1)
    return None




def _sum_terms(total) -> list:
    """The terms of the Add tree computing `total`; a partial sum read elsewhere too is a term itself."""
    terms, pending = [], [total]
    while pending:
        value = pending.pop()
        node = value.producer()
        if node is not None and node.op_type == "Add" and node.domain in ("", "ai.onnx") \
                and (value is total or len(value.uses()) == 1) and not value.is_graph_output():
            pending.extend(reversed(node.inputs))
        else:
            terms.append(value)
    return terms


@dataclasses.dataclass
class _Embeddings:
    """What `_embeddings` found: the LayerNorm (and the Cast before it) over word + position [+ type]."""

    ln: Any
    cast: Any  # Cast(sum) to the LayerNorm's 16-bit dtype, or None
    word: tuple  # (ids, table)
    position: Any  # table, rows 0..S-1 read in order
    segment: tuple | None  # (ids, table): token-type ids read from data
    constant_type: tuple | None  # (table, c): token-type ids proven all c


def _embedding_term(term, batch, length, hidden: int):
    """(kind, ids, table) for one term of the embedding sum: a Gather of rows of a constant fp32 [rows,
    hidden] table read only by the sum. kind: "position" (ids arange(length)), "constant" (ids all one
    value; ids is then that int), "lookup" (ids data of shape [batch, length]); None otherwise. `length`:
    an int, or the name of the symbolic sequence dimension (then the table's rows bound the length the
    graph accepts, as they bound the unfused graph's: ORT refuses a longer input)."""
    gather = term.producer()
    if gather is None or gather.op_type != "Gather" or gather.domain not in ("", "ai.onnx") \
            or len(term.uses()) != 1 or term.is_graph_output() or gather.attributes.get_int("axis", 0) != 0:
        return None
    table, ids = gather.inputs
    if table is None or table.const_value is None or table.dtype != ir.DataType.FLOAT or table.shape is None \
            or table.shape.rank() != 2 or table.shape[1] != hidden or not is_int(ids):
        return None
    rows = table.shape[0]
    if _is_arange(ids, length):
        return ("position", ids, table) if not isinstance(length, int) or rows >= length else None
    c = _single_value(ids)
    if c is not None:
        return ("constant", c, table) if 0 <= c < rows else None
    if ids.shape is not None and ids.shape.rank() == 2 and same_dims(ids.shape[0], batch) \
            and dim_key(ids.shape[1]) == length:
        return "lookup", ids, table
    return None


def _embeddings(ln) -> _Embeddings | None:
    """The BERT embeddings under LayerNormalization `ln`, else None: LN(Gather(W_word, ids) + Gather(W_pos,
    arange(S)) [+ Gather(W_type, T)]), optionally with one Cast of the sum to fp16/bf16 before the LN
    (LayerNorm kept 16-bit), the tables constant fp32, S static or symbolic (named), T data [B, S] or
    proven one value,
    the sum and its terms read by nothing else, axis -1, statistics in fp32 (stash_type 1)."""
    if ln.domain not in ("", "ai.onnx") or len(ln.inputs) < 2 or ln.inputs[1] is None \
            or ln.attributes.get_int("axis", -1) not in (-1, 2) or ln.attributes.get_int("stash_type", 1) != 1 \
            or any(o.uses() or o.is_graph_output() for o in ln.outputs[1:]):
        return None
    x, gamma = ln.inputs[0], ln.inputs[1]
    beta = ln.inputs[2] if len(ln.inputs) > 2 else None
    if x is None or gamma.const_value is None or (beta is not None and beta.const_value is None):
        return None
    cast, total = None, x
    producer = x.producer()
    if producer is not None and producer.op_type == "Cast" and producer.domain in ("", "ai.onnx"):
        if len(x.uses()) != 1 or x.is_graph_output() or x.dtype not in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            return None
        cast, total = producer, producer.inputs[0]
    if total is None or total.dtype != ir.DataType.FLOAT or len(total.uses()) != 1 or total.is_graph_output():
        return None
    shape = total.shape
    if shape is None or shape.rank() != 3 or dim_key(shape[1]) is None or not isinstance(shape[2], int):
        return None
    batch, length, hidden = shape[0], dim_key(shape[1]), shape[2]
    if any(v is not None and (v.shape is None or list(v.shape.dims) != [hidden]) for v in (gamma, beta)):
        return None
    terms = _sum_terms(total)
    if not 2 <= len(terms) <= 3:
        return None
    found = collections.defaultdict(list)
    for term in terms:
        kind = _embedding_term(term, batch, length, hidden)
        if kind is None:
            return None
        found[kind[0]].append(kind[1:])
    lookups, positions, constants = found["lookup"], found["position"], found["constant"]
    if len(positions) != 1 or not lookups:  # then (2 or 3 terms) one or two lookups, or one and a constant
        return None
    lookups.sort(key=lambda pair: -pair[1].shape[0])  # two lookups: the larger table is the word table
    return _Embeddings(ln=ln, cast=cast, word=lookups[0], position=positions[0][1],
                       segment=lookups[1] if len(lookups) > 1 else None,
                       constant_type=(constants[0][1], constants[0][0]) if constants else None)



def _as_int32(ids, name: str, nodes: list):
    """Cast of int64 ids to int32, which EmbedLayerNormalization reads (a vocabulary index fits)."""
    if ids.dtype == ir.DataType.INT32:
        return ids
    cast = ir.node("Cast", [ids], {"to": ir.DataType.INT32}, name=name)
    out = cast.outputs[0]
    out.name, out.dtype, out.shape = f"{ids.name}__int32", ir.DataType.INT32, ids.shape
    nodes.append(cast)
    return out




def _replace_embeddings(graph, found: _Embeddings) -> str:
    """Put one com.microsoft EmbedLayerNormalization in place of what `found` describes; returns its name.

    A token type proven constant c is folded into the position table (W_pos + W_type[c], fp32, the sum the
    graph computed per token): the node then reads no segment input. The node computes in fp32, the tables'
    dtype: a LayerNorm kept 16-bit has its gamma/beta read as fp32 copies (exact) and its Cast moved after
    the node."""
    ln, cast = found.ln, found.cast
    prefix = ln.name.rsplit("/", 1)[0] if ln.name and "/" in ln.name else (ln.name or "embeddings")
    name = f"{prefix}/EmbedLayerNormalization"
    nodes: list = []
    ids = _as_int32(found.word[0], f"{name}/input_ids_int32", nodes)
    segment_ids = segment_table = None
    if found.segment is not None:
        segment_ids = _as_int32(found.segment[0], f"{name}/segment_ids_int32", nodes)
        segment_table = found.segment[1]
    position = found.position
    if found.constant_type is not None:
        table, c = found.constant_type
        folded = position.const_value.numpy() + table.const_value.numpy()[c]
        position = new_initializer(graph, f"{position.name}__plus_{table.name}_row{c}", folded)
    gamma, beta = ln.inputs[1], ln.inputs[2] if len(ln.inputs) > 2 else None
    if beta is None:
        beta = new_initializer(graph, f"{gamma.name}__zero_bias", np.zeros(gamma.shape[0], np.float32))
    gamma, beta = [v if v.dtype == ir.DataType.FLOAT else
                   new_initializer(graph, f"{v.name}__fp32", v.const_value.numpy().astype(np.float32))
                   for v in (gamma, beta)]
    eps = ln.attributes["epsilon"].as_float() if "epsilon" in ln.attributes else 1e-5
    out_name = ln.outputs[0].name
    outputs = [ir.Value(name=f"{out_name}__fp32" if cast is not None else f"{out_name}__embed"),
               ir.Value(name=f"{out_name}__mask_index")]  # ORT requires the mask_index slot; unread
    node = ir.node("EmbedLayerNormalization",
                   [ids, segment_ids, found.word[1], position, segment_table, gamma, beta],
                   {"epsilon": eps}, domain="com.microsoft", outputs=outputs, name=name)
    total = found.cast.inputs[0] if cast is not None else ln.inputs[0]
    outputs[0].dtype, outputs[0].shape = ir.DataType.FLOAT, total.shape
    outputs[1].dtype, outputs[1].shape = ir.DataType.INT32, ir.Shape([total.shape[0]])
    nodes.append(node)
    result = outputs[0]
    if cast is not None:
        after = ir.node("Cast", [result], {"to": cast.attributes["to"].as_int()}, name=f"{prefix}/Cast")
        after.outputs[0].dtype, after.outputs[0].shape = ln.outputs[0].dtype, ln.outputs[0].shape
        nodes.append(after)
        result = after.outputs[0]
    graph.insert_before(ln, nodes)
    take_over(ln.outputs[0], result)
    remove_unread(graph, [ln])
    graph.opset_imports.setdefault("com.microsoft", 1)
    return name


def fuse_embed_layer_norm(model, notes: list[str] | None = None) -> int:
    """BERT's embeddings (three Gathers, two Adds, LayerNormalization, and the ops computing constant
    token-type ids: ~9 small kernels on [B, S, H] fp32 tensors) as one com.microsoft EmbedLayerNormalization,
    the node ONNX Runtime's own BERT graphs use. See `_embeddings` for what must hold, `_replace_embeddings`
    for what replaces it.

    The node has one dtype for tables, gamma/beta and output (ORT has no mixed-dtype form), and the tables
    are fp32 by the precision rules; ORT's CPU EP, which checks every fusion, implements it for float.
    Where the LayerNorm was kept 16-bit, it now computes in fp32 (a sum that is not rounded to 16 bits
    first, output rounded once by the Cast after the node): one op more precise than decided, which each
    fused node adds to `notes`. GPT-2's first LayerNorm also reads wte + wpe, but the sum is its residual
    too: not fused (that would need the node's embedding_sum output). Returns how many were fused."""
    count = 0
    for ln in [n for n in model.graph if n.op_type == "LayerNormalization"]:
        found = _embeddings(ln)
        if found is None:
            continue
        name = _replace_embeddings(model.graph, found)
        if found.cast is not None and notes is not None:
            dtype = "bf16" if found.cast.outputs[0].dtype == ir.DataType.BFLOAT16 else "fp16"
            notes.append(f"{name}: LayerNorm computes in fp32, more precise than the {dtype} decision; ORT's "
                         f"EmbedLayerNormalization has no mixed-dtype form (the Cast to {dtype} now follows it)")
        count += 1
    return count

