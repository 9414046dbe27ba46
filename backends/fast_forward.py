"""Eager fast path: run a converted GraphModule without the per-op interpreter tax of its forward.

The forward torch.fx generates for an exported graph calls every op as
`torch.ops.aten.<op>.<overload>(...)`, a Python `OpOverload.__call__` frame on top of the C++ call, and
reads every weight through its dotted module path (`self.encoder.layer.0.attention.self.query.weight`
is one `nn.Module.__getattr__` call per dot: about 800 calls per forward for a 12-layer ViT). When the
GPU waits for the CPU (batch 1, or any eager transformer on a fast GPU) that overhead is the run time:
on this repository's CPU proxy it is about a quarter of a ViT forward.

`install(gm)` compiles a second forward from a copy of the graph in which
  * each aten op that has a Python binding generated from the same schema (`torch.<op>`,
    `torch._C._nn.<op>`, or a Tensor method for view/expand/...) is called through that binding: the
    same kernel with the same arguments, minus the OpOverload frame;
  * a cast `aten._to_copy(x, dtype=d)` that changes the dtype becomes `x.to(d)` (the same copy);
  * every weight read is one dictionary lookup: the module's `_parameters` / `_buffers` / instance
    dictionary, fetched when the forward starts, so `.to()`, `load_state_dict` and
    `torch.func.functional_call` are seen exactly as by the standard forward.
The graph itself, which `rewrite diff`, `rewriter.save` and the ONNX export read, is untouched, and the
standard forward still runs whenever the graph is traced rather than run: under torch.compile,
torch.export, torch.fx tracing, or with tensor-subclass inputs (fake or functional tensors).
`gm.recompile()` (after editing the graph) restores the standard forward; `uninstall(gm)` does so too.

Before: linear = torch.ops.aten.linear.default(x, self.encoder.layers.encoder_layer_0.mlp.weight, ...)
After:  linear = torch._C._nn.linear(x, getitem_7, ...)          # getitem_7 = _rw_weights[7]

The record is gm.meta["rewriter.fast_forward"] = {"ops_bound": n, "ops_kept": {op: count},
"weights": n}: which ops still go through OpOverload (no binding of the same name) and why.

Example:
    >>> fast = rewriter.convert(model, (x,), precision="bf16")   # eager backend: installed
    >>> fast.meta["rewriter.fast_forward"]["ops_bound"]
    212
"""
from __future__ import annotations

import collections
import functools
import importlib
import operator
from typing import Any

import torch
import torch.fx as fx

from rewriter import meta
from rewriter.backends import invariants

__all__ = ["install", "uninstall", "is_installed", "binding_for", "RECORD_KEY"]

RECORD_KEY = meta.FAST_FORWARD

# aten ops without a torch.* function that are Tensor methods with the same schema
_METHODS = frozenset({"view", "expand", "contiguous", "unfold", "masked_fill", "type_as"})

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_symbolic_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", lambda: False)


def binding_for(node: fx.Node) -> Any:
    """The Python binding that computes `node` like its OpOverload target, or None.

    Only aten ops are bound, by their overload packet's name, to a binding generated from the same
    native function (its argument parser picks the overload the graph names from the same arguments).
    `_to_copy` is bound to `Tensor.to` only for a pure dtype change (no device, layout or memory
    format), where both make the same new tensor.
    """
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    name = target._overloadpacket.__name__
    if name == "_to_copy":
        return torch.Tensor.to if _is_dtype_change(node) else None
    if name.startswith("__"):
        return None
    for namespace in (torch._C._nn, torch._C._VariableFunctions):
        fn = getattr(namespace, name, None)
        if callable(fn) and _nameable(fn):
            return fn
    if name in _METHODS:
        return getattr(torch.Tensor, name, None)
    return None


def _nameable(fn) -> bool:
    """True when the name torch.fx writes for `fn` in generated code resolves to `fn` itself.

    torch.fx names `torch._C._VariableFunctions.broadcast_tensors` "torch.broadcast_tensors", and that
    name is a Python wrapper with another signature (it takes `*tensors`, the aten op a list): the
    generated code would call the wrapper. The same holds for split, einsum, meshgrid, norm, cdist,
    tensordot, stft... Those ops keep their OpOverload.
    """
    try:
        name = fx.node._get_qualified_name(fn)
    except RuntimeError:
        return False
    module, _, attr = name.rpartition(".")
    try:
        owner = importlib.import_module(module)
    except ImportError:  # "torch.Tensor.view": an attribute of a module attribute
        parent, _, cls = module.rpartition(".")
        try:
            owner = getattr(importlib.import_module(parent), cls)
        except (ImportError, AttributeError):
            return False
    return getattr(owner, attr, None) is fn


def _spelled_out_defaults(node: fx.Node) -> dict:
    """node.kwargs plus every schema default the node leaves out (None defaults excepted).

    A binding's parser does not always default like the schema: `torch._C._nn.mse_loss(a, b)` (and
    l1_loss, smooth_l1_loss, huber_loss...) returns the unreduced loss, `aten.mse_loss(a, b)` the mean.
    Spelled out, the arguments mean the same thing to both.
    """
    kwargs = dict(node.kwargs)
    if node.target is torch.ops.aten._to_copy.default:
        return kwargs
    for i, arg in enumerate(node.target._schema.arguments):
        if ((not arg.kwarg_only and i < len(node.args)) or arg.name in kwargs
                or not arg.has_default_value() or arg.default_value is None):
            continue
        kwargs[arg.name] = arg.default_value
    return kwargs


