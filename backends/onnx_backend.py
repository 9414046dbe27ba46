"""ONNX backend: export a converted GraphModule to ONNX and run it on ONNX Runtime.

The converted GraphModule already holds every precision decision: casts are `aten._to_copy` nodes and
weights are stored in their consumer's dtype. The export keeps those decisions as they are:

    converted gm --torch.export (batch dim dynamic)--> ExportedProgram
                 --torch.onnx.export(dynamo=True, optimize=False)--> ONNX IR
                 --cleanup: fold constants, basic rewrite rules (never batch-norm folding, which would
                   recompute 16-bit weights in another precision), Cast folding--> ONNX
                 --(optimize=True) ORT fusions, kept only when the precision check passes--> model.onnx

Before: x(fp32) -> _to_copy(fp16) -> linear(fp16) -> _to_copy(fp32) -> layer_norm(fp32)
After:  x(fp32) -> Cast(to=FLOAT16) -> MatMul/Add(fp16, fp16 initializers) -> Cast(to=FLOAT)
        -> LayerNormalization(fp32)

The fusions (optimize=True) live in backends/onnx_fusion.py: the onnxscript ORT fusions with our own
rewrites around them (flattened Gemms as MatMul, packed-QKV Attention, BERT's embeddings as one
EmbedLayerNormalization), then the onnxruntime.transformers optimizer, each kept only when it keeps the
precision decisions and the outputs.

Every ONNX node is renamed "<module path>/<fx node>[/<OpType>]" after the node of the converted
GraphModule it came from, so `rewrite diff` output and the ONNX graph can be read side by side.
After the export each ONNX node is checked against the DECISION of its fx node: a node that computes
in another dtype than the rewriter decided is reported (`ExportReport.precision_mismatches`).

Ops without a 16-bit kernel (the ONNX schema at the chosen opset does not allow the dtype, or the op is on
`DEFAULT_FP32_OPS`, onnxconverter-common's list of ops ONNX Runtime lacks fp16 kernels for) are kept in
fp32 with one Cast on each side, and the report says so, naming the node; with `fallback="error"` they
are refused with a `RewriterError`. An op that has no ONNX export at all is refused with a
`RewriterError` naming the fx node and its module.

Example:
    >>> fast = rewriter.convert(model, (ids,), precision="fp16")
    >>> report = rewriter.export_onnx(fast, "model.onnx", optimize=True)
    >>> print(report)
    >>> sess = ort_session("model.onnx", device="cuda")
    >>> logits, = sess(ids)
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import logging
import os
import re
import warnings
from typing import Any, Iterable

import torch
import torch.fx as fx

from rewriter.backends.onnx_fusion import _fuse
from rewriter import meta
from rewriter.errors import ConfigError, InputError, RewriterError, describe_node

__all__ = [
    "ExportReport", "OrtSession", "export_onnx", "ort_session", "count_casts", "cast_chains",
    "DEFAULT_FP32_OPS", "DEFAULT_OPSET",
]

DEFAULT_OPSET = 18
_BF16_OPSET = 22  # Conv, MaxPool and the pooling ops accept bfloat16 only from opset 22

# Ops ONNX Runtime has no fp16 kernel for on some execution providers, from onnxconverter-common's
# float16 DEFAULT_OP_BLOCK_LIST (the ML-domain ops there never see tensors from torch). Each is
# run in fp32 with a Cast on each side: for the exact ones (TopK, Max, Min, Range) the values are
# identical, for the others fp32 is at least as accurate.
DEFAULT_FP32_OPS = frozenset(
    {"NonMaxSuppression", "TopK", "RoiAlign", "Resize", "Upsample", "Range", "CumSum", "Min", "Max"})

_FLOATS = {"FLOAT": torch.float32, "FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16}
_LOWP_NAMES = ("FLOAT16", "BFLOAT16")
_FX_NODE_KEY = "pkg.torch.onnx.fx_node"
_RULE_KEY = "pkg.onnxscript.rewriter.rule_name"


# ---------------------------------------------------------------------------------------- report


@dataclasses.dataclass
class ExportReport:
    """What `export_onnx` wrote and what it did on the way.

    Attributes:
        path: the .onnx file.
        opset: ONNX opset of the default domain.
        precision: the converted model's precision ("fp16", "bf16").
        dynamic_batch: dimension 0 of the inputs is symbolic ("batch") in the file.
        inputs, outputs: (name, dtype, shape) of the graph inputs and outputs.
        ops_by_dtype: {dtype of the node's first floating output: {op_type: count}}; "none" for nodes
            without a floating output (shapes, indices, masks).
        cast_count: Cast nodes in the file; `float_casts` of them convert between float dtypes.
        casts_removed: Cast nodes removed by the cleanup (identities, chains, duplicates).
        cast_chains: Casts that read another Cast's output (0 unless a chain rounds on purpose).
        initializer_dtypes: {dtype: count} of the initializers.
        fallbacks: one message per node kept in fp32 because it has no 16-bit kernel.
        fusions: {fused op: count} added by `optimize=True`.
        fusion_notes: what each fusion step did, or why it was not applied.
        precision_mismatches: ONNX nodes computing in another dtype than the rewriter decided.
        notes: anything else worth knowing (static batch, ...).
    """

    path: str
    opset: int
    precision: str
    dynamic_batch: bool
    inputs: list = dataclasses.field(default_factory=list)
    outputs: list = dataclasses.field(default_factory=list)
    ops_by_dtype: dict = dataclasses.field(default_factory=dict)
    cast_count: int = 0
    float_casts: int = 0
    casts_removed: int = 0
    cast_chains: int = 0
    initializer_dtypes: dict = dataclasses.field(default_factory=dict)
    fallbacks: list = dataclasses.field(default_factory=list)
    fusions: dict = dataclasses.field(default_factory=dict)
    fusion_notes: list = dataclasses.field(default_factory=list)
    precision_mismatches: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"ONNX export -> {self.path} (opset {self.opset}, {self.precision}, "
                 f"batch {'dynamic' if self.dynamic_batch else 'static'})"]
        for kind, items in (("input", self.inputs), ("output", self.outputs)):
            for name, dtype, shape in items:
                lines.append(f"  {kind} {name}: {dtype} {shape}")
        for dtype, ops in self.ops_by_dtype.items():
            body = ", ".join(f"{op} {n}" for op, n in sorted(ops.items(), key=lambda kv: -kv[1]))
            lines.append(f"  {dtype}: {body}")
        lines.append(f"  casts: {self.cast_count} ({self.float_casts} between float dtypes, "
                     f"{self.casts_removed} removed by cleanup, {self.cast_chains} chains)")
        lines.append("  initializers: " + ", ".join(f"{k} {v}" for k, v in self.initializer_dtypes.items()))
        if self.fusions:
            lines.append("  fused: " + ", ".join(f"{k} {v}" for k, v in self.fusions.items()))
        lines += [f"  fusion: {n}" for n in self.fusion_notes]
        lines += [f"  fallback: {m}" for m in self.fallbacks]
        lines += [f"  precision mismatch: {m}" for m in self.precision_mismatches]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet():
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


def _dtype_str(value) -> str | None:
    dtype = getattr(value, "dtype", None)
    return None if dtype is None else dtype.name


def _is_cast(node) -> bool:
    return node.op_type == "Cast" and node.domain in ("", "ai.onnx")


def _cast_to(node):
    import onnx_ir as ir

    return ir.DataType(node.attributes["to"].as_int())


def count_casts(model) -> int:
    """Number of Cast nodes in an onnx.ModelProto, an onnx_ir.Model or a path."""
    return sum(1 for n in _proto_nodes(model) if n.op_type == "Cast")


def cast_chains(model) -> int:
    """Number of Cast nodes whose input is produced by another Cast (a 'Cast chain')."""
    nodes = list(_proto_nodes(model))
    cast_outputs = {o for n in nodes if n.op_type == "Cast" for o in n.output}
    return sum(1 for n in nodes if n.op_type == "Cast" and n.input and n.input[0] in cast_outputs)


def _proto_nodes(model):
    import onnx

    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model), load_external_data=False)
    if not isinstance(model, onnx.ModelProto):
        import onnx_ir as ir

        model = ir.serde.serialize_model(model)
    return model.graph.node


def _module_path(gm_node) -> str:
    return meta.module_path(gm_node) or ""


# ---------------------------------------------------------------------------------------- export


def _check_converted(gm) -> None:
    from rewriter.pipeline import is_converted

    if not isinstance(gm, fx.GraphModule) or not is_converted(gm):
        raise InputError(
            f"export_onnx expects the GraphModule returned by rewriter.convert, got "
            f"{type(gm).__name__}; convert first: fast = rewriter.convert(model, (x,), precision='fp16'), "
            "then rewriter.export_onnx(fast, 'model.onnx')")


def _example_inputs(gm, example_inputs) -> tuple[tuple, dict]:
    from rewriter.capture import normalize_inputs

    if example_inputs is not None:
        if isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(
                example_inputs[1], dict) and isinstance(example_inputs[0], tuple):
            return example_inputs
        return normalize_inputs(example_inputs, None)
    recorded = gm.meta.get(meta.EXAMPLE_INPUTS)
    if recorded is None:
        raise InputError("the converted model carries no example inputs (was it loaded from a file?): "
                         "pass example_inputs=(x,) to export_onnx")
    return recorded


def _precision(gm) -> str:
    from rewriter.pipeline import INFO_KEY

    return str(gm.meta.get(INFO_KEY, {}).get("config", {}).get("precision", "fp16"))


def _dynamic_shapes(gm, args, kwargs):
    from rewriter.capture import batch_dynamic_shapes

    return batch_dynamic_shapes(gm.forward, args, kwargs, torch.export.Dim("batch"))


def _reexport(gm, args, kwargs, dynamic: bool, notes: list[str]):
    """torch.export of the converted GraphModule; the batch dimension named 'batch' when dynamic."""
    if dynamic:
        try:
            with _quiet():
                return torch.export.export(gm, args, kwargs, dynamic_shapes=_dynamic_shapes(gm, args, kwargs),
                                           strict=False), True
        except Exception as exc:  # a model that fixes its batch size: export it static, and say so
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            notes.append(f"dynamic batch export failed ({first}); exported with the example batch size")
    try:
        with _quiet():
            return torch.export.export(gm, args, kwargs, strict=False), False
    except Exception as exc:
        raise RewriterError(
            f"torch.export could not re-trace the converted model for ONNX: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. Check that example_inputs "
            "are the inputs the model was converted with.") from exc


def _output_names(gm, n_outputs: int) -> list[str] | None:
    """Names of the flattened outputs from the model's output structure ('last_hidden_state', ...)."""
    import torch.utils._pytree as pytree

    spec = getattr(getattr(gm.graph, "_codegen", None), "pytree_info", None)
    spec = getattr(spec, "out_spec", None)
    if spec is None:
        return None
    try:
        leaves = pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(spec.num_leaves)), spec))[0]
    except Exception:  # an output type pytree cannot rebuild: keep the exporter's names
        return None
    if len(leaves) != n_outputs:
        return None
    if n_outputs == 1 and not leaves[0][0]:
        return ["output"]
    names = []
    for path, _ in leaves:
        text = re.sub(r"[^0-9A-Za-z_.]+", "_", pytree.keystr(path)).strip("_.")
        text = text if text and not text[0].isdigit() else f"output_{text or len(names)}"
        names.append(text)
    return names if len(set(names)) == len(names) else None


