"""FuseLinears: sibling linears that read the same input become one linear and a split.

Before: q = linear(x, Wq, bq); k = linear(x, Wk, bk); v = linear(x, Wv, bv)          3 GEMMs
After:  qkv = linear(x, cat[Wq, Wk, Wv], cat[bq, bk, bv]); q, k, v = split(qkv, [Nq, Nk, Nv], -1)

BERT-style attention (and Llama's q/k/v and gate/up projections) reads one activation in several
GEMMs. One GEMM with the weights side by side computes the same dot products: each output column is
still the dot product of x with one weight row, so only the GEMM kernel's blocking changes, not what is
rounded where (columns never mix). What it saves: two of every three kernel launches and their host
dispatch (eager BERT is bound by host time), a wider GEMM that fills the GPU better, and under FP8 one
quantization of x instead of one per GEMM. The split returns views; the reshapes after it are the same.

Fused only when it changes nothing else: at least two `aten.linear` nodes on the same input node, the
same compute decision (dtype and rule) on each, weights (and biases, all or none) stored tensors of one
dtype and inner size that nothing else reads. Not in training mode: there the parameters are the fp32
master weights an optimizer updates by identity. Runs after `assign` (so user overrides and measured
decisions were applied per original linear; linears with different decisions are not fused) and before
`fp8_cost` (which then sees the wide GEMM). The concatenated tensors are stored on the common parent
module as `fused_<names>_weight` / `_bias`; the originals are dropped, so the weights are held once.
The new linear keeps the first sibling's annotations and says in node.meta[CREATED] what it replaced.
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx as fx
import torch.nn as nn

from rewriter.passes.graph_utils import attr_owner, free_attr_name
from rewriter.passes.infra import Pass, PassResult
from rewriter import meta
from rewriter.config import ConvertConfig

__all__ = ["FuseLinears"]

_LINEAR = torch.ops.aten.linear.default
_SPLIT = torch.ops.aten.split_with_sizes.default


def _stored(gm: fx.GraphModule, node, readers: dict) -> torch.Tensor | None:
    """The tensor a get_attr node reads when this node is its only reader in the graph, else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr" or len(node.users) != 1 \
            or readers[str(node.target)] != 1:
        return None
    module, name = attr_owner(gm, str(node.target))
    tensor = getattr(module, name, None)
    return tensor if isinstance(tensor, torch.Tensor) and meta.is_float_dtype(tensor.dtype) else None


def _parts(gm, node, readers):
    """(weight tensor, bias tensor | None) of a plain linear with stored operands, else None."""
    if node.op != "call_function" or node.target is not _LINEAR or node.kwargs or len(node.args) not in (2, 3):
        return None
    weight = _stored(gm, node.args[1], readers)
    if weight is None or weight.dim() != 2:
        return None
    bias_node = node.args[2] if len(node.args) == 3 else None
    if bias_node is None:
        return weight, None
    bias = _stored(gm, bias_node, readers)
    if bias is None or bias.dim() != 1 or bias.dtype != weight.dtype or bias.shape[0] != weight.shape[0]:
        return None
    return weight, bias


def _key(node) -> tuple:
    decision = meta.get(node, meta.DECISION) or {}
    return decision.get("dtype"), decision.get("rule")


def _common_prefix(targets: list[str]) -> str:
    parts = [t.split(".")[:-1] for t in targets]  # module paths of the weights
    prefix = []
    for names in zip(*parts):
        if len(set(names)) != 1:
            break
        prefix.append(names[0])
    return ".".join(prefix)


def _leaf_names(targets: list[str], prefix: str) -> list[str]:
    cut = len(prefix) + 1 if prefix else 0
    return [t[cut:].rpartition(".")[0].replace(".", "_") or "w" for t in targets]