def _is_dtype_change(node: fx.Node) -> bool:
    if len(node.args) != 1 or set(node.kwargs) != {"dtype"} or not isinstance(node.args[0], fx.Node):
        return False
    src, out = node.args[0].meta.get("val"), node.meta.get("val")
    return (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor)
            and src.dtype != out.dtype == node.kwargs["dtype"])


def _weight_slot(gm: fx.GraphModule, target: str) -> tuple[dict, str] | None:
    """(the dictionary that holds attribute `target`, its key), or None for a submodule or a miss."""
    owner_path, _, name = target.rpartition(".")
    try:
        owner = gm.get_submodule(owner_path) if owner_path else gm
    except AttributeError:
        return None
    for slots in (owner._parameters, owner._buffers, owner.__dict__):
        if name in slots and isinstance(slots[name], torch.Tensor):
            return slots, name
    return None


def _traced(args: tuple, kwargs: dict) -> bool:
    """True when the forward is being traced, not run: then the standard forward must run."""
    if torch.compiler.is_compiling() or _symbolic_tracing():
        return True
    for value in (*args, *kwargs.values()):
        if isinstance(value, fx.Proxy):
            return True
        if isinstance(value, torch.Tensor):
            if type(value) not in _PLAIN:
                return True
        elif isinstance(value, (list, tuple, dict)):
            leaves = torch.utils._pytree.tree_leaves(value)
            if any(isinstance(v, torch.Tensor) and type(v) not in _PLAIN for v in leaves):
                return True
    return False


def install(gm: fx.GraphModule) -> dict:
    """Give `gm` the fast forward described in the module docstring; returns the record.

    Idempotent (a second call rebuilds it from the current graph). Only this GraphModule changes:
    torch.fx gives every GraphModule a class of its own, whose `forward` is replaced. A module that
    picks between graphs in its forward (the train/eval module of mode="train") keeps its forward.
    """
    if callable(getattr(gm, "graphs", None)):
        record = {"ops_bound": 0, "ops_kept": {}, "weights": 0,
                  "skipped": "the module chooses between a training and an evaluation graph"}
        gm.meta[RECORD_KEY] = record
        return record
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, values))
    graph._codegen = gm.graph._codegen

    slots: list[tuple[dict, str]] = []
    fetch = None
    kept: collections.Counter = collections.Counter()
    bound = 0
    for node in list(graph.nodes):
        if node.op == "get_attr":
            slot = _weight_slot(gm, node.target)
            if slot is None:
                continue
            if fetch is None:
                first = next(n for n in graph.nodes if n.op != "placeholder")
                with graph.inserting_before(first):
                    fetch = graph.call_function(_fetcher(slots), ())
            with graph.inserting_before(node):
                read = graph.call_function(operator.getitem, (fetch, len(slots)))
            slots.append(slot)
            read.meta = node.meta
            node.replace_all_uses_with(read)
            graph.erase_node(node)
    # weights are dictionary reads now: regions that read only weights and sizes run once per key
    hoisted = invariants.hoist(graph, {n for n in graph.nodes
                                       if n.op == "call_function" and n.target is operator.getitem
                                       and fetch is not None and n.args[0] is fetch})
    for node in list(graph.nodes):
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            fn = binding_for(node)
            if fn is None:
                kept[str(node.target)] += 1
            else:
                node.kwargs = _spelled_out_defaults(node)
                node.target = fn
                bound += 1

    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<rewriter fast forward of {type(gm).__name__}>", "exec"), namespace)
    fast = namespace["forward"]
    cls = type(gm)
    standard = cls._rw_standard_forward if is_installed(gm) else cls.forward

    @functools.wraps(standard)  # the signature too: export maps dynamic shapes by argument name
    def forward(self, *args, **kwargs):
        if _traced(args, kwargs):
            return standard(self, *args, **kwargs)
        return fast(self, *args, **kwargs)

    # a code object of its own per model: torch.compile caches compiled frames per code object, so a
    # shared one made the 9th compiled model of a process hit dynamo's recompile_limit (8) and run eager
    forward.__code__ = forward.__code__.replace()
    forward._rw_fast = True
    cls._rw_standard_forward = standard
    cls.forward = forward
    record = {"ops_bound": bound, "ops_kept": dict(kept.most_common()), "weights": len(slots),
              "hoisted": hoisted}
    gm.meta[RECORD_KEY] = record
    return record


def _fetcher(slots: list[tuple[dict, str]]):
    def _rw_weights():
        return [slot[key] for slot, key in slots]

    return _rw_weights


def is_installed(gm: fx.GraphModule) -> bool:
    """True while `gm` runs the fast forward (a recompile() drops it)."""
    return getattr(type(gm).__dict__.get("forward"), "_rw_fast", False)


def uninstall(gm: fx.GraphModule) -> None:
    """Back to the standard forward generated by torch.fx."""
    cls = type(gm)
    if is_installed(gm):
        cls.forward = cls._rw_standard_forward
    if "_rw_standard_forward" in cls.__dict__:
        del cls._rw_standard_forward
    gm.meta.pop(RECORD_KEY, None)
