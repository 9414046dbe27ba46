"""Helpers shared by the passes that read attention masks (causal_attention, padding_mask): find the
subgraph that computes a mask, and evaluate it on concrete sizes (and inputs) to check what it is.

Sizes: a captured graph keeps batch, sequence length and image sizes symbolic. A mask subgraph is
checked at several assignments of every symbol it reads (`size_substitutions`): the example sizes,
all small, all larger, and each symbol different from the others (within each symbol's captured
range), so a rewrite that holds only at the traced sizes, or only when two lengths agree, is refused."""
from __future__ import annotations

import sympy
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from rewriter.passes.graph_utils import attr_owner, is_metadata_assert

__all__ = ["SDPA", "SIZE_READS", "NotShapeOnly", "mask_arg", "ancestors", "concrete", "batch_symbols",
           "batch_substitutions", "size_substitutions", "describe_substitutions", "size_node", "evaluate",
           "remove_dead"]

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


def _symbol_range(symbol, sizes: list) -> tuple[int, int | None]:
    """(lowest, highest) value `symbol` may take at run time, from the shape environment's ranges."""
    for size in sizes:
        env = size.node.shape_env
        vr = env.var_to_range.get(symbol)
        if vr is None:
            continue
        hi = None if "oo" in str(vr.upper) else int(vr.upper)
        return 1, hi  # export's lower bound 2 is its 0/1 specialisation: 1 runs too
    return 1, None


def size_substitutions(nodes: list[fx.Node]) -> list[dict]:
    """The size assignments to check a mask subgraph at: [{}] when it reads no symbolic size, else
    [example sizes, every symbol small (1 or 2), every symbol larger (+5), each symbol distinct
    (example + 1 + its index)], each clamped to the symbol's range, duplicates dropped."""
    sizes: list[torch.SymInt] = []
    for n in nodes:
        val = n.meta.get("val")
        found = [val] if n.target in SIZE_READS else list(val.shape) \
            if n.op == "placeholder" and isinstance(val, torch.Tensor) else []
        sizes += [s for s in found if isinstance(s, torch.SymInt)]
    symbols = sorted({sym for s in sizes for sym in s.node.expr.free_symbols}, key=str)
    if not symbols:
        return [{}]
    example = {sym: int(_symbol_values(sizes[0])[sym]) for sym in symbols}

    def clamp(sym, value):
        lo, hi = _symbol_range(sym, sizes)
        return max(lo, min(value, hi)) if hi is not None else max(lo, value)

    plans = [example,
             {s: clamp(s, 1 if v != 1 else 2) for s, v in example.items()},
             {s: clamp(s, v + 5) for s, v in example.items()},
             {s: clamp(s, v + 1 + i) for i, (s, v) in enumerate(example.items())}]
    result, seen = [], set()
    for plan in plans:
        key = tuple(sorted((str(s), v) for s, v in plan.items()))
        if key not in seen:
            seen.add(key)
            result.append({s: sympy.Integer(v) for s, v in plan.items()})
    return result


def describe_substitutions(checked: list[dict]) -> str:
    """'s0=2,s1=16; s0=1,s1=1; ...': the sizes a rewrite was checked at, for its reason."""
    if not checked or checked == [{}]:
        return "its only (static) shape"
    return "; ".join(",".join(f"{s}={int(v)}" for s, v in sorted(subs.items(), key=lambda kv: str(kv[0])))
                     for subs in checked)


def size_node(gm: fx.GraphModule, size, before: fx.Node):
    """An int, or a node computing the SymInt `size` (an existing size read of the same symbol, or a
    new `sym_size` of a graph input that has it as a dimension); None when no input carries it."""
    if isinstance(size, int):
        return size
    expr = size.node.expr
    if expr.is_number:
        return int(expr)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        if order[node] >= order[before]:
            break
        val = node.meta.get("val")
        if node.target in SIZE_READS and isinstance(val, torch.SymInt) and val.node.expr == expr:
            return node
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op != "placeholder" or not isinstance(val, torch.Tensor):
            continue
        for dim, d in enumerate(val.shape):
            if isinstance(d, torch.SymInt) and d.node.expr == expr:
                with gm.graph.inserting_before(before):
                    new = gm.graph.call_function(torch.ops.aten.sym_size.int, (node, dim))
                new.meta["val"] = d
                return new
    return None


def evaluate(gm: fx.GraphModule, nodes: list[fx.Node], subs: dict, inputs: dict | None = None) -> dict:
    """Run the mask subgraph on concrete values; size reads take their (substituted) example value,
    graph inputs (and any other node given in `inputs`) the tensors in `inputs`."""
    inputs = inputs or {}
    env: dict[fx.Node, object] = {}
    with torch.no_grad():
        for node in nodes:
            if node in inputs:
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