def _origin(ep_node, gm, by_name: dict) -> fx.Node | None:
    """The node of the converted GraphModule an exported node descends from (node.meta["from_node"])."""
    gid = id(gm.graph)

    def root(sources):
        for src in sources or ():
            found = root(getattr(src, "from_node", None))
            if found is not None:
                return found
            if getattr(src, "graph_id", gid) == gid and src.name in by_name:
                return by_name[src.name]
        return None

    return root(ep_node.meta.get("from_node"))


def _provenance(ep, gm) -> dict[str, fx.Node]:
    """Name of each node of an exported program -> node of the converted GraphModule it came from."""
    by_name = {n.name: n for n in gm.graph.nodes}
    mapping = {}
    for node in ep.graph.nodes:
        origin = _origin(node, gm, by_name)
        if origin is not None:
            mapping[node.name] = origin
    return mapping


def _to_onnx(ep, gm, opset: int, output_names):
    """torch.onnx.export of an ExportedProgram; an op without ONNX export is refused by name."""
    from torch.onnx import OnnxExporterError

    try:
        with _quiet():
            return torch.onnx.export(ep, (), dynamo=True, optimize=False, opset_version=opset,
                                     output_names=output_names, verbose=False, report=False)
    except OnnxExporterError as exc:
        text = str(exc)
        found = re.search(r"Error when translating node %(\S+)", text)
        why = re.search(r"No ONNX function found for ([^\n]+?)\.(?: Failure|\n|$)", text)
        gm_node = None
        if found:
            ep_node = next((n for n in ep.graph.nodes if n.name == found.group(1)), None)
            if ep_node is not None:
                gm_node = _origin(ep_node, gm, {n.name: n for n in gm.graph.nodes}) or ep_node
        where = describe_node(gm_node) if gm_node is not None else "a node of the model"
        reason = f"no ONNX export for {why.group(1)}" if why else text.strip().splitlines()[0][:200]
        raise RewriterError(
            f"ONNX export refused at {where}: {reason}. Fallback: none (refused). Register an ONNX "
            "translation with torch.onnx.export(custom_translation_table=...) or replace the op "
            "with supported torch ops, then export again.") from exc


