"""The only place where node.meta keys of the rewriter are defined, read and written.

Every annotation is a small JSON-able dict so that it survives `torch.export.save` (it is copied into
`node.meta["custom"]` on save) and can be shown by `rewrite diff` without the original objects.

Keys:
    OP_CLASS   analysis/classify: {"class": "lowp|fp32|follow|promote|untouched", "exact": bool, "reason"}
    DECISION   analysis/assign:   {"dtype": "float16", "rule": "...", "reason": "..."} compute dtype
    RANGE      analysis/ranges:   {"amax", "min_nonzero", "nonfinite", "batches", ...}; with
               "keep": dtype name and "reason" on nodes whose range does not fit the target format
    SENSITIVITY analysis/sensitivity: {"error": float, "kept_fp32": bool, ...}; with "keep" and
               "reason" on the nodes the accuracy-budget search keeps in fp32; analysis/lowering adds
               "lower": dtype name and "reason" on policy-fp32 nodes the budget affords in low precision
               (assign's rule "budget-lowered"), "lower_tried": True on those measured too costly
    DTYPE      rewrite passes:    dtype name of the node's tensor output after the rewrite
    CREATED    rewrite passes:    {"pass": "...", "reason": "..."} on nodes a pass created
    FP8        analysis/fp8_cost: {"use": bool, "rule", "reason", "m", "n", "k", "est_speedup", ...} on
               every tensor-core op (why it is, or is not, an FP8 GEMM); rewrite/fp8 adds
               {"scale": 448/(amax*margin) | None, "mode": "static|dynamic", "emulated": bool, ...};
               in training graphs also {"training": True, "grad_dtype": "float8_e5m2", ...}
    REWRITTEN  rewrite passes:    [{"pass": "...", "reason": "..."}] on existing nodes a pass changed
    AUTOCAST   rewriter/autocast_regions (capture): {"enabled", "dtype", "device", "module", "source"}
               on every node inside a torch.autocast region of the model (innermost region wins);
               analysis/assign applies it (rule "autocast-region")
    TARGET     target/ort_kernels (run by export_onnx): {"target": "ort-cpu", "dtype": "float32", "rule",
               "reason"} on nodes the export target runs in another dtype than DECISION (no kernel there)
    ORIGIN     rewriter/io.save:  {"name", "dtype"} of the node in the converted graph before saving
               (re-export renames nodes and re-traces meta["val"], so the fp32 dtype is kept here)

Graph-level key (GraphModule.meta, not node.meta):
    FP8        analysis/fp8_cost + rewrite/fp8: {"target", "options", "planned", "kept": {node: reason},
               "converted", "weight_bytes_fp8", "scale_bytes", "emulated", "emulation"} (same key string)
    CALIBRATION analysis/ranges + sensitivity + lowering: {"ranges": {...}, "sensitivity": {...},
               "lowering": {...}} summaries
               (batches, seconds, forward runs, kept nodes, error on search and held-out batches)
    INFO       pipeline.convert: the conversion record {"config", "capture", "dynamic_batch", "notes", "model"}
    EXAMPLE_INPUTS pipeline.convert / io.load: (args, kwargs) the model was captured with
    FAST_FORWARD backends/fast_forward: {"ops_bound", "ops_kept"}
    INPUT_SHAPES rewriter/capture_inputs: [{"name", "dims": [int | {"symbol", "min", "max"} | {"expr"}], "dtype", "exact_dtype"}]
               per graph input, as captured (what InputCheck enforces)
    CALL_SIGNATURE rewriter/capture_inputs: {"params": [[name, kind, has_default]], "args", "kwargs"}
               the original forward's signature and the captured input names (positional/keyword calls)
    GENERATION_STEP rewriter/generation (capture): "prefill" | "decode" on the step graphs of a converted
               causal LM; plan/fp8_cost judges a decode graph's GEMMs by the weight bytes they read
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "OP_CLASS", "DECISION", "RANGE", "SENSITIVITY", "DTYPE", "CREATED", "FP8", "REWRITTEN", "ALL_KEYS",
    "get", "put", "module_path", "value_dtype", "dtype_name", "dtype_from_name", "is_float_dtype",
    "numel_hint", "to_custom", "from_custom", "ORIGIN", "origin", "CALIBRATION", "INFO", "EXAMPLE_INPUTS",
    "FAST_FORWARD", "GRAPH_KEYS", "AUTOCAST", "TARGET", "INPUT_SHAPES", "CALL_SIGNATURE", "GENERATION_STEP",
    "is_generative",
]

OP_CLASS = "rewriter.op_class"
DECISION = "rewriter.decision"
RANGE = "rewriter.range"
SENSITIVITY = "rewriter.sensitivity"
DTYPE = "rewriter.dtype"
CREATED = "rewriter.created"
FP8 = "rewriter.fp8"
ORIGIN = "rewriter.origin"
REWRITTEN = "rewriter.rewritten"
AUTOCAST = "rewriter.autocast"
TARGET = "rewriter.target"
ALL_KEYS = (OP_CLASS, DECISION, RANGE, SENSITIVITY, DTYPE, CREATED, FP8, ORIGIN, REWRITTEN, AUTOCAST, TARGET)

# GraphModule.meta keys (graph-level, not node keys): every one the project writes is defined here.
CALIBRATION = "rewriter.calibration"        # measurement summaries (ranges, sensitivity)
INFO = "rewriter"                           # the conversion record: config, capture, notes, model name
EXAMPLE_INPUTS = "rewriter.example_inputs"  # (args, kwargs) of the capture, for diff/bench/ONNX export
FAST_FORWARD = "rewriter.fast_forward"      # backends/fast_forward: ops bound, ops kept
INPUT_SHAPES = "rewriter.input_shapes"     # capture_inputs: captured shapes of the graph inputs
CALL_SIGNATURE = "rewriter.call_signature"  # capture_inputs: the forward's signature, captured names
GENERATION_STEP = "rewriter.generation_step"  # generation: "prefill" | "decode" step graph
GRAPH_KEYS = (CALIBRATION, INFO, EXAMPLE_INPUTS, FAST_FORWARD, FP8, INPUT_SHAPES, CALL_SIGNATURE, GENERATION_STEP)

_CUSTOM = "custom"  # torch.export serialises node.meta["custom"]; we nest ours under "rewriter"


def get(node, key: str, default: Any = None) -> Any:
    return node.meta.get(key, default)


def put(node, key: str, value: Any) -> None:
    if key not in ALL_KEYS:
        raise KeyError(f"unknown rewriter meta key {key!r}; define it in rewriter/meta.py")
    node.meta[key] = value


def module_path(node) -> str | None:
    """Dotted path of the innermost module that produced `node` ("encoder.layer.0.attention")."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return _clean_path(path)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    if node.op == "call_module":
        return str(node.target)
    return None


