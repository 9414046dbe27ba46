"""Helpers shared by the passes that read attention masks (causal_attention, padding_mask): find the
subgraph that computes a mask, and evaluate it on concrete sizes (and inputs) to check what it is."""
from __future__ import annotations

import sympy
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from rewriter.passes.graph_utils import attr_owner, is_metadata_assert

__all__ = ["SDPA", "SIZE_READS", "NotShapeOnly", "mask_arg", "ancestors", "concrete", "batch_symbols",
           "batch_substitutions", "evaluate", "remove_dead"]

SDPA = (torch.ops.aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention)
SIZE_READS = (torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int)


class NotShapeOnly(Exception):
    """The mask depends on something other than shapes and constants."""


def mask_arg(node: fx.Node):
    """(attn_mask, is_causal, where the mask sits: ("arg", 3) or ("kwarg", "attn_mask"))."""
    if len(node.args) > 3:
        mask, where = node.args[3], ("arg", 3)
    else:
        mask, where = node.kwargs.get("attn_mask"), ("kwarg", "attn_mask")
    causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    return mask, bool(causal), where


def _is_mutated(gm: fx.GraphModule, target: str) -> bool:
    """True when some op of the graph writes the buffer `target` (copy_, an in-place op)."""
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        if any(isinstance(a, fx.Node) and a.op == "get_attr" and a.target == target
               for a in node.all_input_nodes):
            return True
    return False


def ancestors(gm: fx.GraphModule, mask: fx.Node, inputs_ok: bool = False) -> list[fx.Node]:
    """The nodes computing `mask`, in graph order; size reads are leaves. Raises NotShapeOnly, also
    when the mask reads a graph input, unless `inputs_ok` (the inputs are then in the list)."""
    seen: set[fx.Node] = set()
    stack = [mask]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            if inputs_ok:
                continue
            raise NotShapeOnly(f"reads input '{node.name}'")
        if node.op == "get_attr":
            value = getattr(*attr_owner(gm, node.target))
            if isinstance(value, nn.Parameter) or _is_mutated(gm, str(node.target)):
                raise NotShapeOnly(f"reads parameter or mutable buffer '{node.target}'")
            continue
        if node.op != "call_function":
            raise NotShapeOnly(f"{node.op} '{node.name}'")
        if node.is_impure():
            raise NotShapeOnly(f"'{node.name}' is random or has side effects")
        if node.target in SIZE_READS:
            continue  # a size: its value comes from the symbolic shape, not from the tensor
        stack.extend(node.all_input_nodes)
    return [n for n in gm.graph.nodes if n in seen]


def _symbol_values(value: torch.SymInt) -> dict:
    """{symbol: example value} of the shape environment `value` belongs to."""
    env = value.node.shape_env
    return dict(getattr(env, "backed_var_to_val", None) or env.var_to_val)  # renamed in torch 2.14


def concrete(value, subs: dict) -> int:
    """An int or SymInt as an int: its example value, with the symbols in `subs` replaced."""
    if isinstance(value, int):
        return value
    if not isinstance(value, torch.SymInt):
        raise NotShapeOnly(f"size of unknown kind {type(value).__name__}")
    values = _symbol_values(value)
    values.update(subs)
    result = value.node.expr.xreplace(values)
    if result.free_symbols:
        raise NotShapeOnly(f"size {value} has no example value")
    return int(result)


def batch_symbols(gm: fx.GraphModule) -> dict:
    """{symbol: example value} of dimension 0 of every tensor input."""
    symbols = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op != "placeholder" or not isinstance(val, torch.Tensor) or val.dim() == 0:
            continue
        size = val.shape[0]
        if isinstance(size, torch.SymInt) and len(size.node.expr.free_symbols) == 1:
            symbol = next(iter(size.node.expr.free_symbols))
            symbols[symbol] = concrete(size, {})
    return symbols


def batch_substitutions(gm: fx.GraphModule, nodes: list[fx.Node]) -> list[dict]:
    """The batch sizes to check a mask subgraph at: [{}] when it reads no symbolic batch size, else
    [{symbol: example value}, {symbol: another value (1, or 2 when the example is 1)}]. The sizes read
    are those of the size reads among `nodes` and of the graph inputs among them."""
    used = set()
    for n in nodes:
        val = n.meta.get("val")
        sizes = [val] if n.target in SIZE_READS else list(val.shape) \
            if n.op == "placeholder" and isinstance(val, torch.Tensor) else []
        for size in sizes:
            if isinstance(size, torch.SymInt):
                used |= size.node.expr.free_symbols
    batch = {s: v for s, v in batch_symbols(gm).items() if s in used}
    if not batch:
        return [{}]
    return [{s: sympy.Integer(v) for s, v in batch.items()},
            {s: sympy.Integer(1 if v != 1 else 2) for s, v in batch.items()}]


def evaluate(gm: fx.GraphModule, nodes: list[fx.Node], subs: dict, inputs: dict | None = None) -> dict:
    """Run the mask subgraph on concrete values; size reads take their (substituted) example value,
    graph inputs the tensors in `inputs`."""
    env: dict[fx.Node, object] = {}
    with torch.no_grad():
        for node in nodes:
            if node.op == "placeholder":
                env[node] = inputs[node]
            elif node.op == "get_attr":
                env[node] = getattr(*attr_owner(gm, node.target))
            elif node.target in SIZE_READS:
                env[node] = concrete(node.meta.get("val"), subs)
            else:
                args = fx.node.map_arg(node.args, lambda n: env[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
                env[node] = node.target(*args, **kwargs)
    return env


def remove_dead(candidates: set[fx.Node], graph: fx.Graph) -> None:
    """Erase the candidates nobody reads any more, with the metadata asserts that only checked them."""
    for node in reversed([n for n in graph.nodes if n in candidates]):
        if node.op in ("placeholder", "output"):
            continue
        users = list(node.users)
        if any(not is_metadata_assert(u) for u in users):
            continue
        for user in users:
            graph.erase_node(user)
        graph.erase_node(node)