def _simplify(model) -> None:
    """Constant folding, the basic rewrite rules and dead-code removal, without batch-norm folding."""
    import onnxscript.optimizer as optimizer
    import onnxscript.rewriter as rewriter_mod

    rules = [r for r in getattr(rewriter_mod, "_DEFAULT_REWRITE_RULES", ())
             if "BatchNorm" not in (getattr(r, "name", None) or "")]
    fold = getattr(optimizer, "fold_constants_ir", None) or getattr(optimizer, "fold_constants", None)
    with _quiet():
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
        _infer_types(model)


def _infer_types(model) -> None:
    """Fill in the dtype of every value (the report and the precision check read them)."""
    try:
        import onnx_ir.passes.common as common

        common.ShapeInferencePass()(model)
    except Exception:  # types recorded by the exporter are then all there is
        pass


def _name_batch_dim(model) -> None:
    """Call the symbolic batch dimension 'batch' everywhere instead of the exporter's 's43'."""
    import onnx_ir as ir

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


def _origin_map(model, onnx_ep, gm) -> dict[Any, fx.Node]:
    """ONNX node -> node of the converted GraphModule, through the exporter's fx node metadata."""
    by_ep = _provenance(onnx_ep, gm)
    origin = {}
    for node in model.graph:
        text = node.metadata_props.get(_FX_NODE_KEY, "")
        found = re.match(r"%(\S+)\s*:", text)
        if found and found.group(1) in by_ep:
            origin[node] = by_ep[found.group(1)]
    return origin


