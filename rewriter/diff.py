"""rewriter.diff(before, after): what a conversion changed, node by node, and why.

    >>> fast = rewriter.convert(model, (x,), precision="fp16")
    >>> d = rewriter.diff(model, fast)
    >>> print(d)                      # summary and the changed nodes, one line each
    >>> d.to_json()                   # one entry per changed node, each with its reason
    >>> d.to_html()                   # self-contained page: summary, sortable table, graph picture

Most of what the diff shows is already on the converted graph: every node carries the decision that
set its precision (rule and reason), casts and weight copies say which pass made them and why, and
each node knows the dtype it had before (meta["val"], or meta.ORIGIN after a save/load round trip).
`before` adds what only it knows: its parameter bytes, and the casts of the original graph that the
conversion removed (found by capturing `before` with the example inputs the conversion recorded).

Before: x -> linear(fp32) -> layer_norm(fp32)
After:  x -> +cast(fp16) -> linear(fp32 -> fp16, op-table) -> +cast(fp32) -> layer_norm(fp32, kept)
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from rewriter import meta
from rewriter.backends.torch_backend import is_converted
from rewriter.capture import capture
from rewriter.errors import InputError
from rewriter.io import load
from rewriter.passes.graph_utils import is_cast
from rewriter.passes.op_tables import op_name
from rewriter.diff_text import fp8_counts
from rewriter.diff_types import Diff, NodeDiff, Summary
from rewriter.report import format_bytes, short_dtype

__all__ = ["diff", "Diff", "NodeDiff", "Summary", "short_dtype", "format_bytes", "parameter_bytes"]


# ---------------------------------------------------------------------- building the diff


def _op_name(node: fx.Node) -> str:
    info = meta.get(node, meta.OP_CLASS)
    if info and info.get("op"):
        return str(info["op"])
    if is_cast(node):
        return "cast"
    try:
        return op_name(node)
    except Exception:  # op naming is cosmetic here
        return str(node.target)


def _source(node: fx.Node) -> fx.Node:
    """The value a chain of rewriter-made casts starts from."""
    while meta.CREATED in node.meta and is_cast(node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _cast_key(node: fx.Node) -> tuple[str, str | None]:
    """A cast, named by the original value it reads and the dtype it produces."""
    return meta.origin(_source(node.args[0]))[0], meta.dtype_name(node.kwargs.get("dtype"))


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: set = set()
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t), t.dtype, t.shape)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each stored tensor counted once."""
    return _tensor_bytes(list(module.parameters()) + list(module.buffers()))


def _fetch(gm: fx.GraphModule, target: str):
    obj: Any = gm
    for part in str(target).split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _as_model(value: Any, what: str) -> nn.Module:
    if isinstance(value, (str, os.PathLike)):
        return load(value)
    if isinstance(value, torch.export.ExportedProgram):
        return value.module()
    if not isinstance(value, nn.Module):
        raise InputError(f"diff: {what} must be an nn.Module, a GraphModule or a .pt2 path, "
                         f"got {type(value).__name__}")
    return value


@dataclasses.dataclass
class _Before:
    """What `before` contributes: dtypes by original node name, its ops and casts, its parameter bytes."""

    dtypes: dict[str, str | None]
    ops: dict[str, fx.Node]            # original name -> compute node (for removed-node detection)
    casts: dict[tuple, fx.Node]        # cast key -> cast node
    consumers: dict[str, list[str]]    # node name -> names of the nodes reading it
    param_bytes: int
    converted: bool
    notes: list[str]


