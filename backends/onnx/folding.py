"""Cleanup of the exported ONNX graph: constant folding, one table of Cast-folding rules, node names.

Before: x(f32) -> Cast(f16) -> Cast(f32) -> Cast(f32) ; x -> Cast(f16) twice
After:  x(f32) -> Cast(f16) -> Cast(f32)              ; x -> Cast(f16) once (the rounding chain is kept)

`CAST_RULES` is the one list of what may be folded, each rule with the reason it is allowed; `fold_casts`
applies them until none matches and counts each rule. The first three are exact. The two FP8 rules only
run on graphs holding the Q/DQ translation of FP8 GEMMs (fp8.py) and only remove a 16-bit rounding on
the way into QuantizeLinear or out of the GEMM's fp32 result: the value gets more precise, never less.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import onnx_ir as ir

from rewriter.backends.onnx.common import cast_to, is_cast, module_path_of, quiet

__all__ = ["simplify", "infer_types", "name_batch_dim", "symbolic_sizes", "fold_casts", "rename_nodes", "CAST_RULES",
           "CastRule"]


def simplify(model) -> None:
    """Constant folding, the basic rewrite rules and dead-code removal, without batch-norm folding."""
    import onnxscript.optimizer as optimizer
    import onnxscript.rewriter as rewriter_mod

    rules = [r for r in getattr(rewriter_mod, "_DEFAULT_REWRITE_RULES", ())
             if "BatchNorm" not in (getattr(r, "name", None) or "")]
    fold = getattr(optimizer, "fold_constants_ir", None) or getattr(optimizer, "fold_constants", None)
    with quiet():
        for _ in range(2):
            if fold is not None:
                fold(model, onnx_shape_inference=False)
            if rules:
                rewriter_mod.rewrite(model, pattern_rewrite_rules=rules)
            optimizer.remove_unused_nodes(model)
        try:
            import onnx_ir.passes.common as common

            for p in (common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                      common.CommonSubexpressionEliminationPass(), common.RemoveUnusedNodesPass()):
                p(model)
        except Exception:  # older onnx_ir: these passes only tidy the graph
            pass
        infer_types(model)


def infer_types(model) -> None:
    """Fill in the dtype of every value (the report and the precision check read them)."""
    try:
        import onnx_ir.passes.common as common

        common.ShapeInferencePass()(model)
    except Exception:  # types recorded by the exporter are then all there is
        pass


def name_batch_dim(model) -> None:
    """Call the symbolic batch dimension 'batch' everywhere instead of the exporter's 's43'."""
    symbols = set()
    for value in model.graph.inputs:
        if value.shape is not None and len(value.shape) and isinstance(value.shape[0], ir.SymbolicDim) \
                and value.shape[0].value:
            symbols.add(value.shape[0].value)
    if len(symbols) != 1:
        return
    old = symbols.pop()
    values = list(model.graph.inputs) + [o for n in model.graph for o in n.outputs]
    for value in values:
        if value.shape is None or not any(isinstance(d, ir.SymbolicDim) and d.value == old for d in value.shape):
            continue
        value.shape = ir.Shape([ir.SymbolicDim("batch") if isinstance(d, ir.SymbolicDim) and d.value == old
                                else d for d in value.shape])




def symbolic_sizes(model) -> list[str]:
    """The symbolic dimensions of the graph inputs other than dimension 0, as 'input[axis]' (e.g.
    'input_ids[1]' for a symbolic sequence length)."""
    return [f"{value.name}[{axis}]" for value in model.graph.inputs if value.shape is not None
            for axis, d in enumerate(value.shape.dims) if axis > 0 and not isinstance(d, int)]


def _width():
    return {ir.DataType.FLOAT16: 1, ir.DataType.BFLOAT16: 1, ir.DataType.FLOAT: 2, ir.DataType.DOUBLE: 3}


def _holds(wide, narrow) -> bool:
    width = _width()
    return wide == narrow or (wide in width and narrow in width and width[wide] > width[narrow])


def _inner_cast(node):
    """The Cast producing `node`'s input, or None."""
    src = node.inputs[0]
    producer = src.producer() if src is not None else None
    return producer if producer is not None and is_cast(producer) and producer.inputs[0] is not None else None


_QDQ_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)  # what the Q/DQ translation computes in (fp8.py)


def _rounding_chain(node):
    """(x, inner) when `node` is Cast(Cast(x -> 16-bit) -> D), x and D float or float16 and the middle
    dtype another 16-bit one (a rounding to it: float -> bfloat16 -> float, float -> bfloat16 -> float16,
    float16 -> bfloat16 -> float), else None."""
    inner = _inner_cast(node)
    if inner is None or cast_to(node) not in _QDQ_DTYPES:
        return None
    x, middle = inner.inputs[0], cast_to(inner)
    if x.dtype not in _QDQ_DTYPES or middle not in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16) \
            or middle == cast_to(node) or middle == x.dtype:
        return None
    return x, inner


def _read_directly(node, x) -> None:
    """Make the Cast `node` read `x` in place of its rounded input: its readers take x itself when x has
    the Cast's dtype already."""
    if x.dtype == cast_to(node):
        node.outputs[0].replace_all_uses_with(x)
    else:
        node.replace_input_with(0, x)


def _from_fp8_gemm(value) -> bool:
    """`value` is the fp32 result of an FP8 GEMM of the Q/DQ translation (a Gemm/MatMul reading a
    DequantizeLinear), through the Reshape that restores the leading dims."""
    node = value.producer() if value is not None else None
    if node is not None and node.op_type == "Reshape":
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if node is None or node.op_type not in ("Gemm", "MatMul"):
        return False
    return any(v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear"
               for v in node.inputs[:2])


