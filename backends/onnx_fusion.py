"""ONNX Runtime fusions for `export_onnx(optimize=True)`, kept only where they keep the precision decisions.

`_fuse` runs two steps on the cleaned-up export, each on a copy; a step's result replaces the model only
when `_precision_kept` (same float Casts, same dtype for every tensor both graphs name, no fused node
reading activations of mixed float dtypes) and `_runs_like` (loads and runs on the CPU EP, outputs within
`_FUSION_TOLERANCE` of the unfused graph) accept it. The report says what each step fused, or why not.

    onnxscript step:   Reshape -> Gemm -> Reshape as MatMul + Add (`_unflatten_gemms`), Shape(intermediate)
                       as Shape(graph input) (`_shapes_from_inputs`), onnxscript's `optimize_for_ort`, then
                       MatMul + Split + MultiHeadAttention as one packed-QKV Attention (`_pack_attention`)
                       and the BERT embeddings as one EmbedLayerNormalization (`_fuse_embed_layer_norm`)
    optimizer step:    onnxruntime.transformers' optimize_model (BiasGelu, FastGelu, ...)

The rewrites before `optimize_for_ort` change no float value: they bring the exporter's graph into the form
ONNX Runtime's own exports have, which is the form the fusions read. Fused nodes are named
"<module path>/<OpType>" after the node whose output they compute, like the rest of the export.

This module is the fusion half of backends/onnx_backend.py; `export_onnx` calls `_fuse`.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rewriter.backends.onnx_backend import ExportReport


def _float_value_dtypes(proto) -> dict[str, int]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception:
        inferred = proto
    types = {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    return types


_ONNX_FLOATS = {1: "float32", 10: "float16", 16: "bfloat16"}


def _precision_kept(before, after) -> str | None:
    """None when `after` (fused) keeps the precision of `before`; else the reason it does not."""
    tb, ta = _float_value_dtypes(before), _float_value_dtypes(after)

    def float_casts(proto, types):
        out = collections.Counter()
        for n in proto.graph.node:
            if n.op_type == "Cast":
                to = next(a.i for a in n.attribute if a.name == "to")
                src = types.get(n.input[0])
                if src in _ONNX_FLOATS and to in _ONNX_FLOATS:
                    out[(src, to)] += 1
        return out

    cb, ca = float_casts(before, tb), float_casts(after, ta)
    if cb != ca:
        return (f"the fused graph changes the float Casts ({sum(cb.values())} -> {sum(ca.values())}): a "
                "fusion moved an fp32 island boundary")
    for name, dtype in ta.items():
        if name in tb and tb[name] in _ONNX_FLOATS and dtype != tb[name]:
            return (f"tensor '{name}' is {_ONNX_FLOATS.get(dtype, dtype)} after fusion but "
                    f"{_ONNX_FLOATS[tb[name]]} before")
    names_before = {n.name for n in before.graph.node}
    for n in after.graph.node:
        if n.name in names_before or n.op_type == "Cast":
            continue
        acts = {ta.get(i) for i in n.input if i and ta.get(i) in _ONNX_FLOATS and
                i not in {init.name for init in after.graph.initializer}}
        if len(acts) > 1:
            return (f"fused node '{n.name}' ({n.op_type}) reads activations of mixed float dtypes "
                    f"({', '.join(sorted(_ONNX_FLOATS[a] for a in acts))})")
    return None


def _model_type(gm) -> str:
    from rewriter.pipeline import INFO_KEY

    name = str(gm.meta.get(INFO_KEY, {}).get("model", "")).lower()
    return "gpt2" if "gpt" in name else "bert"


def _runs_like(before, after, feeds: dict) -> str | None:
    """None when the fused graph loads in ONNX Runtime (CPU EP) and gives the unfused outputs."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        fused = ort.InferenceSession(after.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        return f"the fused graph does not load in ONNX Runtime ({str(exc).strip().splitlines()[0][:400]})"
    if not feeds:
        return None
    try:
        plain = ort.InferenceSession(before.SerializeToString(), options, providers=["CPUExecutionProvider"])
        got, want = fused.run(None, feeds), plain.run(None, feeds)
    except Exception as exc:
        return f"the fused graph fails to run ({str(exc).strip().splitlines()[0][:200]})"
    for g, w in zip(got, want):
        if np.issubdtype(w.dtype, np.floating):
            g, w = g.astype(np.float64), w.astype(np.float64)
            err = np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)
            if not np.isfinite(err) or err > _FUSION_TOLERANCE:
                return f"the fused graph's outputs differ from the unfused ones (relative L2 {err:.2e})"
    return None


