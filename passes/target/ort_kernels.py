"""OrtKernels: decide, before ONNX export, which 16-bit ops run in fp32 because the target's execution
provider has no kernel for them; the decision and its reason go to node.meta[TARGET].

Before: conv2d(bf16) [DECISION bfloat16]                              target "ort-cpu"
After:  conv2d(bf16) [DECISION bfloat16, TARGET {"dtype": "float32", "reason": "... no bfloat16 Conv ..."}]

An analysis pass: the graph is not edited (the torch model still computes as converted); the ONNX
backend reads TARGET and wraps the node's ONNX ops in Casts to fp32 (backends/onnx/kernels.py), and
`rewrite diff` shows the reason. Which ops lack which kernel on which target is one table in
passes/op_tables.py (`target_gap`). The FP8 GEMMs are left alone: their Q/DQ translation picks a
dtype the target's Q/DQ kernels take, float or float16 (backends/onnx/fp8.py qdq_compute). A second
run writes the same records.
"""
from __future__ import annotations

import torch.fx as fx

from rewriter import meta
from rewriter.errors import ConfigError
from rewriter.passes.infra import AnalysisPass, PassResult
from rewriter.passes.op_tables import EXPORT_TARGETS, op_name, target_gap

__all__ = ["OrtKernels"]

_LOWP = ("float16", "bfloat16")
_EXEMPT = ("fp8_linear", "fp8_linear_train")


def _compute_dtype(node: fx.Node) -> str | None:
    decision = meta.get(node, meta.DECISION)
    if decision:
        return decision.get("dtype")
    return meta.dtype_name(meta.value_dtype(node)) if meta.CREATED in node.meta else None


class OrtKernels(AnalysisPass):
    """Record node.meta[TARGET] on every 16-bit node the export target cannot run in 16 bits.

    Args:
        target: "ort-cpu", "ort-cuda" or "tensorrt" (passes/op_tables.py EXPORT_TARGETS).

    Example:
        >>> OrtKernels("ort-cpu")(converted)   # then backends/onnx exports those nodes in fp32
    """

    name = "ort_kernels"

    def __init__(self, target: str):
        if target not in EXPORT_TARGETS:
            raise ConfigError(f"target={target!r}: write one of {', '.join(repr(t) for t in EXPORT_TARGETS)}")
        self.target = target

    def call(self, gm: fx.GraphModule) -> PassResult:
        where = EXPORT_TARGETS[self.target]
        others = [t for t in EXPORT_TARGETS if t != self.target]
        for node in gm.graph.nodes:
            node.meta.pop(meta.TARGET, None)  # a record of an earlier export for another target
            if node.op != "call_function":
                continue
            dtype, name = _compute_dtype(node), op_name(node)
            if dtype not in _LOWP or name in _EXEMPT or not target_gap(self.target, dtype, name):
                continue
            runs_on = [t for t in others if not target_gap(t, dtype, name)]
            meta.put(node, meta.TARGET, {
                "target": self.target, "dtype": "float32", "rule": f"target:{self.target}",
                "reason": f"{where} has no {dtype} kernel for {name}: computed in fp32 in the ONNX file"
                          + (f" (a {dtype} kernel exists on target {' or '.join(runs_on)})" if runs_on else ""),
            })
        return PassResult(gm, False)