def _same_dtype(node, graph, seen) -> bool:
    src, out = node.inputs[0], node.outputs[0]
    if src.dtype != cast_to(node) or out.is_graph_output():
        return False
    out.replace_all_uses_with(src)
    return True


def _widening_chain(node, graph, seen) -> bool:
    inner = _inner_cast(node)
    if inner is None or not _holds(cast_to(inner), inner.inputs[0].dtype):
        return False
    node.replace_input_with(0, inner.inputs[0])
    return True


def _duplicate(node, graph, seen) -> bool:
    key = (node.inputs[0], cast_to(node))
    if key in seen and seen[key].graph is not graph:  # removed by another rule since
        del seen[key]
    if key not in seen or seen[key] is node or node.outputs[0].is_graph_output():
        seen.setdefault(key, node)
        return False
    node.outputs[0].replace_all_uses_with(seen[key].outputs[0])
    return True


def _quantizes(value) -> bool:
    """Every reader of `value` (through Reshapes) is the FP8 quantization of the Q/DQ translation: the
    QuantizeLinear itself, or the Abs of its dynamic scale."""
    readers = list(value.uses())
    if not readers or value.is_graph_output():
        return False
    for use in readers:
        if use.node.op_type == "Reshape" and use.idx == 0:
            if not _quantizes(use.node.outputs[0]):
                return False
        elif not (use.node.op_type == "QuantizeLinear" and use.idx == 0) and use.node.op_type != "Abs":
            return False
    return True


def _shape_readers(node, graph, seen) -> bool:
    shapes = [u for u in node.outputs[0].uses() if u.node.op_type == "Shape" and u.node.domain in ("", "ai.onnx")]
    for use in shapes:
        use.node.replace_input_with(use.idx, node.inputs[0])
    return bool(shapes)


def _rounding_before_quantize(node, graph, seen) -> bool:
    found = _rounding_chain(node)
    if found is None or not _quantizes(node.outputs[0]):
        return False
    _read_directly(node, found[0])
    return True


def _rounding_after_fp8_gemm(node, graph, seen) -> bool:
    found = _rounding_chain(node)
    if found is None or node.outputs[0].is_graph_output() or not _from_fp8_gemm(found[0]) \
            or not _holds(cast_to(node), found[0].dtype):
        return False
    _read_directly(node, found[0])
    return True


@dataclasses.dataclass(frozen=True)
class CastRule:
    """One Cast-folding rule: `apply(cast, graph, seen) -> bool` edits the graph when it matches."""

    name: str
    reason: str
    apply: Callable[[Any, Any, dict], bool]
    fp8_only: bool = False


CAST_RULES: tuple[CastRule, ...] = (
    CastRule("same dtype", "a Cast to its input's own dtype changes no value", _same_dtype),
    CastRule("widening chain", "Cast(Cast(x, A), B) where A holds every value of x is Cast(x, B): exact",
             _widening_chain),
    CastRule("duplicate", "two Casts of one value to one dtype compute the same tensor", _duplicate),
    CastRule("shape reader", "Shape(Cast(x)) is Shape(x): a Cast read only for its shape is not computed",
             _shape_readers),
    CastRule("rounding before quantize",
             "QuantizeLinear rounds to float8 (3 mantissa bits) from the source cast once to its input dtype "
             "(fp32 or fp16) instead of from a 16-bit rounding of it: one rounding fewer",
             _rounding_before_quantize, fp8_only=True),
    CastRule("rounding after FP8 GEMM",
             "the FP8 GEMM's fp32 or fp16 result is read directly (widened when read in fp32), not through a "
             "16-bit rounding of it", _rounding_after_fp8_gemm, fp8_only=True),
)


def fold_casts(model, *, fp8: bool = False) -> collections.Counter:
    """Apply CAST_RULES (the FP8 rules only with `fp8`) until none matches; {rule name: Casts removed}.

    A Cast another rule rewired is removed once nothing reads it; a rounding chain (FLOAT -> FLOAT16 ->
    FLOAT) outside the FP8 rules is kept: it is what the converted model computes.
    """
    graph = model.graph
    rules = [r for r in CAST_RULES if fp8 or not r.fp8_only]
    removed: collections.Counter = collections.Counter()
    changed = True
    while changed:
        changed = False
        seen: dict = {}
        for node in list(graph):
            if node.graph is not graph or not is_cast(node) or node.inputs[0] is None:
                continue
            for rule in rules:
                inner = _inner_cast(node)
                if not rule.apply(node, graph, seen):
                    continue
                changed = True
                for cast in (node, inner):
                    if cast is not None and cast.graph is graph and not any(
                            o.uses() or o.is_graph_output() for o in cast.outputs):
                        graph.remove(cast, safe=True)
                        removed[rule.name] += 1
                break
    return removed


def rename_nodes(model, origin: dict) -> dict:
    """Name each node '<module path>/<fx node>[/<OpType>[_k]]'; returns node -> new name."""
    groups: dict[Any, list] = collections.defaultdict(list)
    for node in model.graph:
        if node in origin:
            groups[origin[node]].append(node)
    used: set[str] = {n.name for n in model.graph if n not in origin}
    names = {}
    for gm_node, nodes in groups.items():
        base = f"{module_path_of(gm_node)}/{gm_node.name}".lstrip("/")
        counts = collections.Counter(n.op_type for n in nodes)
        seen: collections.Counter = collections.Counter()
        for node in nodes:
            if len(nodes) == 1:
                name = base
            else:
                seen[node.op_type] += 1
                name = f"{base}/{node.op_type}" + (f"_{seen[node.op_type]}" if counts[node.op_type] > 1 else "")
            while name in used:
                name += "_"
            used.add(name)
            node.name = name
            names[node] = name
    return names