def _fold_casts(model) -> int:
    """Remove Casts that change no value; returns how many were removed.

    Rules (bit-exact): Cast to the input's own dtype -> input; Cast(Cast(x, A), B) where A holds every
    value of x -> Cast(x, B); two Casts of one value to one dtype -> one. A rounding chain
    (FLOAT -> FLOAT16 -> FLOAT) is kept.
    """
    import onnx_ir as ir

    width = {ir.DataType.FLOAT16: 1, ir.DataType.BFLOAT16: 1, ir.DataType.FLOAT: 2, ir.DataType.DOUBLE: 3}

    def holds(wide, narrow) -> bool:
        return wide == narrow or (wide in width and narrow in width and width[wide] > width[narrow])

    graph = model.graph
    removed = 0
    changed = True
    while changed:
        changed = False
        seen = {}
        for node in list(graph):
            if not _is_cast(node) or node.inputs[0] is None:
                continue
            src, out, want = node.inputs[0], node.outputs[0], _cast_to(node)
            producer = src.producer()
            if src.dtype == want and not out.is_graph_output():
                out.replace_all_uses_with(src)
            elif producer is not None and _is_cast(producer) and producer.inputs[0] is not None \
                    and holds(_cast_to(producer), producer.inputs[0].dtype):
                node.replace_input_with(0, producer.inputs[0])
                if not producer.outputs[0].uses() and not producer.outputs[0].is_graph_output():
                    graph.remove(producer, safe=True)
                    removed += 1
                changed = True
                continue
            elif (src, want) in seen and not out.is_graph_output():
                out.replace_all_uses_with(seen[(src, want)].outputs[0])
            else:
                seen[(src, want)] = node
                continue
            graph.remove(node, safe=True)
            removed += 1
            changed = True
    return removed


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
        if value is None or _dtype_str(value) != dtype_name or not formals:
            continue
        formal = formals[min(i, len(formals) - 1)]
        types = allowed.get(formal.type_str)
        if types is not None and want not in types:
            return False
    return True


def _fp32_fallbacks(model, opset: int, fp32_ops: frozenset, fallback: str, names: dict) -> list[str]:
    """Wrap 16-bit nodes without a 16-bit kernel in Casts to fp32 and back; one message per node."""
    import onnx_ir as ir

    messages = []
    graph = model.graph
    up_casts: dict[Any, Any] = {}
    for node in list(graph):
        if _is_cast(node):
            continue
        lowp = sorted({_dtype_str(v) for v in list(node.inputs) + list(node.outputs)
                       if v is not None and _dtype_str(v) in _LOWP_NAMES})
        if not lowp:
            continue
        blocked = [d for d in lowp if node.op_type in fp32_ops or not _schema_allows(node, opset, d)]
        if not blocked:
            continue
        label = names.get(node, node.name)
        why = ("on the list of ops ONNX Runtime lacks 16-bit kernels for" if node.op_type in fp32_ops
               else f"the ONNX schema of {node.op_type} at opset {opset} does not accept {blocked[0].lower()}")
        if fallback == "error":
            raise RewriterError(
                f"ONNX node '{label}' ({node.op_type}) runs in {blocked[0].lower()} but has no such kernel "
                f"({why}). Fallback: refused (fallback='error'). Keep its module in fp32 with an override "
                f"(overrides={{'{node.op_type.lower()}': 'fp32'}} or its module path) or export with "
                "fallback='fp32'.")
        for i, value in enumerate(list(node.inputs)):
            if value is None or _dtype_str(value) not in _LOWP_NAMES:
                continue
            producer = value.producer()
            if producer is not None and _is_cast(producer) and producer.inputs[0] is not None \
                    and _dtype_str(producer.inputs[0]) == "FLOAT":
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
            if _dtype_str(out) not in _LOWP_NAMES:
                continue
            low, lowp_output = out.dtype, out.is_graph_output()
            for use in list(out.uses()):  # consumers that cast to fp32 read the fp32 result directly
                user = use.node
                if not (_is_cast(user) and _cast_to(user) == ir.DataType.FLOAT):
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
            users = [u for u in out.uses()
                     if not (_is_cast(u.node) and _cast_to(u.node) == ir.DataType.FLOAT)]
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
        messages.append(f"ONNX node '{label}' ({node.op_type}) has no {'/'.join(d.lower() for d in blocked)} "
                        f"kernel ({why}): kept fp32 via Casts around it")
    return messages