def _before_state(before: nn.Module, after: fx.GraphModule, capture_before: bool) -> _Before:
    notes: list[str] = []
    converted = is_converted(before)
    graph_module = before if converted else None
    if not converted and capture_before:
        recorded = after.meta.get(meta.EXAMPLE_INPUTS)
        if recorded is None:
            notes.append("the converted model has no recorded example inputs: nodes removed from the "
                         "original graph are not shown")
        else:
            args, kwargs = recorded
            dynamic = bool((after.meta.get(meta.INFO) or {}).get("dynamic_batch", True))
            try:
                graph_module = capture(before, tuple(args), dict(kwargs), dynamic_batch=dynamic).graph_module
            except Exception as exc:  # the diff is still useful without the original graph
                notes.append(f"could not capture the original model ({type(exc).__name__}): nodes "
                             "removed from it are not shown")
    dtypes: dict[str, str | None] = {}
    ops: dict[str, fx.Node] = {}
    casts: dict[tuple, fx.Node] = {}
    consumers: dict[str, list[str]] = {}
    if graph_module is not None:
        for node in graph_module.graph.nodes:
            name, dtype = meta.origin(node)
            if converted:
                dtype = meta.dtype_name(meta.value_dtype(node))
            if meta.CREATED not in node.meta:
                dtypes[name] = dtype
                if node.op in ("call_function", "call_method", "call_module"):
                    ops[name] = node
            if is_cast(node) and (converted or meta.CREATED not in node.meta):
                casts[_cast_key(node)] = node
            consumers[node.name] = [u.name for u in node.users]
    return _Before(dtypes, ops, casts, consumers, parameter_bytes(before), converted, notes)


def _removed(state: _Before, after: fx.GraphModule) -> list[fx.Node]:
    """Nodes of `before` that the converted graph no longer has (getitems go with their producer)."""
    after_casts: set[tuple] = set()
    origin_names: set[str] = set()
    for node in after.graph.nodes:
        if meta.CREATED not in node.meta:
            origin_names.add(meta.origin(node)[0])
        if is_cast(node):
            after_casts.add(_cast_key(node))
    gone: dict[str, fx.Node] = {}
    for name, node in state.ops.items():
        if name in origin_names or _is_getitem(node):
            continue
        if node.op == "call_module" and not node.users:
            continue  # export's guard function
        gone[node.name] = node
    if state.converted:  # two conversions: a rewriter cast is gone when no cast of that value and dtype is
        for key, node in state.casts.items():
            if meta.CREATED in node.meta and key not in after_casts:
                gone[node.name] = node
    return list(gone.values())


def _is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "getitem"


def _removed_reason(node: fx.Node, after: fx.GraphModule) -> tuple[str, str]:
    """(rule, reason) for a node of `before` that is gone."""
    if is_cast(node):
        target = short_dtype(meta.dtype_name(node.kwargs.get("dtype")))
        src = node.args[0].name if isinstance(node.args[0], fx.Node) else "?"
        if meta.CREATED in node.meta:
            return "insert_casts", (f"the other conversion cast {src} to {target} here; this one does not "
                                    "need that cast")
        return "fold_casts", (f"the original graph cast {src} to {target}; the converted graph does not "
                              "need this cast (the value already has that dtype where it is read, or the "
                              "cast was merged with another)")
    path = meta.module_path(node)
    for other in after.graph.nodes:
        for note in meta.get(other, meta.REWRITTEN) or []:
            text = str(note.get("reason", ""))
            if (path and f"'{path}'" in text) or f"'{node.name}'" in text:
                return str(note.get("pass")), f"{text} (now node {other.name})"
    return "rewrite", "not in the converted graph: a rewrite pass replaced or removed it"


def _weight_reason(node: fx.Node, new: str | None) -> str:
    readers = sorted({_op_name(u) for u in node.users if u.op != "output"})
    who = ", ".join(readers[:4]) or "no op"
    return (f"stored once in {short_dtype(new)} instead of being cast on every call: read by "
            f"{who} computing in {short_dtype(new)}")


