"""Assign: one compute dtype per node, with the fewest cast bytes.

Step 1, reference: every node gets the precision autocast would give it, after measured decisions and
user overrides (default < analysis < op type < module regex < exact module path):
    lowp ops -> island dtype; fp32 ops -> fp32; follow -> first float input; promote -> widest input.
This is what makes the converted model as accurate as autocast: the residual stream that leaves an
fp32 layer_norm and meets an fp16 branch in an `add` stays fp32, exactly as under autocast.

Step 2, placement: ops that only move data (view, transpose, slice, getitem, relu, max_pool...) give the
same values in either precision, so casts may move across them freely. A minimum s-t cut on the
data-flow graph (networkx) chooses for each of them low precision or fp32 so that the bytes cast are
smallest, with one cast per value however many consumers it has, and never rounding a value that an
fp32 consumer reads.

Before: layer_norm(fp32) -> view -> transpose -> linear(lowp)
After:  layer_norm(fp32) -> [cast] -> view(lowp) -> transpose(lowp) -> linear(lowp)

The model's own autocast regions (meta.AUTOCAST, recorded at capture by rewriter/autocast_regions.py)
rank above measurements and below user overrides: with autocast off, a node keeps its traced dtype;
with autocast on, a tensor-core op runs in the region's dtype (rule "autocast-region").

With a tolerance, analysis/lowering may mark nodes the policy keeps fp32 (norms, residual adds) to run in
low precision where the measured error budget affords it (SENSITIVITY "lower"; rule "budget-lowered",
ranked with the other measurements, below regions and overrides).

Writes node.meta[DECISION] = {"dtype", "rule", "reason"} on every node that computes in floating point.
"""
from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx

from rewriter.passes.graph_utils import float_inputs, is_param, is_tuple_getitem
from rewriter.passes.infra import AnalysisPass, PassResult
from rewriter.passes.op_tables import is_known_op, promotes_natively
from rewriter import meta
from rewriter.autocast_regions import describe
from rewriter.config import ConvertConfig, Precision
from rewriter.errors import ConfigError

__all__ = ["Assign"]

_F32 = torch.float32


def _widest(dtypes: list[torch.dtype]) -> torch.dtype:
    distinct = set(dtypes)
    if not distinct:
        return _F32
    if len(distinct) == 1:
        return distinct.pop()
    return _F32  # fp32 wins, and fp16 + bf16 promote to fp32 as in PyTorch