def _rename_nodes(model, origin: dict) -> dict:
    """Name each node '<module path>/<fx node>[/<OpType>[_k]]'; returns node -> new name."""
    groups: dict[Any, list] = collections.defaultdict(list)
    for node in model.graph:
        if node in origin:
            groups[origin[node]].append(node)
    used: set[str] = {n.name for n in model.graph if n not in origin}
    names = {}
    for gm_node, nodes in groups.items():
        base = f"{_module_path(gm_node)}/{gm_node.name}".lstrip("/")
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


def _static_values(model) -> set:
    """Values that depend on no graph input's data: initializers, constants, shapes, and what nodes
    compute from those alone (the exporter builds e.g. SDPA's is_causal mask this way, in fp32)."""
    static = set(model.graph.initializers.values())
    for node in model.graph:  # topological order
        if node.op_type in ("Shape", "Size") or all(v is None or v in static for v in node.inputs):
            static.update(v for v in node.outputs if v is not None)
    return static


def _check_decisions(model, origin: dict) -> list[str]:
    """ONNX nodes whose floating inputs/outputs are not in the dtype the rewriter decided."""
    problems = []
    static = _static_values(model)
    for node in model.graph:
        gm_node = origin.get(node)
        if gm_node is None or _is_cast(node):
            continue
        if all(v is None or v in static for v in node.inputs):
            continue  # built from constants and shapes only (e.g. the causal mask of is_causal=True)
        decision = meta.get(gm_node, meta.DECISION)
        if not decision or gm_node.target is torch.ops.aten._to_copy.default:
            continue
        want = meta.dtype_from_name(decision["dtype"])
        out_want = meta.value_dtype(gm_node)
        found = set()
        for v in node.inputs:
            if v is not None and _dtype_str(v) in _FLOATS:
                found.add(_FLOATS[_dtype_str(v)])
        outs = {_FLOATS[_dtype_str(v)] for v in node.outputs if _dtype_str(v) in _FLOATS}
        allowed = {want} | ({out_want} if out_want is not None else set())
        bad = (found | outs) - allowed
        if bad:
            problems.append(
                f"ONNX node '{node.name}' ({node.op_type}) computes with "
                f"{', '.join(sorted(meta.dtype_name(d) for d in bad))} but the rewriter decided "
                f"{decision['dtype']} for {describe_node(gm_node)} ({decision['rule']})")
    return problems


def _summarize(model, report: ExportReport) -> None:
    ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for node in model.graph:
        dtype = next((_dtype_str(v) for v in node.outputs if _dtype_str(v) in _FLOATS), None)
        key = meta.dtype_name(_FLOATS[dtype]) if dtype else "none"
        ops[key][node.op_type] += 1
    report.ops_by_dtype = {k: dict(v) for k, v in sorted(ops.items())}
    casts = [n for n in model.graph if _is_cast(n)]
    report.cast_count = len(casts)
    report.float_casts = sum(1 for n in casts if n.inputs[0] is not None
                             and _dtype_str(n.inputs[0]) in _FLOATS and _cast_to(n).name in _FLOATS)
    report.cast_chains = sum(1 for n in casts if n.inputs[0] is not None and n.inputs[0].producer() is not None
                             and _is_cast(n.inputs[0].producer()))
    report.initializer_dtypes = dict(collections.Counter(
        v.dtype.name for v in model.graph.initializers.values() if v.dtype is not None))

    def describe(v):
        dims = [str(d) for d in (v.shape.dims if v.shape is not None else ())]
        return (v.name, meta.dtype_name(_FLOATS[v.dtype.name]) if v.dtype.name in _FLOATS else v.dtype.name.lower(),
                "[" + ", ".join(dims) + "]")

    report.inputs = [describe(v) for v in model.graph.inputs]
    report.outputs = [describe(v) for v in model.graph.outputs]


def _feeds(model, args, kwargs, dynamic: bool) -> dict:
    """Example inputs as an ONNX Runtime feed (batch of 1 when the batch is dynamic, to stay cheap)."""
    import torch.utils._pytree as pytree

    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    names = [v.name for v in model.graph.inputs]
    if len(tensors) != len(names):
        return {}
    feed = {}
    for name, t in zip(names, tensors):
        t = t[:1] if dynamic and t.dim() >= 1 else t
        feed[name] = t.detach().cpu().numpy()
    return feed


# ---------------------------------------------------------------------------------------- entry