def diff(before: Any, after: Any, *, capture_before: bool = True) -> Diff:
    """Compare a model with its conversion, node by node.

    Args:
        before: the original model (nn.Module, GraphModule, or path of a .pt2), or another
            conversion of it (then the diff is between the two conversions).
        after: the GraphModule returned by `rewriter.convert` or `rewriter.load` (or a .pt2 path), or
            the GenerativeLM of `rewriter.convert(..., generate=True)`: then a `StepsDiff`, one Diff
            per graph (prefill and decode, each with its own decisions: FP8 decode GEMMs, say).
        capture_before: capture `before` (one torch.export, with the example inputs the conversion
            recorded) to list the nodes of the original graph that the conversion removed (folded
            casts, batch norms folded into convolutions); False is faster and shows everything else.

    Returns:
        A `Diff`: `summary`, `nodes`, `changed`; `str()`, `.to_json()`, `.to_html()`.

    Example:
        >>> d = rewriter.diff(model, rewriter.convert(model, (x,), precision="bf16"))
        >>> [n.name for n in d.changed if n.kind == "cast"]
        ['_to_copy_default', ...]
    """
    before = _as_model(before, "before")
    after = _as_model(after, "after")
    if meta.is_generative(after):  # a converted causal LM: its prefill and decode graphs, each diffed
        from rewriter.diff_generation import diff_steps

        return diff_steps(before, after, _graph_diff, parameter_bytes)
    if not isinstance(after, fx.GraphModule) or not is_converted(after):
        raise InputError(
            f"diff: 'after' ({type(after).__name__}) is not a converted model: it has no rewriter "
            "annotations. Pass the GraphModule returned by rewriter.convert, or a .pt2 written by "
            "rewriter.save (a plain torch.export.save file of a converted model has no annotations)")
    _check_related(before, after)
    return _graph_diff(before, after, capture_before)


def _graph_diff(before: nn.Module, after: fx.GraphModule, capture_before: bool) -> Diff:
    """The Diff of one converted graph `after` against the model it came from."""
    state = _before_state(before, after, capture_before)
    record = after.meta.get(meta.INFO) or {}
    gone = _removed(state, after)
    removed_for: dict[str, list[str]] = collections.defaultdict(list)
    for node in gone:
        if is_cast(node):
            for user in state.consumers.get(node.name, []):
                removed_for[user].append(node.name)

    entries: list[NodeDiff] = []
    for index, node in enumerate(after.graph.nodes):
        entry = _entry(node, index, after, state, removed_for)
        if entry is not None:
            entries.append(entry)
    for node in gone:
        rule, reason = _removed_reason(node, after)
        cast = is_cast(node)
        old = meta.dtype_name(node.kwargs.get("dtype")) if cast else state.dtypes.get(meta.origin(node)[0])
        entries.append(NodeDiff(
            index=-1, name=node.name, op="cast" if cast else _op_name(node),
            kind="cast" if cast else "compute",
            module=meta.module_path(node), old_dtype=old, new_dtype=None, compute_dtype=None,
            change="removed", rule=rule, reason=reason,
            inputs=tuple(n.name for n in node.all_input_nodes),
        ))
    return Diff(_summarize(entries, state, after, record), entries)


def _check_related(before: Any, after: fx.GraphModule) -> None:
    """Refuse to diff two unrelated models (it reported 'saved -227282%'): `after` must keep `before`'s
    weights by name and shape, and about as many weight elements."""
    if not isinstance(before, torch.nn.Module):
        return
    old = {k: v for k, v in before.state_dict().items() if isinstance(v, torch.Tensor)}
    new = {k: v for k, v in after.state_dict().items() if isinstance(v, torch.Tensor)}
    if not old or not new:
        return
    shared = [k for k, v in new.items() if k in old and old[k].numel() == v.numel()]
    n_old, n_new = sum(v.numel() for v in old.values()), sum(v.numel() for v in new.values())
    if not shared or not (0.25 <= n_new / max(n_old, 1) <= 4.0):
        raise InputError(
            f"diff: 'after' is not a conversion of 'before': they share {len(shared)} of {len(new)} weights "
            f"by name and size, and hold {n_old:,} vs {n_new:,} weight elements. Diff a model with its own "
            "conversion (rewriter.diff(model, rewriter.convert(model, ...)))")


