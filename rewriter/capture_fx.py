"""The capture fallback when torch.export fails: torch.fx.symbolic_trace plus shape propagation.

The parameterised leaf modules (Linear, Conv, norms, Embedding) are inlined as functional calls on
get_attr parameters, so both capture paths give the same kind of graph: parameters as get_attr nodes,
dtype/shape on every node (ShapeProp), module path in nn_module_stack. A failure remembers the
innermost module being traced (`exc._rewriter_module`) so the CaptureError can name it.
"""
from __future__ import annotations

import inspect

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from rewriter import autocast_regions

__all__ = ["symbolic_trace"]



class _PathTracer(fx.Tracer):
    """symbolic_trace that records the module path of every node and names the failing module."""

    def __init__(self):
        super().__init__()
        self.stack: list[tuple[str, type]] = []

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.stack.append((path, type(m)))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            # the stack unwinds before trace() sees the error: remember the innermost module now
            if not hasattr(exc, "_rewriter_module"):
                exc._rewriter_module = self.innermost()  # type: ignore[attr-defined]
            raise
        finally:
            self.stack.pop()

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        stack = {p: (p, f"{t.__module__}.{t.__qualname__}") for p, t in self.stack if p}
        if kind == "call_module":
            mod = self.root.get_submodule(target)
            stack[target] = (target, f"{type(mod).__module__}.{type(mod).__qualname__}")
        if stack:
            node.meta["nn_module_stack"] = stack
        return node

    def innermost(self) -> str:
        return self.stack[-1][0] if self.stack and self.stack[-1][0] else "<top level>"


def _inline_leaf_modules(gm: fx.GraphModule) -> None:
    """Replace call_module nodes of parameterised leaf modules by functional calls on get_attr params."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or node.kwargs:
            continue
        mod = gm.get_submodule(node.target)
        call = _functional_form(mod)
        if call is None:
            continue
        fn, params, make_args = call
        with graph.inserting_before(node):
            getters = {p: (graph.get_attr(f"{node.target}.{p}") if getattr(mod, p) is not None else None)
                       for p in params}
            for g in getters.values():
                if g is not None:
                    g.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
            new = graph.call_function(fn, make_args(node.args[0], getters), {})
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()


def _functional_form(mod):
    if isinstance(mod, nn.Linear):
        return F.linear, ("weight", "bias"), lambda x, g: (x, g["weight"], g["bias"])
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.padding_mode == "zeros" \
            and not isinstance(mod.padding, str):
        fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(mod.kernel_size)]
        return fn, ("weight", "bias"), lambda x, g: (x, g["weight"], g["bias"], mod.stride, mod.padding,
                                                     mod.dilation, mod.groups)
    if isinstance(mod, nn.LayerNorm):
        return F.layer_norm, ("weight", "bias"), lambda x, g: (x, mod.normalized_shape, g["weight"],
                                                               g["bias"], mod.eps)
    if isinstance(mod, nn.GroupNorm):
        return F.group_norm, ("weight", "bias"), lambda x, g: (x, mod.num_groups, g["weight"], g["bias"],
                                                               mod.eps)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm) and not mod.training and mod.track_running_stats:
        return F.batch_norm, ("running_mean", "running_var", "weight", "bias"), \
            lambda x, g: (x, g["running_mean"], g["running_var"], g["weight"], g["bias"], False,
                          0.0, mod.eps)
    if isinstance(mod, nn.Embedding) and mod.max_norm is None:
        return F.embedding, ("weight",), lambda x, g: (x, g["weight"], mod.padding_idx)
    return None


def symbolic_trace(model, args, kwargs):
    from torch.fx.passes.shape_prop import ShapeProp

    tracer = _PathTracer()
    try:
        with autocast_regions.tracing(tracer):  # the model's autocast regions, on their nodes
            graph = tracer.trace(model)
    except Exception as exc:
        if not hasattr(exc, "_rewriter_module"):
            exc._rewriter_module = tracer.innermost()  # type: ignore[attr-defined]
        raise
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _inline_leaf_modules(gm)
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    flat = [bound.arguments[n.target] for n in gm.graph.nodes if n.op == "placeholder"
            if n.target in bound.arguments]
    ShapeProp(gm).propagate(*flat)
    return gm
