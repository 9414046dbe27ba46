"""Small ONNX IR helpers shared by the modules of the ONNX backend (no imports from the package)."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx_ir as ir
import torch

from rewriter import meta

__all__ = ["quiet", "dtype_str", "is_cast", "cast_to", "module_path_of", "const_ints", "same_dims", "take_over",
           "new_initializer", "remove_unread", "constant", "product", "is_int", "dim_key", "shape_values",
           "FLOATS", "LOWP_NAMES", "COPYING_OPS",
           "SEARCH_DEPTH"]

FLOATS = {"FLOAT": torch.float32, "FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16}
LOWP_NAMES = ("FLOAT16", "BFLOAT16")


@contextlib.contextmanager
def quiet():
    """Silence the exporter's progress prints and the constant folder's 'Evaluation failed' logs."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export",
                                               "onnxruntime", "transformers", "fusion_base")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def dtype_str(value) -> str | None:
    dtype = getattr(value, "dtype", None)
    return None if dtype is None else dtype.name


def is_cast(node) -> bool:
    return node.op_type == "Cast" and node.domain in ("", "ai.onnx")


def cast_to(node):
    return ir.DataType(node.attributes["to"].as_int())



def module_path_of(gm_node) -> str:
    return meta.module_path(gm_node) or ""



def const_ints(value) -> list[int] | None:
    """The values of a constant 1-D int tensor (a Reshape's shape), else None."""
    tensor = None if value is None else value.const_value
    if tensor is None:
        return None
    try:
        data = tensor.numpy()
    except Exception:  # a tensor type numpy cannot read
        return None
    return [int(d) for d in data.reshape(-1)] if data.ndim == 1 else None


def same_dims(a, b) -> bool:
    """Two dimensions known equal: equal ints, or the same named symbolic dimension."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return getattr(a, "value", None) is not None and getattr(a, "value", None) == getattr(b, "value", None)



def take_over(old, new) -> None:
    """`new` replaces `old` for every reader and as a graph output, under `old`'s name."""
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name, new.name = f"{name}__unused", name



def new_initializer(graph, name: str, array):
    """Register `array` as an initializer under `name` (made unique)."""
    while name in graph.initializers:
        name += "_"
    value = ir.Value(name=name, const_value=ir.tensor(array))
    graph.register_initializer(value)
    return value



def remove_unread(graph, nodes) -> None:
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



# ---------------------------------------------------------------------------------------- embeddings


# Ops whose every output element is a copy of an element of their first input: a tensor that holds one
# value everywhere still does after them (indices and shapes only choose which copies, and how many).
COPYING_OPS = frozenset({"Expand", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Tile", "Transpose",
                          "Slice", "Gather", "GatherElements", "GatherND"})
# Deterministic ops `constant` evaluates when constants alone feed them.
_FOLDABLE_OPS = COPYING_OPS | {"Constant", "ConstantOfShape", "Range", "Cast", "Concat", "Add", "Sub", "Mul"}
_FOLD_LIMIT = 1 << 16  # elements: enough for position and token-type ids, never a weight
SEARCH_DEPTH = 8


def constant(value, depth: int = 0):
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
    if node is None or depth > SEARCH_DEPTH or node.domain not in ("", "ai.onnx") \
            or node.op_type not in _FOLDABLE_OPS:
        return None
    dims = list(value.shape.dims) if value.shape is not None else [None]
    if not all(isinstance(d, int) for d in dims) or product(dims) > _FOLD_LIMIT:
        return None
    args = {v.name: constant(v, depth + 1) for v in node.inputs if v is not None}
    if any(a is None for a in args.values()):
        return None
    from onnx.reference import ReferenceEvaluator

    try:
        results = ReferenceEvaluator(ir.serde.serialize_node(node)).run(None, args)
    except Exception:
        return None
    return results[list(node.outputs).index(value)]


def product(dims) -> int:
    total = 1
    for d in dims:
        total *= d
    return total



def is_int(value) -> bool:
    return value is not None and value.dtype in (ir.DataType.INT64, ir.DataType.INT32)



# ---------------------------------------------------------------------------------------- shape values

# Ops that keep the row-major order of their input's elements (a 1-D shape tensor stays the same list).
_ORDER_KEEPING_OPS = frozenset({"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})


def dim_key(d) -> int | str | None:
    """A dimension of an ONNX IR shape as an int, the name of its symbol ('batch', 's53'), or None (unknown)."""
    if isinstance(d, int):
        return d
    value = getattr(d, "value", None)
    return value if isinstance(value, (int, str)) and value != "" else None


def shape_values(value, depth: int = 0) -> list | None:
    """The elements of a 1-D (or 0-D) int64 shape tensor, each an int or the name of a symbolic dimension,
    when they follow from constants and Shape() of values whose dims are known: what the exporter builds a
    Reshape target from with a symbolic sequence length (Concat(Reshape(Squeeze(Shape(mask, 1, 2))), [4],
    [16])). None when some element is neither. The names are the exporter's symbols, which torch.export
    proved equal wherever two values share one."""
    if value is None:
        return None
    if value.const_value is not None:
        try:
            data = value.const_value.numpy()
        except Exception:  # a tensor type numpy cannot read
            return None
        return [int(d) for d in data.reshape(-1)] if data.ndim <= 1 and data.dtype.kind in "iu" else None
    node = value.producer()
    if node is None or depth > SEARCH_DEPTH or node.domain not in ("", "ai.onnx") or not node.inputs:
        return None
    op = node.op_type
    if op == "Shape":
        source = node.inputs[0]
        if source is None or source.shape is None:
            return None
        dims = [dim_key(d) for d in source.shape.dims]
        rank = len(dims)
        start = node.attributes["start"].as_int() if "start" in node.attributes else 0
        end = node.attributes["end"].as_int() if "end" in node.attributes else rank
        start, end = [max(0, min(rank, i + rank if i < 0 else i)) for i in (start, end)]
        picked = dims[start:end]
        return None if any(d is None for d in picked) else picked
    if op in _ORDER_KEEPING_OPS or (op == "Cast" and is_int(node.outputs[0])):
        return shape_values(node.inputs[0], depth + 1)
    if op == "Concat":
        parts = [shape_values(v, depth + 1) for v in node.inputs]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]
    if op == "Gather" and node.attributes.get_int("axis", 0) == 0:
        data, index = shape_values(node.inputs[0], depth + 1), node.inputs[1]
        index = [int(i) for i in index.const_value.numpy().reshape(-1)] \
            if index is not None and index.const_value is not None else None
        if data is None or index is None or not all(-len(data) <= i < len(data) for i in index):
            return None
        return [data[i] for i in index]
    if op == "Slice" and len(node.inputs) >= 3:
        data = shape_values(node.inputs[0], depth + 1)
        bounds = [const_ints(v) if v is not None else None for v in node.inputs[1:5]]
        starts, ends = bounds[0], bounds[1]
        axes = bounds[2] if len(bounds) > 2 and node.inputs[3] is not None else [0]
        steps = bounds[3] if len(bounds) > 3 and node.inputs[4] is not None else [1]
        if data is None or starts is None or ends is None or axes not in ([0], [-1]) or steps is None \
                or len(starts) != 1 or len(ends) != 1 or steps[0] == 0:
            return None
        return data[slice(*slice(starts[0], ends[0], steps[0]).indices(len(data)))]
    return None