def _entry(node: fx.Node, index: int, gm: fx.GraphModule, state: _Before,
           removed_for: dict[str, list[str]]) -> NodeDiff | None:
    created = meta.get(node, meta.CREATED)
    decision = meta.get(node, meta.DECISION) or {}
    origin_name, old = meta.origin(node)
    if state.converted and origin_name in state.dtypes:
        old = state.dtypes[origin_name]
    new = meta.dtype_name(meta.value_dtype(node))
    inputs = tuple(n.name for n in node.all_input_nodes)
    casts_added = tuple(n.name for n in node.all_input_nodes if meta.CREATED in n.meta and is_cast(n))
    common = dict(index=index, name=node.name, module=meta.module_path(node) or None, inputs=inputs,
                  shape=_shape_text(node),
                  casts_added=casts_added, casts_removed=tuple(removed_for.get(origin_name, ())),
                  range=meta.get(node, meta.RANGE), sensitivity=meta.get(node, meta.SENSITIVITY),
                  fp8=meta.get(node, meta.FP8),
                  rewritten=tuple(dict(r) for r in (meta.get(node, meta.REWRITTEN) or []))
                  + _target_note(node))
    if node.op == "output":
        return NodeDiff(op="output", kind="output", old_dtype=None, new_dtype=None, compute_dtype=None,
                        change="none", rule=None, reason="model outputs", **common)
    if node.op == "placeholder":
        return NodeDiff(op="input", kind="input", old_dtype=old, new_dtype=new, compute_dtype=None,
                        change="dtype" if old != new else "none", rule=None,
                        reason=None if old == new else "input dtype changed (keep_io_types=False)",
                        **common)
    if node.op == "get_attr":
        tensor = _fetch(gm, str(node.target))
        if isinstance(tensor, torch.Tensor):
            new = meta.dtype_name(tensor.dtype)
            itemsize_old = torch.empty((), dtype=meta.dtype_from_name(old)).element_size() if old else 0
            before_b = 0 if created else tensor.numel() * itemsize_old
            after_b = tensor.numel() * tensor.element_size()
        else:
            before_b = after_b = None
        if created:
            change, rule, reason, old = "added", created.get("pass"), created.get("reason"), None
        elif old != new and old is not None:
            change, rule, reason = "dtype", "cast_weights", _weight_reason(node, new)
        else:
            change, rule, reason = "none", None, None
        change, rule, reason = _with_rewrites(change, rule, reason, common["rewritten"])
        return NodeDiff(op="weight", kind="weight", old_dtype=old, new_dtype=new, compute_dtype=None,
                        change=change, rule=rule, reason=reason, bytes_before=before_b,
                        bytes_after=after_b, **common)
    if node.op == "call_module" and not node.users and meta.value_dtype(node) is None:
        return None  # export's guard function: no value, nothing to show
    if created:
        return NodeDiff(op="cast" if is_cast(node) else _op_name(node),
                        kind="cast" if is_cast(node) else "compute", old_dtype=None, new_dtype=new,
                        compute_dtype=new, change="added" if not _cast_existed(node, state) else "none",
                        rule=created.get("pass"), reason=created.get("reason"), **common)
    compute = decision.get("dtype")
    if old is not None and new is not None and old != new:
        change = "dtype"
    elif decision and not meta.is_float_dtype(meta.dtype_from_name(new)) and casts_added:
        change = "dtype"  # reads floats, returns none (argmax, gt): its inputs now arrive in `compute`
    else:
        change = "none"
    reason = decision.get("reason")
    if change != "none" and not reason:
        reason = f"dtype changed from {short_dtype(old)} to {short_dtype(new)}"
    rule = decision.get("rule")
    change, rule, reason = _with_rewrites(change, rule, reason, common["rewritten"])
    return NodeDiff(op="cast" if is_cast(node) else _op_name(node),
                    kind="cast" if is_cast(node) else "compute", old_dtype=old, new_dtype=new,
                    compute_dtype=compute, change=change, rule=rule, reason=reason, **common)