def _check_overrides_match(gm: fx.GraphModule, overrides: tuple) -> None:
    """An override that matches no node is a typo (`sofmax`) or a module path that does not exist:
    a ConfigError naming the closest op or module of this model, never a silent no-op. `overrides` are
    resolved (bare words are ops or module paths by now)."""
    if not overrides:
        return
    ops, paths = set(), set()
    for node in gm.graph.nodes:
        info = meta.get(node, meta.OP_CLASS)
        if info is not None:
            if not str(info["op"]).startswith("module:"):
                ops.add(info["op"])
        path = meta.module_path(node)
        while path:
            paths.add(path)
            path = path.rpartition(".")[0]
    pairs = [(op, None) for op in ops] + [("", p) for p in paths]
    unmatched = [o for o in overrides if not any(o.matches(op, p) for op, p in pairs)]
    if not unmatched:
        return
    import difflib

    lines = []
    for o in unmatched:
        pool = sorted(paths) if o.kind == "regex" else sorted(ops | paths)
        close = difflib.get_close_matches(o.key[3:] if o.kind == "regex" else o.key, pool, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else \
            f"ops here: {', '.join(sorted(ops)[:12])}; modules: {', '.join(sorted(paths)[:8]) or 'none'}"
        lines.append(f"override {o.key!r} matches no op or module of this model ({hint})")
    raise ConfigError("; ".join(lines) + ". Overrides name an op (softmax, linear), a module path "
                      "(encoder.layer.0.attention) or a regex 're:...' over module paths; fix the key or drop it")


def _rank_name(kind: str) -> str:
    return {"op": "override:op", "regex": "override:regex", "module": "override:module"}[kind]


class Assign(AnalysisPass):
    name = "assign"

    def __init__(self, config: ConvertConfig):
        self.config = config
        # a bare-word override is an op when the op table knows it, else a top-level module
        self.overrides = tuple(o.resolve(is_known_op) for o in config.overrides)

    # ------------------------------------------------------------------ forced decisions
    def _forced(self, node: fx.Node, op: str, cls: str):
        """(dtype, rule, reason) from the highest-precedence override, the model's own autocast region
        or a measurement, or None."""
        path = meta.module_path(node)
        best = None
        for o in self.overrides:
            if o.matches(op, path) and (best is None or o.rank >= best.rank):
                best = o
        if best is not None:
            dtype = _F32 if best.precision is Precision.FP32 else best.precision.island_dtype
            where = f"op {op}" if best.kind == "op" else f"module '{path}'"
            return dtype, _rank_name(best.kind), f"user override {best.key}={best.precision.value} on {where}"
        region = _region_decision(node, op, cls)
        if region is not None:
            return region
        for key, rule in ((meta.SENSITIVITY, "analysis:sensitivity"), (meta.RANGE, "analysis:range")):
            record = meta.get(node, key) or {}
            if record.get("keep"):
                return meta.dtype_from_name(record["keep"]), rule, record.get("reason", rule)
        lowered = (meta.get(node, meta.SENSITIVITY) or {}).get("lower")
        if lowered:  # analysis/lowering: the error budget affords this policy-fp32 node in low precision
            record = meta.get(node, meta.SENSITIVITY)
            return meta.dtype_from_name(lowered), "budget-lowered", record.get("reason", "budget-lowered")
        return None

    # ------------------------------------------------------------------ main
    def call(self, gm: fx.GraphModule) -> PassResult:
        low = self.config.island_dtype
        ref: dict[fx.Node, torch.dtype] = {}
        why: dict[fx.Node, tuple[str, str]] = {}
        deciding: list[fx.Node] = []     # nodes that get a DECISION
        free: set[fx.Node] = set()       # exact ops the cut may place
        for node in gm.graph.nodes:
            dtype = meta.value_dtype(node)
            if node.op in ("placeholder", "get_attr"):
                if meta.is_float_dtype(dtype):
                    ref[node] = dtype
                continue
            info = meta.get(node, meta.OP_CLASS)
            if node.op == "output" or info is None:
                continue
            if info["class"] == "untouched":
                if meta.is_float_dtype(dtype):
                    ref[node] = dtype
                continue
            op, cls = info["op"], info["class"]
            ins = [i for i in float_inputs(node) if i in ref]
            forced = self._forced(node, op, cls)
            if forced is not None:
                d, rule, reason = forced
            elif is_tuple_getitem(node):
                src = node.args[0]
                d, rule, reason = ref.get(src, _F32), "follow", f"element of {src.name}"
            elif cls == "lowp":
                d, rule, reason = low, "op-table", info["reason"]
            elif cls == "fp32":
                d, rule, reason = _F32, "op-table", info["reason"]
            elif cls == "follow":
                d = ref[ins[0]] if ins else _F32
                src = ins[0].name if ins else "none"
                rule, reason = "follow", f"{op} follows its input {src} ({meta.dtype_name(d)})"
            else:  # promote; 0-dim tensors do not take part, as in PyTorch's type promotion
                shaped = [i for i in ins if _ndim(i) != 0] or ins
                d = _widest([ref[i] for i in shaped])
                names = ", ".join(f"{i.name}:{meta.dtype_name(ref[i])}" for i in shaped[:4])
                rule, reason = "promote", f"{op} runs in the widest of its inputs ({names})"
            ref[node] = d
            why[node] = (rule, reason)
            deciding.append(node)
            if forced is None and d in (low, _F32):
                if is_tuple_getitem(node):
                    if node.args[0] in free:
                        free.add(node)
                elif info["exact"] and len(ins) <= 1:
                    free.add(node)

        _check_overrides_match(gm, self.overrides)
        placed = self._place(gm, ref, free, deciding, low)
        for node in deciding:
            d = placed.get(node, ref[node])
            rule, reason = why[node]
            if node in free:
                rule = "min-cut"
                if d == ref[node]:
                    reason = f"{reason}; moves data only, kept with its input"
                else:
                    reason = (f"{meta.get(node, meta.OP_CLASS)['op']} moves data only: placed in "
                              f"{meta.dtype_name(d)} so the cast sits on the smaller tensor")
            meta.put(node, meta.DECISION, {"dtype": meta.dtype_name(d), "rule": rule, "reason": reason})
        return PassResult(gm, False)

    # ------------------------------------------------------------------ the cut
    def _place(self, gm, ref, free, deciding, low) -> dict:
        if not free:
            return {}
        src, sink = "__lowp__", "__fp32__"
        graph = nx.DiGraph()
        decided = set(deciding)
        low_bytes = torch.finfo(low).bits // 8

        def fixed_edge(node, dtype):
            if dtype == low:
                graph.add_edge(src, node)
            else:
                graph.add_edge(node, sink)

        for node in ref:
            if node not in free and not is_param(node):
                fixed_edge(node, ref[node])
        for node in deciding:  # consumers that read floats but produce none (gt, argmax)
            if node not in ref and node not in free:
                fixed_edge(node, ref.get(node, _F32))
        keep_io = self.config.keep_io_types
        for u in ref:
            if is_param(u):
                continue  # weights are cast once at conversion time: free to place
            consumers = []
            for user in u.users:
                if user.op == "output":
                    if keep_io:
                        out_node = ("output", u)
                        fixed_edge(out_node, ref[u] if u.op == "placeholder" else (_orig(u) or _F32))
                        consumers.append(out_node)
                elif user in decided:
                    if is_tuple_getitem(user):
                        graph.add_edge(u, user)
                        graph.add_edge(user, u)
                    elif user not in free and ref[user] == _F32 and _promotes(user):
                        # add(fp16, fp32) upcasts inside its own kernel: no cast to pay, but an fp32
                        # value it reads must not have been rounded.
                        if ref[u] == _F32:
                            graph.add_edge(u, user)
                    else:
                        consumers.append(user)
            if not consumers:
                continue
            cost = max(1, meta.numel_hint(u)) * (4 + low_bytes)
            down, up = ("down", u), ("up", u)
            graph.add_edge(down, u, capacity=cost)
            if ref[u] == _F32:
                graph.add_edge(u, up)  # rounding an fp32 value that an fp32 op reads: forbidden
            else:
                graph.add_edge(u, up, capacity=cost)
            for v in consumers:
                graph.add_edge(v, down)
                graph.add_edge(up, v)
        if src not in graph or sink not in graph:
            return {}
        try:
            _, (lowp_side, _) = nx.minimum_cut(graph, src, sink)
        except nx.NetworkXUnbounded:
            return {}
        return {n: (low if n in lowp_side else _F32) for n in free}


def _region_decision(node: fx.Node, op: str, cls: str):
    """What the model's own autocast region around `node` asks for (meta.AUTOCAST), or None.

    Autocast off: every floating-point op runs as written, in its traced dtype (the model protects
    this region from 16-bit). Autocast on with a dtype: the tensor-core ops run in that dtype, the
    rest is decided as everywhere else."""
    region = meta.get(node, meta.AUTOCAST)
    if not region:
        return None
    where = describe(region)
    if not region.get("enabled"):
        traced = _orig(node)
        if not meta.is_float_dtype(traced):
            return None
        return (traced, "autocast-region", f"inside {where}: the model turns autocast off here, so "
                f"{op} runs in {meta.dtype_name(traced)} as written")
    dtype = meta.dtype_from_name(region.get("dtype"))
    if cls == "lowp" and meta.is_float_dtype(dtype):
        return (dtype, "autocast-region", f"inside {where}: the model runs this region's tensor-core ops "
                f"in {meta.dtype_name(dtype)}")
    return None


def _promotes(node) -> bool:
    info = meta.get(node, meta.OP_CLASS) or {}
    return info.get("class") == "promote" and promotes_natively(info.get("op", ""))


def _ndim(node) -> int | None:
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(val, "shape", None)
    return None if shape is None else len(shape)


def _orig(node):
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    return getattr(val, "dtype", None)
