"""Apply the target's kernel decisions to the exported ONNX graph; check every node against its decision.

The decisions are made on the converted GraphModule before export (passes/target/ort_kernels.py writes
node.meta[TARGET] from the one op table, passes/op_tables.py, with the reason). Here each ONNX node
whose fx node was decided fp32 for the target is wrapped in Casts, fp32 in and 16-bit back out:

Before: x(bf16) -> Conv(bf16, W bf16) -> y(bf16)
After:  x(bf16) -> Cast(f32) -> Conv(f32, Cast(W -> f32)) -> Cast(bf16) -> y(bf16)   (chains folded later)

Two safety nets that are facts, not op tables: the ONNX schema at the chosen opset (a 16-bit dtype the
op's schema does not accept) and the caller's `fp32_ops=`. `check_decisions` reports ONNX nodes that
compute in another dtype than the conversion decided (ExportReport.precision_mismatches).
"""
from __future__ import annotations

from typing import Any

import onnx_ir as ir
import torch

from rewriter import meta
from rewriter.backends.onnx.common import FLOATS, LOWP_NAMES, cast_to, dtype_str, is_cast, module_path_of
from rewriter.errors import BackendError, describe_node
from rewriter.runtime.fp8_ops import fp8_linear_op

__all__ = ["fp32_fallbacks", "static_values", "check_decisions"]


def _schema_allows(node, opset: int, dtype_name: str) -> bool:
    """True when the ONNX schema of `node` at `opset` accepts `dtype_name` tensors on its float inputs."""
    import onnx.defs

    if node.domain not in ("", "ai.onnx"):
        return True
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except Exception:
        return True
    allowed = {tc.type_param_str: set(tc.allowed_type_strs) for tc in schema.type_constraints}
    want = f"tensor({dtype_name.lower()})"
    formals = list(schema.inputs)
    for i, value in enumerate(node.inputs):
        if value is None or dtype_str(value) != dtype_name or not formals:
            continue
        formal = formals[min(i, len(formals) - 1)]
        types = allowed.get(formal.type_str)
        if types is not None and want not in types:
            return False
    return True


def _why_fp32(node, gm_node, opset: int, fp32_ops: frozenset, lowp: list[str]) -> tuple[list[str], str] | None:
    """(16-bit dtypes refused, reason) when `node` must compute in fp32, else None."""
    record = meta.get(gm_node, meta.TARGET) if gm_node is not None else None
    if record and record.get("dtype") == "float32":
        return lowp, record["reason"]
    if node.op_type in fp32_ops:
        return lowp, "on the fp32_ops= list of the export"
    blocked = [d for d in lowp if not _schema_allows(node, opset, d)]
    if blocked:
        return blocked, f"the ONNX schema of {node.op_type} at opset {opset} does not accept {blocked[0].lower()}"
    return None