def _shape_text(node: fx.Node) -> str | None:
    """'2x8x32' from the node's example value (meta["val"]); None for non-tensors."""
    shape = getattr(node.meta.get("val"), "shape", None)
    if shape is None:
        return None
    return "x".join(str(d) for d in shape) or "scalar"


def _target_note(node: fx.Node) -> tuple[dict, ...]:
    """The ONNX export target's decision on the node (node.meta[TARGET]), as a rewrite note."""
    record = meta.get(node, meta.TARGET)
    return ({"pass": record["rule"], "reason": record["reason"]},) if record else ()


def _with_rewrites(change: str, rule: str | None, reason: str | None,
                   rewritten: tuple[dict, ...]) -> tuple[str, str | None, str | None]:
    """Fold the notes of passes that edited a node (fold_batch_norm, channels_last) into its entry."""
    if not rewritten:
        return change, rule, reason
    notes = "; ".join(f"{r.get('pass')}: {r.get('reason')}" for r in rewritten)
    if change == "none":
        return "rewritten", str(rewritten[-1].get("pass")), notes
    return change, rule, f"{reason}; {notes}" if reason else notes


def _cast_existed(node: fx.Node, state: _Before) -> bool:
    return state.converted and is_cast(node) and _cast_key(node) in state.casts


def _summarize(entries: list[NodeDiff], state: _Before, after: fx.GraphModule, record: dict) -> Summary:
    compute = [e for e in entries if e.kind == "compute" and e.compute_dtype is not None]
    nodes = {n.name: n for n in after.graph.nodes}

    def old_compute(e: NodeDiff) -> str | None:
        if e.old_dtype is not None and meta.is_float_dtype(meta.dtype_from_name(e.old_dtype)):
            return e.old_dtype
        for src in nodes[e.name].all_input_nodes:  # reads floats, returns none: what did it read?
            src = _source(src)
            _, dtype = meta.origin(src)
            if state.converted:
                dtype = state.dtypes.get(meta.origin(src)[0], dtype)
            if dtype is not None and meta.is_float_dtype(meta.dtype_from_name(dtype)):
                return dtype
        return None

    before_counts = collections.Counter(d for d in (old_compute(e) for e in compute) if d)
    after_counts = collections.Counter(e.compute_dtype for e in compute)
    changed = [e for e in entries if e.changed]
    rules = collections.Counter(e.rule or "?" for e in changed
                                if e.kind == "compute" and e.change != "removed")
    casts_after = sum(1 for e in entries if e.kind == "cast" and e.change != "removed")
    casts_removed = sum(1 for e in entries if e.change == "removed" and e.kind == "cast")
    removed = sum(1 for e in entries if e.change == "removed")
    casts_added = sum(1 for e in entries if e.kind == "cast" and e.change == "added")
    kept = sum(1 for e in compute if e.compute_dtype == "float32"
               and e.rule not in (None, "follow", "promote", "min-cut"))
    config = record.get("config") or {}
    notes = tuple(list(record.get("notes") or []) + state.notes)
    used, judged, kept_bf16 = fp8_counts(entries)
    return Summary(
        model=str(record.get("model") or type(after).__name__),
        precision=config.get("precision"), capture=record.get("capture"),
        dynamic_batch=record.get("dynamic_batch"), nodes=len(entries) - removed,
        compute_nodes=len(compute), precision_before=dict(before_counts),
        precision_after=dict(after_counts), casts_before=len(state.casts),
        casts_after=casts_after, casts_added=casts_added, casts_removed=casts_removed,
        changed_nodes=len(changed), param_bytes_before=state.param_bytes,
        param_bytes_after=parameter_bytes(after), rules=dict(rules), kept_fp32=kept, notes=notes,
        fp8_gemms=used if judged else None, fp8_judged=judged or None,
        fp8_kept={r: len(v) for r, v in kept_bf16.items()} if judged else None,
    )