_FUSION_TOLERANCE = 1e-2  # fused kernels reorder 16-bit arithmetic; a broken fusion is far off


def _name_fused_nodes(before, after) -> None:
    """Name each fused node '<module path>/<OpType>' after the node whose output it now computes."""
    producer = {o: n.name for n in before.graph.node for o in n.output}
    old_names = {n.name for n in before.graph.node}
    used = {n.name for n in after.graph.node}
    for node in after.graph.node:
        if node.name in old_names:
            continue
        source = next((producer[o] for o in node.output if o in producer), None) or next(
            (producer[i] for i in node.input if i in producer and "/" in producer[i]), None)
        if not source or "/" not in source:
            continue
        name = f"{source.rsplit('/', 1)[0].split('/')[0]}/{node.op_type}"
        used.discard(node.name)  # a node already named so keeps its name
        while name in used:
            name += "_"
        used.add(name)
        node.name = name


def _const_ints(value) -> list[int] | None:
    """The values of a constant 1-D int tensor (a Reshape's shape), else None."""
    tensor = None if value is None else value.const_value
    if tensor is None:
        return None
    try:
        data = tensor.numpy()
    except Exception:  # a tensor type numpy cannot read
        return None
    return [int(d) for d in data.reshape(-1)] if data.ndim == 1 else None


def _same_dims(a, b) -> bool:
    """Two dimensions known equal: equal ints, or the same named symbolic dimension."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return getattr(a, "value", None) is not None and getattr(a, "value", None) == getattr(b, "value", None)


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
    if _const_ints(reshape.inputs[1]) != [-1, w.shape[0]]:
        return None
    uses = list(gemm.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Reshape" or uses[0].idx != 0:
        return None
    out_reshape = uses[0].node
    target = _const_ints(out_reshape.inputs[1])
    # the output Reshape splits the flattened rows again: a -1 (or ints) before the last dim, which is N
    if target is None or len(target) < 3 or target[-1] != w.shape[1] or 0 in target \
            or target.count(-1) > 1 or -1 in target[-1:]:
        return None
    x = reshape.inputs[0]
    shape = target[:-1] + [w.shape[0]]
    if x is not None and x.shape is not None and x.shape.rank() == len(shape) and all(
            t == -1 or _same_dims(t, d) for t, d in zip(shape, x.shape.dims)) and _same_dims(x.shape[-1], shape[-1]):
        shape = None  # x is already (rows..., K): no Reshape needed
    return x, w, bias, out_reshape, shape


def _take_over(old, new) -> None:
    """`new` replaces `old` for every reader and as a graph output, under `old`'s name."""
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name, new.name = f"{name}__unused", name


