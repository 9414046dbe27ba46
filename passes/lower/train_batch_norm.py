"""TrainBatchNorm: training-mode batch norm updates its running statistics in place, as in eager mode.

Before (training graph after insert_casts):
    bn = _native_batch_norm_legit_functional(x16, weight, bias, running_mean, running_var, True, m, eps)
    y = bn[0];  copy_(running_mean, cast(bn[3]));  copy_(running_var, cast(bn[4]))
After:
    bn = _native_batch_norm_legit(x16, weight, bias, running_mean, running_var, True, m, eps)
    y = bn[0]                              (statistics updated in fp32 inside the kernel, no copy_)

Why: torch.export writes the statistics update functionally, as new tensors copied into the buffers
at the end of the graph. Autograd saves the buffers the functional op read for its backward; the copy_
then bumps their version and `backward()` fails ("modified by an inplace operation"). The in-place op
is the one eager PyTorch runs; with insert_casts leaving batch-norm parameters and statistics in fp32
(op_tables.FP32_PARAM_OPS) it reads a 16-bit input with fp32 weight and statistics, the kernel autocast
uses. Casts that an older graph still has on those tensors are dropped. When the graph has another
shape (the new statistics used elsewhere), the functional op is kept and reads copies of the buffers.
Training conversions only (the evaluation graph reads the statistics and needs nothing).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from rewriter.passes.graph_utils import is_cast
from rewriter.passes.infra import Pass, PassResult
from rewriter import meta
from rewriter.config import ConvertConfig

__all__ = ["TrainBatchNorm"]

_aten = torch.ops.aten
_FUNCTIONAL = _aten._native_batch_norm_legit_functional.default
_INPLACE = _aten._native_batch_norm_legit.default
_COPY = _aten.copy_.default


def _uncast(value):
    """The fp32 parameter or buffer behind `cast(get_attr)`, else `value` itself."""
    if isinstance(value, fx.Node) and is_cast(value):
        src = value.args[0]
        if isinstance(src, fx.Node) and src.op == "get_attr" and meta.value_dtype(src) == torch.float32:
            return src
    return value


def _getitems(node: fx.Node) -> dict[int, fx.Node] | None:
    """{index: getitem node} of a tuple-returning node, None when it has another kind of user."""
    items = {}
    for user in node.users:
        if user.op != "call_function" or getattr(user.target, "__name__", "") != "getitem":
            return None
        items[user.args[1]] = user
    return items


class TrainBatchNorm(Pass):
    name = "train_batch_norm"

    def __init__(self, config: ConvertConfig):
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        count = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is _FUNCTIONAL:
                count += self._in_place(gm.graph, node)
        return PassResult(gm, count > 0)

    # ------------------------------------------------------------------ training batch norm
    def _in_place(self, graph: fx.Graph, node: fx.Node) -> int:
        x, weight, bias, mean, var, training, momentum, eps = node.args
        mean_src, var_src = _uncast(mean), _uncast(var)
        items = _getitems(node)
        dead = self._statistics_updates(items, {3: mean_src, 4: var_src}) if items is not None else None
        if dead is None or not all(isinstance(s, fx.Node) and s.op == "get_attr"
                                   for s in (mean_src, var_src)):
            return self._clone_statistics(graph, node)
        with graph.inserting_before(node):
            new = graph.call_function(_INPLACE, (x, _uncast(weight), _uncast(bias), mean_src, var_src,
                                                 training, momentum, eps))
        new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            new.meta["val"] = tuple(val[:3])
        info = meta.get(node, meta.OP_CLASS)
        if info:
            meta.put(new, meta.OP_CLASS, {**info, "op": "_native_batch_norm_legit"})
        meta.put(new, meta.CREATED, {"pass": self.name, "reason":
                 "batch norm with fp32 parameters and statistics, updated in place (as in eager mode)"})
        for index, item in items.items():
            if index < 3:
                item.replace_input_with(node, new)
        self._mark_stats_fp32(new, (1, 2))
        for dead_node in dead:  # copy_ first, then the casts and getitems that fed them
            graph.erase_node(dead_node)
        graph.erase_node(node)
        for arg in (weight, bias, mean, var):
            if isinstance(arg, fx.Node) and is_cast(arg) and not arg.users:
                graph.erase_node(arg)
        return 1

    @staticmethod
    def _statistics_updates(items: dict[int, fx.Node], buffers: dict[int, fx.Node]):
        """Nodes that write the new running statistics back (getitem -> [cast] -> copy_), in erase
        order, or None when the outputs are used for anything else."""
        dead: list[fx.Node] = []
        for index, item in items.items():
            if index < 3:
                continue
            buffer = buffers.get(index)
            if buffer is None or not isinstance(buffer, fx.Node):
                return None
            chain = [item]
            for user in item.users:
                writes = [user] if not is_cast(user) else list(user.users)
                if is_cast(user):
                    chain.insert(0, user)
                for w in writes:
                    if not (w.op == "call_function" and w.target is _COPY and not w.users
                            and isinstance(w.args[0], fx.Node) and w.args[0].op == "get_attr"
                            and w.args[0].target == buffer.target):
                        return None
                    chain.insert(0, w)
            dead.extend(chain)
        return dead

    def _clone_statistics(self, graph: fx.Graph, node: fx.Node) -> int:
        """Fallback when the pattern differs: give the functional op copies of uncast statistics, so
        the later copy_ into the buffers does not invalidate what autograd saved."""
        count = 0
        for i in (3, 4):
            arg = node.args[i]
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                with graph.inserting_before(node):
                    clone = graph.call_function(_aten.clone.default, (arg,))
                clone.meta.update({k: v for k, v in arg.meta.items() if k in ("val", "nn_module_stack")})
                meta.put(clone, meta.CREATED, {"pass": self.name, "reason":
                         "copy of the running statistics: the in-place update must not change what "
                         "autograd saved"})
                node.update_arg(i, clone)
                count += 1
        return count

    @staticmethod
    def _mark_stats_fp32(node: fx.Node, indices) -> None:
        for user in node.users:
            if getattr(user.target, "__name__", "") == "getitem" and user.args[1] in indices:
                meta.put(user, meta.DTYPE, "float32")
