"""CastWeights: store each parameter and buffer once, in the precision of the ops that read it.

Before: weight(get_attr, fp32) -> cast(fp16) -> linear(fp16)       (cast on every call)
After:  weight(get_attr, fp16) -> linear(fp16)                      (cast once, half the bytes)

A tensor read in two precisions (a tied embedding also used by an fp16 head) keeps its original and
gets one extra converted copy beside it. In training mode nothing is done: parameters stay fp32 master
weights and the casts stay in the graph, so autograd and optimizers work unchanged.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.fx as fx
import torch.nn as nn

from rewriter.passes.graph_utils import attr_owner, cast_target, is_cast
from rewriter.passes.infra import Pass, PassResult
from rewriter import meta
from rewriter.config import ConvertConfig

__all__ = ["CastWeights"]


@contextlib.contextmanager
def _one_thread():
    """Run the weight casts on one intra-op thread.

    A cast is memory-bound, so one thread moves the bytes about as fast as two; but every `.to()` of a
    tensor above ATen's grain size opens an OpenMP parallel region, and on a busy 2-core machine waking
    the second thread costs up to ~20 ms per region: 290 casts of a 24-layer BERT took 3.6 s instead
    of 0.3 s (tools/bench_convert.py). The previous thread count is restored afterwards.
    """
    before = torch.get_num_threads()
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)




class CastWeights(Pass):
    name = "cast_weights"

    def __init__(self, config: ConvertConfig):
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        with _one_thread():
            return self._cast(gm)

    def _cast(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        by_target: dict[str, list[fx.Node]] = defaultdict(list)
        for node in graph.nodes:
            if node.op == "get_attr":
                by_target[str(node.target)].append(node)
        count = 0
        for target, getters in by_target.items():
            module, name = attr_owner(gm, target)
            tensor = getattr(module, name, None)
            if not isinstance(tensor, torch.Tensor) or not meta.is_float_dtype(tensor.dtype):
                continue
            groups: dict[torch.dtype, list[fx.Node]] = defaultdict(list)
            others = 0
            for g in getters:
                for user in g.users:
                    if is_cast(user) and meta.is_float_dtype(cast_target(user)):
                        groups[cast_target(user)].append(user)
                    else:
                        others += 1
            if not groups:
                continue
            if others == 0 and len(groups) == 1:
                (dtype, casts), = groups.items()
                self._replace(module, name, tensor.detach().to(dtype))
                for g in getters:
                    meta.put(g, meta.DTYPE, meta.dtype_name(dtype))
                for cast in casts:
                    cast.replace_all_uses_with(cast.args[0])
                    graph.erase_node(cast)
                    count += 1
                continue
            for dtype, casts in groups.items():
                copy_name = f"{name}_{meta.dtype_name(dtype)}"
                if not hasattr(module, copy_name):
                    module.register_buffer(copy_name, tensor.detach().to(dtype))
                copy_target = f"{target.rpartition('.')[0]}.{copy_name}".lstrip(".")
                for cast in casts:
                    with graph.inserting_before(cast):
                        getter = graph.get_attr(copy_target)
                    getter.meta.update({k: v for k, v in cast.args[0].meta.items() if k == "nn_module_stack"})
                    meta.put(getter, meta.DTYPE, meta.dtype_name(dtype))
                    meta.put(getter, meta.CREATED, {"pass": self.name, "reason":
                             f"{target} is read in several precisions: {meta.dtype_name(dtype)} copy"})
                    cast.replace_all_uses_with(getter)
                    graph.erase_node(cast)
                    count += 1
        return PassResult(gm, count > 0)

    @staticmethod
    def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(value, requires_grad=False)
        elif name in module._buffers:
            module._buffers[name] = value
        else:
            setattr(module, name, value)