def _clean_path(path: str) -> str:
    # strict-mode export writes "L['self'].encoder.layer[0]"; normalise to "encoder.layer.0"
    path = path.replace("L['self'].", "").replace("L['self']", "")
    path = path.replace("[", ".").replace("]", "").replace("'", "")
    return path.strip(".")


_NAMES = {
    torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
    torch.float64: "float64", torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2",
}


def dtype_name(dtype: torch.dtype | None) -> str | None:
    if dtype is None:
        return None
    return _NAMES.get(dtype, str(dtype).replace("torch.", ""))


def dtype_from_name(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    return getattr(torch, name)


def is_float_dtype(dtype: torch.dtype | None) -> bool:
    """fp32/fp16/bf16: the dtypes the rewriter decides about (fp64 and fp8 are left as they are)."""
    return dtype in (torch.float32, torch.float16, torch.bfloat16)


def _val(node):
    val = node.meta.get("val")
    if val is None:
        val = node.meta.get("tensor_meta")
    return val


def value_dtype(node) -> torch.dtype | None:
    """dtype of the tensor a node produces now (after rewrites), None for non-tensors and tuples."""
    if DTYPE in node.meta:
        return dtype_from_name(node.meta[DTYPE])
    val = _val(node)
    dtype = getattr(val, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


def numel_hint(node) -> int:
    """Number of elements of the node's tensor, symbolic sizes replaced by their example value."""
    val = _val(node)
    shape = getattr(val, "shape", None)
    if shape is None:
        return 0
    total = 1
    for size in shape:
        try:
            total *= int(size)
        except Exception:  # unbacked or symbolic without hint
            hint = getattr(getattr(size, "node", None), "hint", None)
            total *= int(hint) if hint is not None else 8
    return total


def origin(node) -> tuple[str, str | None]:
    """(name, dtype name) the node had when it was converted: ORIGIN after a save/load round trip,
    else the node's own name and the dtype in meta["val"] (which the rewrite passes never change)."""
    record = node.meta.get(ORIGIN)
    if record:
        return record["name"], record.get("dtype")
    val = _val(node)
    dtype = getattr(val, "dtype", None)
    return node.name, dtype_name(dtype) if isinstance(dtype, torch.dtype) else None


def to_custom(node) -> None:
    """Copy the rewriter's annotations into node.meta["custom"] so torch.export.save keeps them."""
    ours = {key: node.meta[key] for key in ALL_KEYS if key in node.meta}
    if ours:
        node.meta.setdefault(_CUSTOM, {})["rewriter"] = ours


def from_custom(node) -> None:
    """Inverse of `to_custom`, after torch.export.load."""
    ours = (node.meta.get(_CUSTOM) or {}).get("rewriter") or {}
    for key, value in ours.items():
        if key in ALL_KEYS:
            node.meta[key] = value


def is_generative(model) -> bool:
    """True for a converted causal LM that generates (rewriter/generation_model.GenerativeLM): its
    `decode_graph` carries GENERATION_STEP "decode". Recognized without importing transformers."""
    graph = getattr(model, "decode_graph", None)
    return isinstance(getattr(graph, "meta", None), dict) and graph.meta.get(GENERATION_STEP) == "decode" \
        and hasattr(model, "prefill_graph")