def export_onnx(converted: fx.GraphModule, path: str | os.PathLike, *, opset: int | None = None,
                dynamic_batch: bool = True, optimize: bool = False, fallback: str = "fp32",
                fp32_ops: Iterable[str] | None = None, example_inputs: Any = None,
                assume_right_padding: bool = False) -> ExportReport:
    """Export a converted model to ONNX with its precision decisions unchanged.

    Args:
        converted: the GraphModule returned by `rewriter.convert`.
        path: where to write the .onnx file (weights over 2 GB go to `<path>.data` beside it).
        opset: ONNX opset; default 18, or 22 when the model holds bfloat16 tensors (Conv and the pooling
            ops accept bfloat16 only from 22).
        dynamic_batch: dimension 0 of every input is symbolic ("batch") when the model allows it.
        optimize: apply ONNX Runtime fusions (attention, skip layer norm, GELU, BERT embeddings) where
            they keep the precision decisions; what was fused, or why not, is in the report
            (backends/onnx_fusion.py).
        fallback: "fp32" keeps 16-bit nodes that have no 16-bit kernel in fp32 with Casts around them;
            "error" refuses them with a RewriterError.
        fp32_ops: ONNX op types to treat as having no 16-bit kernel (default `DEFAULT_FP32_OPS`).
        example_inputs: inputs to trace with when the model does not carry the ones it was converted
            with (a model loaded from a file).
        assume_right_padding: with optimize=True, attention whose mask is the key padding mask of a 2-D
            input (BERT's attention_mask) reads ONNX Runtime's 1-D mask_index (valid length per row),
            its faster variable-length path, as the onnxruntime.transformers optimizer does. Only
            correct when every row is padded at its end; left-padded rows then give wrong outputs
            (backends/onnx_padding.py). Off by default: the exact mask is kept.

    Returns:
        ExportReport: inputs/outputs, ops per dtype, Cast counts, fallbacks, fusions.

    Raises:
        InputError: `converted` is not a converted model, or no example inputs are known.
        ConfigError: an invalid opset or fallback.
        RewriterError: an op has no ONNX export, or a node has no 16-bit kernel with fallback="error".

    Example:
        >>> report = rewriter.export_onnx(fast, "bert-fp16.onnx", optimize=True)
        >>> report.cast_chains
        0
    """
    import onnx

    _check_converted(converted)
    if fallback not in ("fp32", "error"):
        raise ConfigError(f"fallback={fallback!r}: write fallback='fp32' (keep such nodes in fp32 with "
                          "Casts around them) or fallback='error' (refuse them)")
    precision = _precision(converted)
    has_bf16 = any(meta.value_dtype(n) == torch.bfloat16 for n in converted.graph.nodes)
    if opset is None:
        opset = _BF16_OPSET if has_bf16 else DEFAULT_OPSET
    if not isinstance(opset, int) or not 18 <= opset <= onnx.defs.onnx_opset_version():
        raise ConfigError(f"opset={opset!r}: write an integer from 18 (the exporter's base opset) to "
                          f"{onnx.defs.onnx_opset_version()} (the newest this onnx knows)")
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"cannot write {path!r}: the folder {parent!r} does not exist")
    fp32_set = DEFAULT_FP32_OPS if fp32_ops is None else frozenset(fp32_ops)

    args, kwargs = _example_inputs(converted, example_inputs)
    notes: list[str] = []
    from rewriter.pipeline import INFO_KEY

    captured_dynamic = converted.meta.get(INFO_KEY, {}).get("dynamic_batch", True)
    if dynamic_batch and not captured_dynamic:
        notes.append("the converted model has a static batch dimension (see its capture notes): "
                     "exported with the example batch size")
    ep, dynamic = _reexport(converted, args, kwargs, dynamic_batch and captured_dynamic, notes)
    with _quiet():
        n_out = len(ep.graph_signature.user_outputs)
    program = _to_onnx(ep, converted, opset, _output_names(converted, n_out))
    model = program.model
    onnx_ep = getattr(program, "exported_program", None) or ep

    _simplify(model)
    origin = _origin_map(model, onnx_ep, converted)
    names = _rename_nodes(model, origin)
    if dynamic:
        _name_batch_dim(model)
    report = ExportReport(path=path, opset=opset, precision=precision, dynamic_batch=dynamic, notes=notes)
    report.precision_mismatches = _check_decisions(model, origin)
    report.fallbacks = _fp32_fallbacks(model, opset, fp32_set, fallback, names)
    report.casts_removed = _fold_casts(model)
    for message in report.fallbacks + report.precision_mismatches:
        warnings.warn(message, stacklevel=2)
    if assume_right_padding and not optimize:
        raise ConfigError("assume_right_padding=True needs optimize=True: it rewrites ONNX Runtime's fused "
                          "Attention nodes")
    if optimize:
        feeds = _feeds(model, args, kwargs, dynamic)
        model = _fuse(model, converted, report, feeds)
        if assume_right_padding:
            report.fusion_notes.append(_right_padding(model, feeds))
    _summarize(model, report)
    _save(model, path)
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as exc:
        raise RewriterError(f"the exported model {path} fails onnx.checker ({str(exc).strip()[:300]}); this "
                            "is a bug in the ONNX backend, please report it with the model") from exc
    return report


