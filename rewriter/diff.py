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
import json
import os
import textwrap
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
from rewriter.report import format_bytes, render_html, short_dtype

__all__ = ["diff", "Diff", "NodeDiff", "Summary", "short_dtype", "format_bytes", "parameter_bytes"]

_FORMAT = "rewriter.diff/1"

@dataclasses.dataclass(frozen=True)
class NodeDiff:
    """One node of the converted graph (or one node of the original graph that is gone).

    change: "added" (a cast or weight copy the rewriter created), "removed" (a node of the original
    graph that the converted one no longer has: a folded cast, a batch norm folded into its
    convolution), "dtype" (the node now computes or stores another dtype), "rewritten" (same dtype,
    but a pass changed it: see `rewritten`) or "none".
    """

    index: int                     # position in the converted graph; -1 for removed nodes
    name: str
    op: str
    kind: str                      # input | weight | compute | cast | output
    module: str | None
    old_dtype: str | None          # output dtype before the conversion (None: did not exist)
    new_dtype: str | None          # output dtype after (None: removed)
    compute_dtype: str | None      # the dtype the node computes in (its decision)
    change: str
    rule: str | None
    reason: str | None
    casts_added: tuple[str, ...] = ()
    casts_removed: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    bytes_before: int | None = None
    bytes_after: int | None = None
    range: dict | None = None
    sensitivity: dict | None = None
    fp8: dict | None = None
    rewritten: tuple[dict, ...] = ()     # [{"pass", "reason"}] from passes that edited this node

    @property
    def changed(self) -> bool:
        return self.change != "none"

    def to_dict(self, *, with_inputs: bool = False) -> dict:
        out = {"name": self.name, "op": self.op, "kind": self.kind, "module": self.module,
               "old_dtype": self.old_dtype, "new_dtype": self.new_dtype,
               "compute_dtype": self.compute_dtype, "change": self.change, "rule": self.rule,
               "reason": self.reason, "casts_added": list(self.casts_added),
               "casts_removed": list(self.casts_removed)}
        for key in ("bytes_before", "bytes_after", "range", "sensitivity", "fp8"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.rewritten:
            out["rewritten"] = [dict(r) for r in self.rewritten]
        if with_inputs:
            out["index"] = self.index
            out["inputs"] = list(self.inputs)
        return out


@dataclasses.dataclass(frozen=True)
class Summary:
    """Totals of a diff: nodes per precision, casts, parameter bytes."""

    model: str
    precision: str | None
    capture: str | None
    dynamic_batch: bool | None
    nodes: int                           # nodes of the converted graph (inputs, weights, ops, output)
    compute_nodes: int
    precision_before: dict[str, int]     # compute nodes per dtype
    precision_after: dict[str, int]
    casts_before: int
    casts_after: int
    casts_added: int
    casts_removed: int
    changed_nodes: int
    param_bytes_before: int
    param_bytes_after: int
    rules: dict[str, int]                # rule -> changed compute nodes it decided
    kept_fp32: int                       # compute nodes left in fp32 on purpose
    notes: tuple[str, ...] = ()

    @property
    def param_bytes_saved(self) -> int:
        return self.param_bytes_before - self.param_bytes_after

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["notes"] = list(self.notes)
        out["param_bytes_saved"] = self.param_bytes_saved
        return out


def _cut(text: str | None, width: int) -> str:
    text = text or ""
    return text if len(text) <= width else text[: width - 1] + "\u2026"


class Diff:
    """The result of `rewriter.diff`: `summary`, `nodes` (every node, graph order, then removed casts).

    Renderings: `str(d)` / `d.to_text()`, `d.to_json()`, `d.to_html()`.
    """

    def __init__(self, summary: Summary, nodes: list[NodeDiff]):
        self.summary = summary
        self.nodes = list(nodes)

    @property
    def changed(self) -> list[NodeDiff]:
        """The nodes whose precision changed, the casts and copies added, the casts removed."""
        return [n for n in self.nodes if n.changed]

    def __repr__(self) -> str:
        s = self.summary
        return (f"<Diff {s.model} -> {s.precision}: {len(self.changed)} changed nodes, "
                f"+{s.casts_added}/-{s.casts_removed} casts, {format_bytes(s.param_bytes_saved)} saved>")

    def __str__(self) -> str:
        return self.to_text()

    # ------------------------------------------------------------------ text
    def to_text(self, max_rows: int | None = 60, width: int | None = None) -> str:
        """Summary, then the changed ops and casts one per line, weights and fp32 keeps grouped.

        Args:
            max_rows: most lines per section (None: all); the JSON and HTML always have all.
            width: fit every line in this many columns (a terminal's 80): long names are cut with an
                ellipsis, each reason goes on its own wrapped line under its node. None: one line per node.
        """
        s = self.summary
        lines = [f"rewriter diff: {s.model} -> {s.precision or '?'}"
                 + (f" (captured with {s.capture}{', dynamic batch' if s.dynamic_batch else ''})"
                    if s.capture else "")]
        dtypes = sorted(set(s.precision_before) | set(s.precision_after),
                        key=lambda d: (d != "float32", d))
        per = ", ".join(f"{short_dtype(d)} {s.precision_before.get(d, 0)} -> {s.precision_after.get(d, 0)}"
                        for d in dtypes)
        lines.append(f"  compute nodes  {s.compute_nodes} ({per})")
        lines.append(f"  casts          {s.casts_before} -> {s.casts_after} "
                     f"(+{s.casts_added} added, -{s.casts_removed} removed)")
        pct = (100.0 * s.param_bytes_saved / s.param_bytes_before) if s.param_bytes_before else 0.0
        lines.append(f"  parameters     {format_bytes(s.param_bytes_before)} -> "
                     f"{format_bytes(s.param_bytes_after)} "
                     f"(saved {format_bytes(s.param_bytes_saved)}, {pct:.0f}%)")
        if s.rules:
            lines.append("  decided by     " + ", ".join(f"{r} {c}" for r, c in
                                                          sorted(s.rules.items(), key=lambda kv: -kv[1])))
        for note in s.notes:
            lines.append(f"  note: {note}")

        ops = [n for n in self.changed if n.kind != "weight"]
        lines.append("")
        lines.append(f"changed ({len(ops)} ops and casts; + added, - removed)")
        rows = [("", "node", "op", "module", "dtype", "rule", "reason")]
        for n in ops[: max_rows if max_rows is not None else None]:
            mark = {"added": "+", "removed": "-"}.get(n.change, " ")
            if n.change == "added":
                dt = f"-> {short_dtype(n.new_dtype)}"
            elif n.change == "removed":
                dt = f"{short_dtype(n.old_dtype)} ->"
            else:
                dt = f"{short_dtype(n.old_dtype)} -> {short_dtype(n.new_dtype)}"
                if n.compute_dtype and n.compute_dtype != n.new_dtype:
                    dt += f" (in {short_dtype(n.compute_dtype)})"
            rows.append((mark, _cut(n.name, 28), _cut(n.op, 16), _cut(n.module or "", 28), dt,
                         n.rule or "", _cut(n.reason, 90)))
        lines.extend(_columns(rows, width))
        if max_rows is not None and len(ops) > max_rows:
            lines.append(f"  ... {len(ops) - max_rows} more (see --json or --html for every node)")

        weights = [n for n in self.changed if n.kind == "weight"]
        if weights:
            by = collections.Counter((short_dtype(n.old_dtype), short_dtype(n.new_dtype), n.change)
                                     for n in weights)
            saved = sum((n.bytes_before or 0) - (n.bytes_after or 0) for n in weights)
            parts = [f"{c} {'copied to' if ch == 'added' else o + ' ->'} {nw}"
                     for (o, nw, ch), c in by.items()]
            lines.append("")
            lines.append(f"weights ({len(weights)} changed: {', '.join(parts)}; {format_bytes(saved)} saved)")

        kept = [n for n in self.nodes if n.kind == "compute" and not n.changed
                and n.compute_dtype == "float32" and n.rule not in (None, "follow", "promote", "min-cut")]
        if kept:
            lines.append("")
            lines.append(f"kept in fp32 on purpose ({len(kept)})")
            rows = [("", "node", "op", "module", "rule", "reason")]
            for n in kept[: max_rows if max_rows is not None else None]:
                rows.append(("", _cut(n.name, 28), _cut(n.op, 16), _cut(n.module or "", 28),
                             n.rule or "", _cut(n.reason, 90)))
            lines.extend(_columns(rows, width))
            if max_rows is not None and len(kept) > max_rows:
                lines.append(f"  ... {len(kept) - max_rows} more")
        return "\n".join(lines) if width is None else "\n".join(_fit(line, width) for line in lines)

    # ------------------------------------------------------------------ json / html
    def to_dict(self, *, all_nodes: bool = False) -> dict:
        """{"format", "summary", "nodes"}: nodes are the changed ones unless all_nodes."""
        nodes = self.nodes if all_nodes else self.changed
        return {"format": _FORMAT, "summary": self.summary.to_dict(),
                "nodes": [n.to_dict(with_inputs=all_nodes) for n in nodes]}

    def to_json(self, *, all_nodes: bool = False, indent: int | None = 2) -> str:
        """JSON text: one entry per changed node, each with its reason (all nodes with all_nodes)."""
        return json.dumps(self.to_dict(all_nodes=all_nodes), indent=indent, default=str)

    def to_html(self, title: str | None = None) -> str:
        """A self-contained HTML page (no network): summary, sortable table, picture of the graph."""
        return render_html(self, title=title)


def _columns(rows: list[tuple], width: int | None = None) -> list[str]:
    """Aligned columns. With a width: the last column (the reason) goes on its own indented line
    under each row, and the name columns (node, module) shrink until a row fits."""
    if width is None:
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        out = []
        for row in rows:
            cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths[:-1])] + [str(row[-1])]
            out.append(("  " + " ".join(cells)).rstrip())
        return out
    head = [tuple(str(c) for c in r[:-1]) for r in rows]
    widths = [max(len(r[i]) for r in head) for i in range(len(head[0]))]
    shrinkable = [i for i, name in enumerate(head[0]) if name in ("node", "module")]
    while 2 + sum(widths) + len(widths) - 1 > width and any(widths[i] > 8 for i in shrinkable):
        i = max(shrinkable, key=lambda k: widths[k])
        widths[i] -= 1
    out = []
    for k, (row, cells) in enumerate(zip(rows, head)):
        out.append(("  " + " ".join(_cut(c, w).ljust(w) for c, w in zip(cells, widths))).rstrip())
        reason = str(row[-1]) if k else ""
        if reason:
            out += textwrap.wrap(reason, width, initial_indent="      ", subsequent_indent="      ",
                                 break_on_hyphens=False)
    return out


