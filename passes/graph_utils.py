"""Small graph helpers shared by the passes."""
from __future__ import annotations

import torch
import torch.fx as fx

from rewriter import meta

__all__ = ["input_nodes", "float_inputs", "is_param", "is_cast", "cast_target", "make_cast",
           "explicit_dtype", "is_tuple_getitem", "original_dtype", "natural_promotion", "ndim",
           "is_metadata_assert", "attr_owner", "free_attr_name"]

_CAST_TARGETS = (torch.ops.aten._to_copy.default,)


def input_nodes(node: fx.Node) -> list[fx.Node]:
    """Distinct fx.Node inputs of `node`, in argument order."""
    seen: dict[fx.Node, None] = {}
    for n in node.all_input_nodes:
        seen.setdefault(n, None)
    return list(seen)


def float_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in input_nodes(node) if meta.is_float_dtype(meta.value_dtype(n))]


def is_param(node: fx.Node) -> bool:
    """A parameter, buffer or constant tensor (get_attr)."""
    return node.op == "get_attr"


def is_cast(node: fx.Node) -> bool:
    """A plain dtype cast: aten._to_copy with only a dtype (what insert_casts creates)."""
    return (node.op == "call_function" and node.target in _CAST_TARGETS and len(node.args) == 1
            and set(node.kwargs) <= {"dtype"} and isinstance(node.kwargs.get("dtype"), torch.dtype))


def is_metadata_assert(node: fx.Node) -> bool:
    """torch.export's `_assert_tensor_metadata(x, ..., dtype)`, which guards every `.to()`/`.float()`."""
    return node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default


def cast_target(node: fx.Node) -> torch.dtype:
    return node.kwargs["dtype"]


def make_cast(graph: fx.Graph, value: fx.Node, dtype: torch.dtype, before: fx.Node, reason: str,
              pass_name: str) -> fx.Node:
    """Insert `_to_copy(value, dtype=dtype)` before `before`, annotated with why it exists."""
    with graph.inserting_before(before):
        cast = graph.call_function(torch.ops.aten._to_copy.default, (value,), {"dtype": dtype})
    val = value.meta.get("val")
    if isinstance(val, torch.Tensor):
        try:
            cast.meta["val"] = val.to(dtype)
        except Exception:  # fake tensors without an active mode: shape is what we need
            pass
    for key in ("nn_module_stack", "stack_trace"):
        if key in before.meta:
            cast.meta[key] = before.meta[key]
    meta.put(cast, meta.DTYPE, meta.dtype_name(dtype))
    meta.put(cast, meta.CREATED, {"pass": pass_name, "reason": reason})
    return cast


def explicit_dtype(node: fx.Node) -> torch.dtype | None:
    dtype = node.kwargs.get("dtype")
    return dtype if isinstance(dtype, torch.dtype) else None


def is_tuple_getitem(node: fx.Node) -> bool:
    """getitem on a node that returns several tensors (split, batch_norm, max_pool with indices)."""
    if node.op != "call_function" or node.target.__name__ != "getitem":
        return False
    src = node.args[0]
    return isinstance(src, fx.Node) and isinstance(src.meta.get("val", src.meta.get("tensor_meta")),
                                                   (tuple, list))


def original_dtype(node: fx.Node) -> torch.dtype | None:
    """dtype the node had in the captured fp32 graph (node.meta['val'] is never rewritten)."""
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    dtype = getattr(val, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


def ndim(node: fx.Node) -> int | None:
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(val, "shape", None)
    return None if shape is None else len(shape)


def natural_promotion(node: fx.Node) -> torch.dtype | None:
    """dtype PyTorch's type promotion gives `node` from its current float inputs (0-dim ones only
    count when every input is 0-dim), or None when it has no float input."""
    ins = float_inputs(node)
    shaped = [n for n in ins if ndim(n) != 0] or ins
    result = None
    for n in shaped:
        dtype = meta.value_dtype(n)
        result = dtype if result is None else torch.promote_types(result, dtype)
    return result


def attr_owner(gm: fx.GraphModule, target: str):
    """(module, attribute name) that hold the tensor a get_attr target ("layer1.0.conv1.weight") names."""
    path, _, name = str(target).rpartition(".")
    return (gm.get_submodule(path) if path else gm), name


def free_attr_name(module: torch.nn.Module, name: str) -> str:
    """`name`, or `name_1`, `name_2`, ... : the first that `module` does not have yet."""
    if not hasattr(module, name):
        return name
    i = 1
    while hasattr(module, f"{name}_{i}"):
        i += 1
    return f"{name}_{i}"
