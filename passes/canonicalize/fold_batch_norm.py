"""FoldBatchNorm: fold eval-mode batch norm into the convolution that feeds it.

Before: x -> conv2d(w, b) -> batch_norm(gamma, beta, mean, var) -> relu
After:  x -> conv2d(w * s, (b - mean) * s + beta) -> relu,     s = gamma / sqrt(var + eps)

Computed in fp32 before any cast, so the folded weights are rounded once. Conv nets at large batch are
memory-bound between convolutions: one elementwise pass per batch norm disappears. Only in eval mode,
only when the convolution feeds nothing but the batch norm and every tensor involved is a stored
parameter or buffer.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from rewriter.passes.graph_utils import attr_owner
from rewriter.passes.infra import Pass, PassResult
from rewriter import meta
from rewriter.config import ConvertConfig

__all__ = ["FoldBatchNorm"]

_CONVS = {torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default,
          F.conv1d, F.conv2d, F.conv3d}
_BN_LEGIT = torch.ops.aten._native_batch_norm_legit_no_training.default


def _attr(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The stored tensor behind a get_attr node (None for an absent optional); LookupError otherwise."""
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise LookupError(node)
    return getattr(*attr_owner(gm, node.target))




def _bn_parts(node):
    """(input, weight, bias, mean, var, eps, output_node) of a batch norm in either graph kind."""
    if node.op != "call_function":
        return None
    if node.target is _BN_LEGIT:
        x, w, b, mean, var, _momentum, eps = node.args[:7]
        users = list(node.users)
        if any(u.target is not operator.getitem for u in users):
            return None
        first = [u for u in users if u.args[1] == 0]
        if len(first) != 1 or any(u.users for u in users if u.args[1] != 0):
            return None
        return x, w, b, mean, var, eps, first[0]
    if node.target is F.batch_norm and not node.kwargs:
        args = list(node.args) + [None] * (8 - len(node.args))
        x, mean, var, w, b, training, _momentum, eps = args[:8]
        if training:
            return None
        return x, w, b, mean, var, (1e-5 if eps is None else eps), node
    return None


class FoldBatchNorm(Pass):
    name = "fold_batch_norm"

    def __init__(self, config: ConvertConfig):
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        count = 0
        for bn in list(graph.nodes):
            parts = _bn_parts(bn)
            if parts is None:
                continue
            conv, w_bn, b_bn, mean, var, eps, out = parts
            if not (isinstance(conv, fx.Node) and conv.op == "call_function" and conv.target in _CONVS
                    and len(conv.users) == 1 and not conv.kwargs):
                continue
            try:
                weight, bias = _attr(gm, conv.args[1]), _attr(gm, conv.args[2] if len(conv.args) > 2 else None)
                gamma, beta, rmean, rvar = (_attr(gm, n) for n in (w_bn, b_bn, mean, var))
            except LookupError:
                continue
            if weight is None or rmean is None or rvar is None or weight.dtype != torch.float32:
                continue
            if len(conv.args[1].users) != 1:
                continue  # a weight shared with another op cannot absorb this batch norm's scale
            with torch.no_grad():
                scale = (gamma if gamma is not None else torch.ones_like(rvar)) / torch.sqrt(rvar + eps)
                new_w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
                new_b = ((bias if bias is not None else torch.zeros_like(rmean)) - rmean) * scale
                new_b = new_b + (beta if beta is not None else 0)
            module, wname = attr_owner(gm, conv.args[1].target)
            module._parameters[wname] = nn.Parameter(new_w.detach(), requires_grad=False)
            bias_target = f"{conv.args[1].target.rpartition('.')[0]}.bias".lstrip(".")
            if len(conv.args) > 2 and conv.args[2] is not None:
                bias_target = conv.args[2].target
                if len(conv.args[2].users) != 1:
                    bias_target += "_folded"
            bmod, bname = attr_owner(gm, bias_target)
            bmod._parameters[bname] = nn.Parameter(new_b.detach(), requires_grad=False)
            with graph.inserting_before(conv):
                bias_node = graph.get_attr(bias_target)
            bias_node.meta["val"] = torch.empty(new_b.shape, dtype=new_b.dtype, device="meta")
            args = list(conv.args) + [None] * max(0, 3 - len(conv.args))
            args[2] = bias_node
            conv.args = tuple(args)
            path = meta.module_path(bn) or bn.name
            notes = list(meta.get(conv, meta.REWRITTEN) or [])
            notes.append({"pass": self.name, "reason": f"batch norm '{path}' folded into this convolution "
                                                       "(eval mode: running statistics are constants)"})
            meta.put(conv, meta.REWRITTEN, notes)
            out.replace_all_uses_with(conv)
            for user in list(bn.users):
                graph.erase_node(user)
            if bn in graph.nodes and not bn.users:
                graph.erase_node(bn)
            count += 1
        if count:
            _drop_unused_attrs(gm)
        return PassResult(gm, count > 0)


def _drop_unused_attrs(gm: fx.GraphModule) -> None:
    """Remove get_attr nodes nobody reads any more and the tensors only they referred to."""
    graph = gm.graph
    dropped, used = set(), set()
    for node in list(graph.nodes):
        if node.op == "get_attr":
            if node.users:
                used.add(str(node.target))
            else:
                dropped.add(str(node.target))
                graph.erase_node(node)
    for target in dropped - used:
        module, attr = attr_owner(gm, target)
        module._parameters.pop(attr, None)
        module._buffers.pop(attr, None)