def fp32_fallbacks(model, origin: dict, opset: int, fp32_ops: frozenset, fallback: str, names: dict) -> list[str]:
    """Wrap the 16-bit nodes decided fp32 (target decisions of their fx node, fp32_ops, the schema) in
    Casts to fp32 and back; one message per node. fallback="error" refuses the first instead."""
    groups: dict[Any, tuple[str, list[str], list[str], str]] = {}  # fx node (or ONNX node) -> message parts
    graph = model.graph
    up_casts: dict[Any, Any] = {}
    for node in list(graph):
        if is_cast(node):
            continue
        lowp = sorted({dtype_str(v) for v in list(node.inputs) + list(node.outputs)
                       if v is not None and dtype_str(v) in LOWP_NAMES})
        if not lowp:
            continue
        found = _why_fp32(node, origin.get(node), opset, fp32_ops, lowp)
        if found is None:
            continue
        blocked, why = found
        label = names.get(node, node.name)
        if fallback == "error":
            raise BackendError(
                f"ONNX node '{label}' ({node.op_type}) runs in {blocked[0].lower()} but has no such kernel "
                f"({why}). Fallback: refused (fallback='error'). Keep its module in fp32 with an override "
                f"(overrides={{'{node.op_type.lower()}': 'fp32'}} or its module path) or export with "
                "fallback='fp32'.")
        for i, value in enumerate(list(node.inputs)):
            if value is None or dtype_str(value) not in LOWP_NAMES:
                continue
            producer = value.producer()
            if producer is not None and is_cast(producer) and producer.inputs[0] is not None \
                    and dtype_str(producer.inputs[0]) == "FLOAT":
                # the value was rounded from fp32 for this node: a node kept in fp32 reads the fp32 source
                node.replace_input_with(i, producer.inputs[0])
                continue
            if value not in up_casts:
                cast = ir.node("Cast", [value], {"to": ir.DataType.FLOAT}, name=f"{label}/fp32_in{i}")
                cast.outputs[0].name = f"{value.name}__fp32"
                cast.outputs[0].dtype = ir.DataType.FLOAT
                cast.outputs[0].shape = value.shape
                graph.insert_before(node, cast)
                up_casts[value] = cast.outputs[0]
            node.replace_input_with(i, up_casts[value])
        for j, out in enumerate(node.outputs):
            if dtype_str(out) not in LOWP_NAMES:
                continue
            low, lowp_output = out.dtype, out.is_graph_output()
            users = [u for u in out.uses()  # the readers of the 16-bit value; Shape reads any dtype
                     if not (is_cast(u.node) and cast_to(u.node) == ir.DataType.FLOAT) and u.node.op_type != "Shape"]
            for use in list(out.uses()):  # consumers that cast to fp32 read the fp32 result directly
                user = use.node
                if not (is_cast(user) and cast_to(user) == ir.DataType.FLOAT):
                    continue
                result = user.outputs[0]
                if result.is_graph_output():
                    if lowp_output:
                        continue
                    graph.outputs[graph.outputs.index(result)] = out
                    out.name, result.name = result.name, f"{result.name}__unused"
                result.replace_all_uses_with(out)
                graph.remove(user, safe=True)
            out.dtype = ir.DataType.FLOAT
            if not users and not lowp_output:
                continue
            down = ir.node("Cast", [out], {"to": low}, name=f"{label}/back_out{j}")
            new_value = down.outputs[0]
            new_value.dtype, new_value.shape, new_value.name = low, out.shape, f"{out.name}__{low.name.lower()}"
            graph.insert_after(node, down)
            for use in users:
                use.node.replace_input_with(use.idx, new_value)
            if lowp_output:
                graph.outputs[graph.outputs.index(out)] = new_value
                out.name, new_value.name = new_value.name.replace(f"__{low.name.lower()}", "__fp32"), out.name
        gm_node = origin.get(node)
        key = gm_node if gm_node is not None else node
        if key not in groups:
            base = f"{module_path_of(gm_node)}/{gm_node.name}".lstrip("/") if gm_node is not None else label
            groups[key] = (base, [], blocked, why)
        groups[key][1].append(node.op_type)
    messages = []
    for base, ops, blocked, why in groups.values():
        what = f"ONNX node '{base}' ({ops[0]})" if len(ops) == 1 else f"ONNX nodes of '{base}' ({', '.join(ops)})"
        messages.append(f"{what} kept fp32 via Casts around it, no {'/'.join(d.lower() for d in blocked)} "
                        f"kernel: {why}")
    return messages



def static_values(model) -> set:
    """Values that depend on no graph input's data: initializers, constants, shapes, and what nodes
    compute from those alone (the exporter builds e.g. SDPA's is_causal mask this way, in fp32)."""
    static = set(model.graph.initializers.values())
    for node in model.graph:  # topological order
        if node.op_type in ("Shape", "Size") or all(v is None or v in static for v in node.inputs):
            static.update(v for v in node.outputs if v is not None)
    return static


def check_decisions(model, origin: dict) -> list[str]:
    """ONNX nodes whose floating inputs/outputs are not in the dtype the rewriter decided."""
    problems = []
    static = static_values(model)
    for node in model.graph:
        gm_node = origin.get(node)
        if gm_node is None or is_cast(node):
            continue
        if all(v is None or v in static for v in node.inputs):
            continue  # built from constants and shapes only (e.g. the causal mask of is_causal=True)
        decision = meta.get(gm_node, meta.DECISION)
        if not decision or gm_node.target in (torch.ops.aten._to_copy.default, fp8_linear_op):
            # a cast; or an FP8 GEMM, whose translation picks its own compute dtype (fp8.qdq_compute)
            continue
        want = meta.dtype_from_name(decision["dtype"])
        out_want = meta.value_dtype(gm_node)
        found = set()
        for v in node.inputs:
            if v is not None and dtype_str(v) in FLOATS:
                found.add(FLOATS[dtype_str(v)])
        outs = {FLOATS[dtype_str(v)] for v in node.outputs if dtype_str(v) in FLOATS}
        allowed = {want} | ({out_want} if out_want is not None else set())
        bad = (found | outs) - allowed
        if bad:
            problems.append(
                f"ONNX node '{node.name}' ({node.op_type}) computes with "
                f"{', '.join(sorted(meta.dtype_name(d) for d in bad))} but the rewriter decided "
                f"{decision['dtype']} for {describe_node(gm_node)} ({decision['rule']})")
    return problems