def _fit(line: str, width: int) -> str:
    """A summary line wrapped to `width`, continuation lines indented under its text."""
    if len(line) <= width:
        return line
    indent = " " * (len(line) - len(line.lstrip()) + 4)
    return "\n".join(textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False))


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
        after: the GraphModule returned by `rewriter.convert` or `rewriter.load` (or a .pt2 path).
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
    if not isinstance(after, fx.GraphModule) or not is_converted(after):
        raise InputError(
            f"diff: 'after' ({type(after).__name__}) is not a converted model: it has no rewriter "
            "annotations. Pass the GraphModule returned by rewriter.convert, or a .pt2 written by "
            "rewriter.save (a plain torch.export.save file of a converted model has no annotations)")
    _check_related(before, after)
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
    return Summary(
        model=str(record.get("model") or type(after).__name__),
        precision=config.get("precision"), capture=record.get("capture"),
        dynamic_batch=record.get("dynamic_batch"), nodes=len(entries) - removed,
        compute_nodes=len(compute), precision_before=dict(before_counts),
        precision_after=dict(after_counts), casts_before=len(state.casts),
        casts_after=casts_after, casts_added=casts_added, casts_removed=casts_removed,
        changed_nodes=len(changed), param_bytes_before=state.param_bytes,
        param_bytes_after=parameter_bytes(after), rules=dict(rules), kept_fp32=kept, notes=notes,
    )