def _right_padding(model, feeds: dict) -> str:
    """Apply backends/onnx_padding.use_mask_index when the example masks are right-padded; the note."""
    from rewriter.backends.onnx_padding import is_right_padded, use_mask_index

    names = {v.name for v in model.graph.inputs}
    masks = {k: v for k, v in feeds.items() if k in names and getattr(v, "ndim", 0) == 2}
    done = use_mask_index(model) if all(is_right_padded(v) for v in masks.values()) else None
    if done is None:
        return ("assume_right_padding: not applied, an example attention mask is not right-padded "
                "(rows must be ones followed by zeros)")
    if not done:
        return "assume_right_padding: no attention reads a key padding mask of an input; nothing changed"
    return (f"assume_right_padding: attention reads the valid length of each row of {', '.join(done)} "
            "(mask_index) instead of the mask: correct only for right-padded rows")


def _save(model, path: str) -> None:
    import onnx_ir as ir

    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if size > 1_800_000_000:
        data = os.path.basename(path) + ".data"
        ir.save(model, path, external_data=data)
    else:
        ir.save(model, path)


# ---------------------------------------------------------------------------------------- runtime


def _ort_package() -> str:
    """'onnxruntime-gpu 1.31.1' (or whichever distribution provides the onnxruntime module)."""
    from importlib import metadata

    for dist in ("onnxruntime-gpu", "onnxruntime", "onnxruntime-directml", "onnxruntime-openvino",
                 "onnxruntime-training", "ort-nightly-gpu", "ort-nightly"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__} (package unknown)"


_DATA_MOVEMENT = frozenset("Reshape Transpose Squeeze Unsqueeze Slice Concat Gather GatherElements GatherND "
                           "Expand Identity Flatten Split Tile Pad Shape".split())
_NOT_IMPLEMENTED = re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'")


class OrtSession:
    """An ONNX Runtime session, ready to run; IO binding on CUDA.

    Call it with the model's inputs (positional in graph-input order, or by name; numpy arrays or torch
    tensors): it returns the outputs as numpy arrays. `bind(...)` + `run_bound()` run repeatedly on
    inputs already on the device without copies (what a benchmark times).

    Attributes:
        session: the onnxruntime.InferenceSession.
        device: "cuda" or "cpu".
        fallbacks: nodes ONNX Runtime itself runs in fp32 because the execution provider has no
            16-bit kernel for them (CPU EP: found from the casts it inserts).
    """

    def __init__(self, session, device: str, fallbacks: list[str]):
        self.session = session
        self.device = device
        self.fallbacks = fallbacks
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self._binding = None
        self._keep: list = []

    def _feed(self, args, kwargs) -> dict:
        if len(args) > len(self.input_names):
            raise InputError(f"the model takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                             f"got {len(args)} positional")
        feed = dict(zip(self.input_names, args))
        unknown = set(kwargs) - set(self.input_names)
        if unknown:
            raise InputError(f"unknown input(s) {sorted(unknown)}; the model's inputs are {self.input_names}")
        feed.update(kwargs)
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise InputError(f"missing input(s) {missing}; the model's inputs are {self.input_names}")
        return feed

    @staticmethod
    def _numpy(value):
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
        return value

    def __call__(self, *args, **kwargs) -> list:
        feed = self._feed(args, kwargs)
        if self.device == "cpu":
            return self.session.run(None, {k: self._numpy(v) for k, v in feed.items()})
        self.bind(*args, **kwargs)
        self.run_bound()
        return self._binding.copy_outputs_to_cpu()

    def bind(self, *args, **kwargs) -> None:
        """Place the inputs on the session's device and bind them and the outputs (CUDA: IO binding)."""
        import numpy as np
        import onnxruntime as ort

        feed = self._feed(args, kwargs)
        binding = self.session.io_binding()
        self._keep = []
        device = "cuda" if self.device == "cuda" else "cpu"
        for name, value in feed.items():
            if isinstance(value, torch.Tensor) and value.is_cuda and device == "cuda":
                value = value.contiguous()
                self._keep.append(value)
                binding.bind_input(name, "cuda", value.device.index or 0,
                                   np.dtype(str(value.dtype).replace("torch.", "")), list(value.shape),
                                   value.data_ptr())
            else:
                ortvalue = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(self._numpy(value)), device, 0)
                self._keep.append(ortvalue)
                binding.bind_ortvalue_input(name, ortvalue)
        for name in self.output_names:
            binding.bind_output(name, device)
        self._binding = binding

    def run_bound(self) -> None:
        """Run on the bound inputs; returns when the outputs are ready."""
        if self._binding is None:
            raise InputError("call bind(...) with the inputs before run_bound()")
        self.session.run_with_iobinding(self._binding)
        self._binding.synchronize_outputs()

    def bound_outputs(self) -> list:
        """Outputs of the last run_bound(), as numpy arrays."""
        return self._binding.copy_outputs_to_cpu()