def _unflatten_gemms(model) -> int:
    """Rewrite Reshape(x, [-1, K]) -> Gemm(W, C) -> Reshape(rows..., N) as MatMul(x', W) -> Add(C), with x'
    x viewed as (rows..., K).

    torch's addmm on a flattened activation (GPT-2's Conv1D) exports as the Gemm form; ONNX Runtime's
    fusions read the MatMul form: the attention fusions match up to the Reshape before the output
    projection and then feed it a (B, S, D) tensor, which a Gemm (rank 2 only) refuses, and the bias
    fusions (SkipLayerNormalization, FastGelu, attention bias) look for MatMul + Add. Same dtype, same
    kernel (a MatMul of a 3-D input by a 2-D weight is one GEMM). Returns how many were rewritten.
    """
    import numpy as np
    import onnx_ir as ir

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
            const = _new_initializer(graph, f"{result.name}__rows_k", np.array(shape, np.int64))
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
        _take_over(result, value)
        for node in (out_reshape, gemm, flat_reshape):
            if not any(o.uses() or o.is_graph_output() for o in node.outputs):
                graph.remove(node, safe=True)
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


def _shapes_from_inputs(model) -> int:
    """Read each Shape of an intermediate tensor from the graph inputs instead, when every dimension it
    returns is a number or a named dimension of an input ('batch').

    The exporter builds masks from shapes, e.g. the causal mask of SDPA(is_causal=True) from Shape(q) and
    Shape(k): those extra readers of q and k keep the fusions from replacing the attention subgraph
    ("matched nodes have other uses"). Integers only: no float value changes. Returns how many Shapes
    were rewritten.
    """
    import numpy as np
    import onnx_ir as ir

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
                const = _new_initializer(graph, f"{node.outputs[0].name}__dim{k}", np.array([piece], np.int64))
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
        _take_over(node.outputs[0], result)
        graph.remove(node, safe=True)
        count += 1
    return count


