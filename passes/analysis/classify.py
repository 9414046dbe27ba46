"""Classify: give every node its numerical-sensitivity class from the op table.

Before: linear -> gelu -> layer_norm -> softmax
After (node.meta[OP_CLASS]): linear=lowp, gelu=follow, layer_norm=fp32, softmax=fp32

Nodes that compute nothing in floating point (integer math, shapes, masks), explicit casts and float64
code are UNTOUCHED. The class is a static fact; `assign` turns classes, measurements and overrides into
one dtype per node.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from rewriter.passes.graph_utils import explicit_dtype, float_inputs, is_tuple_getitem, original_dtype
from rewriter.passes.infra import AnalysisPass, PassResult
from rewriter.passes.op_tables import INPUT_DTYPE_FACTORIES, OpClass, is_exact, op_class, op_name
from rewriter import meta

__all__ = ["Classify"]

_COMPUTE = ("call_function", "call_method", "call_module")


class Classify(AnalysisPass):
    name = "classify"

    def call(self, gm: fx.GraphModule) -> PassResult:
        for node in gm.graph.nodes:
            if node.op not in _COMPUTE:
                continue
            name = op_name(node)
            cls, reason = op_class(name)
            out = original_dtype(node)
            ins = float_inputs(node)
            dtypes = {original_dtype(n) for n in node.all_input_nodes} | {out}
            if (name in INPUT_DTYPE_FACTORIES and ins and ins[0] is node.args[0]
                    and explicit_dtype(node) is None and meta.is_float_dtype(out)):
                # zeros_like(x) is made in x's dtype: when x changes precision, so does it
                cls, reason = OpClass.FOLLOW, f"{name} makes a tensor in the dtype of its input"
            if _owns_float_weights(node) and cls is not OpClass.UNTOUCHED:
                # symbolic_trace keeps LSTM/GRU/MultiheadAttention as module calls: their weights are
                # not graph values, so they stay fp32 and a 16-bit input would not match them
                cls, reason = OpClass.FP32, (f"module call {node.target} ({name}) computes with its own "
                                             "fp32 weights, which the graph cannot cast: kept fp32")
            if is_tuple_getitem(node):
                if meta.is_float_dtype(out):
                    cls, reason = OpClass.FOLLOW, f"element of {node.args[0].name}"
                else:
                    cls, reason = OpClass.UNTOUCHED, "non-floating element of a tuple"
            elif cls is not OpClass.UNTOUCHED:
                if out is None and not node.users and not _is_multi_float(node):
                    cls, reason = OpClass.UNTOUCHED, f"{name} returns no tensor (a guard or assert)"
                elif torch.float64 in dtypes:
                    cls, reason = OpClass.UNTOUCHED, f"{name} computes in float64: left as written"
                elif not ins and not meta.is_float_dtype(out) and not _is_multi_float(node):
                    cls, reason = OpClass.UNTOUCHED, f"{name} has no floating-point inputs or outputs"
                elif not ins and cls is not OpClass.LOWP:
                    cls, reason = OpClass.UNTOUCHED, f"{name} creates a tensor of explicit dtype"
            meta.put(node, meta.OP_CLASS, {"op": name, "class": cls.value, "exact": is_exact(name),
                                           "reason": reason})
        return PassResult(gm, False)


def _owns_float_weights(node) -> bool:
    if node.op != "call_module" or node.graph.owning_module is None:
        return False
    module = node.graph.owning_module.get_submodule(node.target)
    return any(t.is_floating_point() for t in list(module.parameters()) + list(module.buffers()))


def _is_multi_float(node) -> bool:
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    return isinstance(val, (tuple, list)) and any(
        meta.is_float_dtype(getattr(v, "dtype", None)) for v in val)