class FuseLinears(Pass):
    name = "fuse_linears"

    def __init__(self, config: ConvertConfig):
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        readers: dict[str, int] = defaultdict(int)
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                readers[str(node.target)] += 1
        groups: dict[tuple, list[fx.Node]] = defaultdict(list)
        for node in gm.graph.nodes:
            parts = _parts(gm, node, readers)
            if parts is None or not isinstance(node.args[0], fx.Node):
                continue
            weight, bias = parts
            groups[(node.args[0], _key(node), weight.dtype, weight.device, weight.shape[1],
                    bias is not None)].append(node)
        fused = 0
        for siblings in groups.values():
            if len(siblings) >= 2:
                self._fuse(gm, siblings)
                fused += 1
        return PassResult(gm, fused > 0)

    def _fuse(self, gm: fx.GraphModule, siblings: list[fx.Node]) -> None:
        graph = gm.graph
        first = siblings[0]
        w_nodes = [n.args[1] for n in siblings]
        b_nodes = [n.args[2] for n in siblings] if len(first.args) == 3 else []
        targets = [str(n.target) for n in w_nodes]
        prefix = _common_prefix(targets)
        owner = gm.get_submodule(prefix) if prefix else gm
        stem = "fused_" + "_".join(_leaf_names(targets, prefix))
        stored = {n: attr_owner(gm, str(n.target)) for n in w_nodes + b_nodes}  # (module, attribute name)
        sizes = [int(getattr(*stored[n]).shape[0]) for n in w_nodes]
        attrs = []
        for nodes, kind in ((w_nodes, "weight"), (b_nodes, "bias")):
            if not nodes:
                continue
            tensors = [getattr(*stored[n]) for n in nodes]
            name = free_attr_name(owner, f"{stem}_{kind}")
            owner.register_parameter(name, nn.Parameter(torch.cat([t.detach() for t in tensors]),
                                                        requires_grad=False))
            attrs.append(f"{prefix}.{name}" if prefix else name)
        with graph.inserting_before(first):
            getters = [graph.get_attr(a) for a in attrs]
            linear = graph.call_function(_LINEAR, (first.args[0], *getters))
            split = graph.call_function(_SPLIT, (linear, sizes, -1))
            items = [graph.call_function(operator.getitem, (split, i)) for i in range(len(siblings))]
        names = ", ".join(t.rpartition(".")[0] for t in targets)
        width = sum(sizes)
        reason = (f"{len(siblings)} linears read {first.args[0].name}: one GEMM to {width} outputs "
                  f"instead of {len(siblings)} ({names}), split into views")
        self._annotate(first, siblings, getters, linear, split, items, reason, w_nodes, b_nodes)
        for old, item in zip(siblings, items):
            old.replace_all_uses_with(item)
        for old in siblings:
            graph.erase_node(old)
        for getter in w_nodes + b_nodes:
            graph.erase_node(getter)
        for module, name in stored.values():
            delattr(module, name)

    def _annotate(self, first, siblings, getters, linear, split, items, reason, w_old, b_old) -> None:
        stack = first.meta.get("nn_module_stack")
        parent = dict(list(stack.items())[:-1]) if stack and len(stack) > 1 else stack
        vals = [n.meta.get("val") for n in siblings]
        for node in [*getters, linear, split, *items]:
            if parent is not None:
                node.meta["nn_module_stack"] = parent
            if "stack_trace" in first.meta:
                node.meta["stack_trace"] = first.meta["stack_trace"]
        for getter, old in zip(getters, (w_old, b_old)):
            parts = [n.meta.get("val") for n in old]
            if parts and all(isinstance(v, torch.Tensor) for v in parts):
                try:
                    getter.meta["val"] = torch.cat(parts)
                except Exception:
                    pass
            if "val" not in getter.meta and meta.value_dtype(old[0]) is not None:
                meta.put(getter, meta.DTYPE, meta.dtype_name(meta.value_dtype(old[0])))
            meta.put(getter, meta.CREATED, {"pass": self.name, "reason": f"concatenated parameter: {reason}"})
        decision = dict(meta.get(first, meta.DECISION) or {})
        if meta.OP_CLASS in first.meta:
            meta.put(linear, meta.OP_CLASS, first.meta[meta.OP_CLASS])
        if decision:
            meta.put(linear, meta.DECISION, decision)
        meta.put(linear, meta.CREATED, {"pass": self.name, "reason": reason})
        if all(isinstance(v, torch.Tensor) for v in vals):
            try:
                linear.meta["val"] = torch.cat(vals, dim=-1)
                split.meta["val"] = tuple(vals)
            except Exception:  # fake tensors from another mode: the shapes are what later passes read
                pass
        follow = {"class": "follow", "op": "split_with_sizes", "exact": True,
                  "reason": "splits the fused GEMM's output into views"}
        meta.put(split, meta.OP_CLASS, follow)
        meta.put(split, meta.CREATED, {"pass": self.name, "reason": reason})
        if decision:
            meta.put(split, meta.DECISION, {"dtype": decision.get("dtype"), "rule": "follow",
                                            "reason": f"views of {linear.name}"})
        for item, old, val in zip(items, siblings, vals):
            if val is not None:
                item.meta["val"] = val
            item.meta["nn_module_stack"] = old.meta.get("nn_module_stack", parent)
            meta.put(item, meta.OP_CLASS, dict(follow, op="getitem", reason=f"the part of {old.name}"))
            if decision:
                meta.put(item, meta.DECISION, {"dtype": decision.get("dtype"), "rule": "follow",
                                               "reason": f"element of {split.name}"})
            meta.put(item, meta.CREATED, {"pass": self.name, "reason": f"was {old.name}: {reason}"})