def _packed_qkv(mha):
    """(x, w, bias, nodes) when the q, k, v of MultiHeadAttention `mha` are the three equal parts of one
    Split of MatMul(x, W) [+ bias] and nothing else reads them (`nodes`: that Split, Add, MatMul); else None."""
    import onnx_ir as ir

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
    sizes = _const_ints(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
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


def _pack_attention(model) -> int:
    """MatMul(x, W_qkv) [+ b] -> Split(3) -> MultiHeadAttention(q, k, v, mask) as one Attention(x, W_qkv, b,
    mask): ONNX Runtime's packed-QKV attention (the form BERT fuses to), which adds the bias while it
    lays out q, k, v for the attention kernel instead of an Add and a Split over the whole projection.
    Same dtype everywhere (the inputs', checked); a zero bias of that dtype where the model has none.
    Returns how many were packed."""
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    count = 0
    for mha in [n for n in graph if n.op_type == "MultiHeadAttention"]:
        found = _packed_qkv(mha)
        if found is None:
            continue
        x, w, bias, nodes = found
        if bias is None:
            zeros = np.zeros(w.shape[1], np.float16 if x.dtype == ir.DataType.FLOAT16 else np.float32)
            bias = _new_initializer(graph, f"{mha.outputs[0].name}__qkv_bias", zeros)
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
        _take_over(out, new)
        for node in [mha] + nodes:  # readers first: Split, Add, MatMul
            if not any(o.uses() or o.is_graph_output() for o in node.outputs):
                graph.remove(node, safe=True)
        count += 1
    return count


# ---------------------------------------------------------------------------------------- embeddings


# Ops whose every output element is a copy of an element of their first input: a tensor that holds one
# value everywhere still does after them (indices and shapes only choose which copies, and how many).
_COPYING_OPS = frozenset({"Expand", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Tile", "Transpose",
                          "Slice", "Gather", "GatherElements", "GatherND"})
# Deterministic ops `_constant` evaluates when constants alone feed them.
_FOLDABLE_OPS = _COPYING_OPS | {"Constant", "ConstantOfShape", "Range", "Cast", "Concat", "Add", "Sub", "Mul"}
_FOLD_LIMIT = 1 << 16  # elements: enough for position and token-type ids, never a weight
_SEARCH_DEPTH = 8


def _constant(value, depth: int = 0):
    """The numpy value of `value` when constants alone compute it: an initializer, or a deterministic op
    on constants evaluated with onnx's reference runtime (the exporter leaves some unfolded, e.g.
    GatherElements(zero buffer, arange)). None when data feeds it, or it is large or of unknown size."""
    if value is None:
        return None
    if value.const_value is not None:
        try:
            return value.const_value.numpy()
        except Exception:  # a tensor type numpy cannot read
            return None
    node = value.producer()
    if node is None or depth > _SEARCH_DEPTH or node.domain not in ("", "ai.onnx") \
            or node.op_type not in _FOLDABLE_OPS:
        return None
    dims = list(value.shape.dims) if value.shape is not None else [None]
    if not all(isinstance(d, int) for d in dims) or _product(dims) > _FOLD_LIMIT:
        return None
    args = {v.name: _constant(v, depth + 1) for v in node.inputs if v is not None}
    if any(a is None for a in args.values()):
        return None
    import onnx_ir as ir
    from onnx.reference import ReferenceEvaluator

    try:
        results = ReferenceEvaluator(ir.serde.serialize_node(node)).run(None, args)
    except Exception:
        return None
    return results[list(node.outputs).index(value)]


def _product(dims) -> int:
    total = 1
    for d in dims:
        total *= d
    return total


def _is_arange(value, length: int) -> bool:
    """`value` is proven to hold 0, 1, ..., length - 1 as [length] or [1, length]: position ids."""
    import numpy as np

    data = _constant(value)
    return (data is not None and data.shape in ((length,), (1, length)) and np.issubdtype(data.dtype, np.integer)
            and np.array_equal(data.reshape(-1), np.arange(length)))


def _single_value(value, depth: int = 0) -> int | None:
    """c when every element of the int tensor `value` is proven to be c, else None. BERT called without
    token_type_ids reads them from a zero buffer: Expand(GatherElements(zeros, arange), Shape(batch))."""
    import numpy as np

    data = _constant(value)
    if data is not None:
        flat = data.reshape(-1)
        if flat.size and np.issubdtype(flat.dtype, np.integer) and (flat == flat[0]).all():
            return int(flat[0])
        return None
    node = value.producer() if value is not None else None
    if node is None or depth > _SEARCH_DEPTH or node.domain not in ("", "ai.onnx") or not node.inputs:
        return None
    if node.op_type in _COPYING_OPS or (node.op_type == "Cast" and _is_int(node.outputs[0]) and _is_int(node.inputs[0])):
        return _single_value(node.inputs[0], depth + 1)
    return None


def _is_int(value) -> bool:
    import onnx_ir as ir

    return value is not None and value.dtype in (ir.DataType.INT64, ir.DataType.INT32)


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


def _embedding_term(term, batch, length: int, hidden: int):
    """(kind, ids, table) for one term of the embedding sum: a Gather of rows of a constant fp32 [rows,
    hidden] table read only by the sum. kind: "position" (ids arange(length)), "constant" (ids all one
    value; ids is then that int), "lookup" (ids data of shape [batch, length]); None otherwise."""
    import onnx_ir as ir

    gather = term.producer()
    if gather is None or gather.op_type != "Gather" or gather.domain not in ("", "ai.onnx") \
            or len(term.uses()) != 1 or term.is_graph_output() or gather.attributes.get_int("axis", 0) != 0:
        return None
    table, ids = gather.inputs
    if table is None or table.const_value is None or table.dtype != ir.DataType.FLOAT or table.shape is None \
            or table.shape.rank() != 2 or table.shape[1] != hidden or not _is_int(ids):
        return None
    rows = table.shape[0]
    if _is_arange(ids, length):
        return ("position", ids, table) if rows >= length else None
    c = _single_value(ids)
    if c is not None:
        return ("constant", c, table) if 0 <= c < rows else None
    if ids.shape is not None and ids.shape.rank() == 2 and _same_dims(ids.shape[0], batch) \
            and _same_dims(ids.shape[1], length):
        return "lookup", ids, table
    return None


def _embeddings(ln) -> _Embeddings | None:
    """The BERT embeddings under LayerNormalization `ln`, else None: LN(Gather(W_word, ids) + Gather(W_pos,
    arange(S)) [+ Gather(W_type, T)]), optionally with one Cast of the sum to fp16/bf16 before the LN
    (LayerNorm kept 16-bit), the tables constant fp32, S static, T data [B, S] or proven one value,
    the sum and its terms read by nothing else, axis -1, statistics in fp32 (stash_type 1)."""
    import onnx_ir as ir

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
    if shape is None or shape.rank() != 3 or not isinstance(shape[1], int) or not isinstance(shape[2], int):
        return None
    batch, length, hidden = shape.dims
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


def _new_initializer(graph, name: str, array):
    """Register `array` as an initializer under `name` (made unique)."""
    import onnx_ir as ir

    while name in graph.initializers:
        name += "_"
    value = ir.Value(name=name, const_value=ir.tensor(array))
    graph.register_initializer(value)
    return value


def _as_int32(ids, name: str, nodes: list):
    """Cast of int64 ids to int32, which EmbedLayerNormalization reads (a vocabulary index fits)."""
    import onnx_ir as ir

    if ids.dtype == ir.DataType.INT32:
        return ids
    cast = ir.node("Cast", [ids], {"to": ir.DataType.INT32}, name=name)
    out = cast.outputs[0]
    out.name, out.dtype, out.shape = f"{ids.name}__int32", ir.DataType.INT32, ids.shape
    nodes.append(cast)
    return out


def _remove_unread(graph, nodes) -> None:
    """Remove `nodes`, then the producers of their inputs, as far as nothing else reads them (the
    GatherElements/Expand computing constant token-type ids, ...), and the initializers left unread."""
    pending = list(nodes)
    while pending:
        node = pending.pop()
        if node.graph is not graph or any(o.uses() or o.is_graph_output() for o in node.outputs):
            continue
        inputs = [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        for value in inputs:
            if value.producer() is not None:
                pending.append(value.producer())
            elif value.is_initializer() and not value.uses() and not value.is_graph_input() \
                    and not value.is_graph_output():
                graph.initializers.pop(value.name)


def _replace_embeddings(graph, found: _Embeddings) -> str:
    """Put one com.microsoft EmbedLayerNormalization in place of what `found` describes; returns its name.

    A token type proven constant c is folded into the position table (W_pos + W_type[c], fp32, the sum the
    graph computed per token): the node then reads no segment input. The node computes in fp32, the tables'
    dtype: a LayerNorm kept 16-bit has its gamma/beta read as fp32 copies (exact) and its Cast moved after
    the node."""
    import numpy as np
    import onnx_ir as ir

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
        position = _new_initializer(graph, f"{position.name}__plus_{table.name}_row{c}", folded)
    gamma, beta = ln.inputs[1], ln.inputs[2] if len(ln.inputs) > 2 else None
    if beta is None:
        beta = _new_initializer(graph, f"{gamma.name}__zero_bias", np.zeros(gamma.shape[0], np.float32))
    gamma, beta = [v if v.dtype == ir.DataType.FLOAT else
                   _new_initializer(graph, f"{v.name}__fp32", v.const_value.numpy().astype(np.float32))
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
    _take_over(ln.outputs[0], result)
    _remove_unread(graph, [ln])
    graph.opset_imports.setdefault("com.microsoft", 1)
    return name


def _fuse_embed_layer_norm(model, notes: list[str] | None = None) -> int:
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
    import onnx_ir as ir

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


# Standard ONNX ops a fusion may produce; every op of another domain (com.microsoft) counts as fused.
_FUSED_STANDARD_OPS = frozenset({"LayerNormalization", "Gelu", "RMSNormalization", "Attention"})


def _fused_ops_added(before, after) -> dict[str, int]:
    """{fused op: how many more `after` has}: contrib ops and the standard ops fusions produce, not the
    MatMul/Add a rewrite into the fusions' input form adds."""
    def fused(proto):
        return collections.Counter(n.op_type for n in proto.graph.node
                                   if n.domain not in ("", "ai.onnx") or n.op_type in _FUSED_STANDARD_OPS)

    b, a = fused(before), fused(after)
    return {op: a[op] - b[op] for op in a if a[op] > b[op]}


def _fuse(model, gm, report: ExportReport, feeds: dict):
    """ONNX Runtime fusions, each step kept only when it keeps the precision decisions and the outputs."""
    import onnx_ir as ir

    from rewriter.backends.onnx_backend import _quiet  # the backend imports this module: import at call time

    proto = ir.serde.serialize_model(model)
    steps = []

    def onnxscript_step(p):
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        m = ir.serde.deserialize_model(p)
        rewritten = _unflatten_gemms(m)
        _shapes_from_inputs(m)
        with _quiet():
            result = optimize_for_ort(m)
        stats = result[1] if isinstance(result, tuple) else {}
        m = result[0] if isinstance(result, tuple) else m
        stats = {k: v for k, v in stats.items() if v}
        if rewritten:
            stats["gemm_as_matmul"] = rewritten
        stats["packed_attention"] = _pack_attention(m)
        raised: list[str] = []
        stats["embed_layer_norm"] = _fuse_embed_layer_norm(m, raised)
        stats["notes"] = raised
        return ir.serde.serialize_model(m), stats

    def transformers_step(p):
        from onnxruntime.transformers.optimizer import optimize_model

        m = ir.serde.deserialize_model(p)
        rewritten = _unflatten_gemms(m)
        p = ir.serde.serialize_model(m) if rewritten else copy.deepcopy(p)
        with _quiet():
            opt = optimize_model(p, model_type=_model_type(gm), num_heads=0, hidden_size=0,
                                 opt_level=0, use_gpu=True, only_onnxruntime=False)
        stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        if rewritten:
            stats["gemm_as_matmul"] = rewritten
        fused = opt.model
        declared = {o.domain for o in fused.opset_import}
        for domain in sorted({n.domain for n in fused.graph.node} - declared - {"ai.onnx"}):
            fused.opset_import.add(domain=domain, version=1)  # contrib ops: the optimizer omits it
        return fused, stats

    steps = [("onnxscript ort_fusions", onnxscript_step),
             ("onnxruntime.transformers optimizer", transformers_step)]
    for label, step in steps:
        try:
            fused, stats = step(proto)
        except ImportError as exc:
            report.fusion_notes.append(f"{label}: not applied ({exc.name or exc} is not installed)")
            continue
        except Exception as exc:
            report.fusion_notes.append(f"{label}: not applied, it failed ({type(exc).__name__}: "
                                       f"{str(exc).strip()[:160]})")
            continue
        added = _fused_ops_added(proto, fused)
        if not added:
            report.fusion_notes.append(f"{label}: nothing to fuse")
            continue
        reason = _precision_kept(proto, fused) or _runs_like(proto, fused, feeds)
        if reason is not None:
            report.fusion_notes.append(f"{label}: skipped, {reason}")
            continue
        _name_fused_nodes(proto, fused)
        proto = fused
        for op, n in added.items():
            report.fusions[op] = report.fusions.get(op, 0) + n
        rewritten, raised = stats.get("gemm_as_matmul"), stats.get("notes", [])
        report.fusion_notes.append(f"{label}: fused " + ", ".join(f"{k} {v}" for k, v in added.items())
                                   + (f" ({rewritten} flattened Gemm read as MatMul first)" if rewritten else "")
                                   + (" (precision decisions kept)" if not raised else
                                      f" (precision decisions kept, {len(raised)} raised to fp32: below)"))
        report.fusion_notes += [f"{label}: {note}" for note in raised]
    return ir.serde.deserialize_model(proto)
