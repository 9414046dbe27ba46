"""ExportReport: what `export_onnx` wrote and what it did on the way; Cast counters for any ONNX file."""
from __future__ import annotations

import collections
import dataclasses
import os

import onnx
import onnx_ir as ir

from rewriter import meta
from rewriter.backends.onnx.common import FLOATS, cast_to, dtype_str, is_cast

__all__ = ["ExportReport", "count_casts", "cast_chains", "summarize"]


@dataclasses.dataclass
class ExportReport:
    """What `export_onnx` wrote and what it did on the way.

    Attributes:
        path: the .onnx file.
        opset: ONNX opset of the default domain.
        precision: the converted model's precision ("fp16", "bf16").
        dynamic_batch: dimension 0 of the inputs is symbolic ("batch") in the file.
        symbolic_sizes: the inputs' other symbolic dimensions, as 'input[axis]' ('input_ids[1]': the file
            accepts any sequence length).
        inputs, outputs: (name, dtype, shape) of the graph inputs and outputs.
        ops_by_dtype: {dtype of the node's first floating output: {op_type: count}}; "none" for nodes
            without a floating output (shapes, indices, masks).
        cast_count: Cast nodes in the file; `float_casts` of them convert between float dtypes.
        casts_removed: Cast nodes removed by the cleanup (identities, chains, duplicates).
        cast_chains: Casts that read another Cast's output (0 unless a chain rounds on purpose).
        initializer_dtypes: {dtype: count} of the initializers.
        target: the execution provider the file is for, and why that one ("ort-cpu (asked for)").
        fallbacks: one message per node computed in fp32 because the target has no 16-bit kernel for it
            (the reason is also on the converted model's node.meta[TARGET], shown by `rewrite diff`).
        cast_rules: {Cast-folding rule: Casts it removed} (folding.CAST_RULES).
        fp8_gemms: {"count": FP8 GEMMs, "form": "qdq" | "com.microsoft"} for precision="fp8" models.
        fusions: {fused op: count} added by `optimize=True`.
        fusion_notes: what each fusion step did, or why it was not applied.
        precision_mismatches: ONNX nodes computing in another dtype than the rewriter decided.
        notes: anything else worth knowing (static batch, ...).
    """

    path: str
    opset: int
    precision: str
    dynamic_batch: bool
    target: str = ""
    symbolic_sizes: list = dataclasses.field(default_factory=list)
    inputs: list = dataclasses.field(default_factory=list)
    outputs: list = dataclasses.field(default_factory=list)
    ops_by_dtype: dict = dataclasses.field(default_factory=dict)
    cast_count: int = 0
    float_casts: int = 0
    casts_removed: int = 0
    cast_chains: int = 0
    initializer_dtypes: dict = dataclasses.field(default_factory=dict)
    fallbacks: list = dataclasses.field(default_factory=list)
    cast_rules: dict = dataclasses.field(default_factory=dict)
    fp8_gemms: dict = dataclasses.field(default_factory=dict)
    fusions: dict = dataclasses.field(default_factory=dict)
    fusion_notes: list = dataclasses.field(default_factory=list)
    precision_mismatches: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"ONNX export -> {self.path} (opset {self.opset}, {self.precision}, "
                 f"batch {'dynamic' if self.dynamic_batch else 'static'}, target {self.target})"]
        if self.symbolic_sizes:
            lines.append(f"  symbolic sizes: {', '.join(self.symbolic_sizes)}")
        for kind, items in (("input", self.inputs), ("output", self.outputs)):
            for name, dtype, shape in items:
                lines.append(f"  {kind} {name}: {dtype} {shape}")
        for dtype, ops in self.ops_by_dtype.items():
            body = ", ".join(f"{op} {n}" for op, n in sorted(ops.items(), key=lambda kv: -kv[1]))
            lines.append(f"  {dtype}: {body}")
        lines.append(f"  casts: {self.cast_count} ({self.float_casts} between float dtypes, "
                     f"{self.casts_removed} removed by cleanup, {self.cast_chains} chains)")
        lines.append("  initializers: " + ", ".join(f"{k} {v}" for k, v in self.initializer_dtypes.items()))
        if self.fp8_gemms:
            lines.append(f"  FP8 GEMMs: {self.fp8_gemms['count']} as {self.fp8_gemms['form']}")
        if self.fusions:
            lines.append("  fused: " + ", ".join(f"{k} {v}" for k, v in self.fusions.items()))
        lines += [f"  fusion: {n}" for n in self.fusion_notes]
        lines += [f"  fallback: {m}" for m in self.fallbacks]
        lines += [f"  precision mismatch: {m}" for m in self.precision_mismatches]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)



def count_casts(model) -> int:
    """Number of Cast nodes in an onnx.ModelProto, an onnx_ir.Model or a path."""
    return sum(1 for n in _proto_nodes(model) if n.op_type == "Cast")


def cast_chains(model) -> int:
    """Number of Cast nodes whose input is produced by another Cast (a 'Cast chain')."""
    nodes = list(_proto_nodes(model))
    cast_outputs = {o for n in nodes if n.op_type == "Cast" for o in n.output}
    return sum(1 for n in nodes if n.op_type == "Cast" and n.input and n.input[0] in cast_outputs)


def _proto_nodes(model):
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model), load_external_data=False)
    if not isinstance(model, onnx.ModelProto):
        model = ir.serde.serialize_model(model)
    return model.graph.node



def summarize(model, report: ExportReport) -> None:
    ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for node in model.graph:
        dtype = next((dtype_str(v) for v in node.outputs if dtype_str(v) in FLOATS), None)
        key = meta.dtype_name(FLOATS[dtype]) if dtype else "none"
        ops[key][node.op_type] += 1
    report.ops_by_dtype = {k: dict(v) for k, v in sorted(ops.items())}
    casts = [n for n in model.graph if is_cast(n)]
    report.cast_count = len(casts)
    report.float_casts = sum(1 for n in casts if n.inputs[0] is not None
                             and dtype_str(n.inputs[0]) in FLOATS and cast_to(n).name in FLOATS)
    report.cast_chains = sum(1 for n in casts if n.inputs[0] is not None and n.inputs[0].producer() is not None
                             and is_cast(n.inputs[0].producer()))
    report.initializer_dtypes = dict(collections.Counter(
        v.dtype.name for v in model.graph.initializers.values() if v.dtype is not None))

    def describe(v):
        dims = [str(d) for d in (v.shape.dims if v.shape is not None else ())]
        return (v.name, meta.dtype_name(FLOATS[v.dtype.name]) if v.dtype.name in FLOATS else v.dtype.name.lower(),
                "[" + ", ".join(dims) + "]")

    report.inputs = [describe(v) for v in model.graph.inputs]
    report.outputs = [describe(v) for v in model.graph.outputs]