def _cpu_fallbacks(optimized_path: str, original_path: str) -> list[str]:
    """Nodes the CPU EP runs in fp32 because it has no fp16 kernel: consumers of its inserted casts."""
    import onnx

    try:
        model = onnx.load(optimized_path, load_external_data=False)
        original = onnx.load(original_path, load_external_data=False)
    except Exception:
        return []
    # ORT renames or fuses some nodes: name them after the node of the exported file with that output
    by_output = {o: n.name for n in original.graph.node for o in n.output}
    # ORT casts fp16 inputs up before a node without an fp16 kernel and its outputs back down, then
    # moves those casts across ops that only move data: so look for compute ops between the two kinds.
    up, down = set(), set()
    for n in model.graph.node:
        if n.op_type == "Cast" and n.name.startswith("InsertedPrecisionFreeCast_"):
            to = next((a.i for a in n.attribute if a.name == "to"), None)
            (up if to == 1 else down).update(n.output if to == 1 else n.input)
    found = collections.OrderedDict()
    for n in model.graph.node:
        if n.op_type == "Cast" or n.op_type in _DATA_MOVEMENT:
            continue
        if any(i in up for i in n.input) or any(o in down for o in n.output):
            outs = [o.replace("InsertedPrecisionFreeCast_", "", 1) for o in n.output]
            name = next((by_output[o] for o in outs if o in by_output), n.name) or n.output[0]
            found.setdefault(name, n.op_type)
    return [f"ONNX node '{name}' ({op}) has no float16 kernel on the CPU execution provider: ONNX Runtime "
            "runs it in fp32 via Casts it inserts (kept fp32)" for name, op in found.items()]


def ort_session(path: str | os.PathLike, device: str = "cuda", *, device_id: int = 0,
                threads: int | None = None, profile_prefix: str | None = None) -> OrtSession:
    """A ready ONNX Runtime session for an exported model.

    Args:
        path: the .onnx file written by `export_onnx`.
        device: "cuda" (CUDA execution provider, IO binding) or "cpu".
        device_id: the GPU to use with device="cuda".
        threads: intra-op threads (default: ONNX Runtime's choice).
        profile_prefix: turn ONNX Runtime's profiler on, writing its trace to files starting with this
            path (`session.session.end_profiling()` returns the file; tools/profile_onnx.py reads it).

    Returns:
        OrtSession; call it with the model's inputs.

    Raises:
        RewriterError: the CUDA EP is not available in the installed onnxruntime package (the message
            names the package and says what to install), or the EP has no kernel for a node (the message
            names the node; nothing is run).

    Example:
        >>> sess = ort_session("bert-fp16.onnx", device="cuda")
        >>> hidden, pooled = sess(input_ids, attention_mask)
    """
    import tempfile

    import onnxruntime as ort

    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device={device!r}: write device='cuda' or device='cpu'")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"no ONNX model at {path!r}: write one with rewriter.export_onnx(converted, path)")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    tmp = None
    if device == "cuda":
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise RewriterError(
                f"ONNX Runtime has no CUDA execution provider here: the installed package is {_ort_package()}, "
                f"whose providers are {', '.join(available)}. Install the GPU build: "
                "pip uninstall -y onnxruntime && pip install onnxruntime-gpu (or pip install 'rewriter[gpu]'), "
                "with CUDA 12 and cuDNN 9 libraries on the library path; or use device='cpu'.")
        if hasattr(ort, "preload_dlls"):
            with contextlib.suppress(Exception):
                ort.preload_dlls()
        providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
        tmp = tempfile.NamedTemporaryFile(suffix=".onnx", delete=False)
        tmp.close()
        options.optimized_model_filepath = tmp.name
    try:
        try:
            session = ort.InferenceSession(path, options, providers=providers)
        except Exception as exc:
            found = _NOT_IMPLEMENTED.search(str(exc))
            if found:
                op, version, node = found.groups()
                raise RewriterError(
                    f"ONNX Runtime ({_ort_package()}, {device} EP) has no kernel for {op}-{version} node "
                    f"'{node}' with these input dtypes. Fallback: none (refused). Keep that module in fp32 "
                    "with an override, export with precision='fp16' (bfloat16 kernels are rare outside the "
                    "CUDA EP) or run on device='cuda'.") from exc
            raise RewriterError(f"ONNX Runtime could not load {path}: {str(exc).strip()[:300]}") from exc
        if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
            raise RewriterError(
                f"the CUDA execution provider of {_ort_package()} failed to start (session runs on "
                f"{session.get_providers()}): check that the CUDA and cuDNN libraries it needs are installed; "
                "onnxruntime.preload_dlls() loads the ones shipped with torch.")
        fallbacks = _cpu_fallbacks(tmp.name, path) if tmp is not None else []
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp.name)
    return OrtSession(session, device, fallbacks)
