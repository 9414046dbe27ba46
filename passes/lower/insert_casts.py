"""InsertCasts: make every node compute in the dtype `assign` decided, with casts at island boundaries.

Before: x(fp32) -> linear -> softmax -> output
After:  x(fp32) -> cast(fp16) -> linear(fp16) -> cast(fp32) -> softmax(fp32) -> output(fp32)

One cast per (value, dtype), placed before the first node that needs it and shared by the others.
Ops that promote (add, mul, cat, where...) get no cast when PyTorch's own type promotion already
yields the decided dtype: add(fp16, fp32) reads both and computes in fp32 in one kernel. Promote ops
whose kernels want equal dtypes (index_put, scatter, lerp, dot...) get their inputs cast.
Graph outputs are cast back to their original dtype unless keep_io_types is off. Each cast records
which consumer needed it and why (node.meta[CREATED]). Batch norm casts only its input: its
statistics and affine parameters are read in fp32, as under autocast (op_tables.FP32_PARAM_OPS).
torch.export guards each `.to()`/`.float()` with `_assert_tensor_metadata(x, dtype=<traced dtype>)`;
where x now has another dtype the assert is updated to it, else the graph would fail at run time.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from rewriter.passes.graph_utils import (explicit_dtype, is_cast, is_metadata_assert, make_cast, natural_promotion,
                                original_dtype)
from rewriter.passes.infra import Pass, PassResult
from rewriter.passes.op_tables import promotes_natively, reads_fp32_params
from rewriter import meta
from rewriter.config import ConvertConfig

__all__ = ["InsertCasts"]

_ASSERT_DTYPE_ARG = 3  # _assert_tensor_metadata(a, size=None, stride=None, dtype=None, *, device, layout)


class InsertCasts(Pass):
    name = "insert_casts"

    def __init__(self, config: ConvertConfig):
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        count = 0
        casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
        for node in graph.nodes:  # reuse casts a previous run made
            if is_cast(node):
                casts.setdefault((node.args[0], node.kwargs["dtype"]), node)

        def cast_of(value: fx.Node, dtype: torch.dtype, consumer: fx.Node, reason: str) -> fx.Node:
            nonlocal count
            key = (value, dtype)
            if key not in casts:
                casts[key] = make_cast(graph, value, dtype, consumer, reason, self.name)
                count += 1
            return casts[key]

        for node in list(graph.nodes):
            if node.op == "output":
                if self.config.keep_io_types:
                    self._restore_outputs(node, cast_of)
                continue
            if is_metadata_assert(node):
                count += _retarget_dtype_assert(node)
                continue
            decision = meta.get(node, meta.DECISION)
            if decision is None or is_cast(node):
                continue
            want = meta.dtype_from_name(decision["dtype"])
            op_class = (meta.get(node, meta.OP_CLASS) or {}).get("class")
            # add(fp16, fp32) already computes in fp32 inside one kernel: an explicit cast would only
            # add a kernel and a round trip through memory, for the same values.
            op = (meta.get(node, meta.OP_CLASS) or {}).get("op", node.name)
            absorbed = (op_class == "promote" and promotes_natively(op)
                        and natural_promotion(node) == want)
            values = [] if absorbed else list(node.all_input_nodes)
            if reads_fp32_params(op):  # batch norm: cast the input, never its fp32 statistics
                values = [v for v in values if v is node.args[0]]
            for value in values:
                have = meta.value_dtype(value)
                if not meta.is_float_dtype(have) or have == want:
                    continue
                reason = (f"{op} '{node.name}' runs in {meta.dtype_name(want)} "
                          f"({decision['rule']}) but reads {value.name} in {meta.dtype_name(have)}")
                node.replace_input_with(value, cast_of(value, want, node, reason))
            out = original_dtype(node)
            new = out if explicit_dtype(node) is not None else want
            if meta.is_float_dtype(out) and meta.get(node, meta.DTYPE) != meta.dtype_name(new):
                meta.put(node, meta.DTYPE, meta.dtype_name(new))
                count += 1
        return PassResult(gm, count > 0)

    def _restore_outputs(self, output: fx.Node, cast_of) -> None:
        for value in list(output.all_input_nodes):
            have, want = meta.value_dtype(value), original_dtype(value)
            if meta.is_float_dtype(have) and meta.is_float_dtype(want) and have != want:
                reason = f"model output {value.name} keeps its original dtype {meta.dtype_name(want)}"
                output.replace_input_with(value, cast_of(value, want, output, reason))


def _retarget_dtype_assert(node: fx.Node) -> int:
    """Make an export dtype assert check the dtype its tensor has after the rewrite; 1 if changed."""
    positional = len(node.args) > _ASSERT_DTYPE_ARG
    asserted = node.args[_ASSERT_DTYPE_ARG] if positional else node.kwargs.get("dtype")
    have = meta.value_dtype(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    if not (meta.is_float_dtype(asserted) and meta.is_float_dtype(have)) or asserted == have:
        return 0
    if positional:
        node.update_arg(_ASSERT_DTYPE_ARG, have)
    else:
        node.update_kwarg("dtype", have)
    return 1
