"""ChannelsLast: store 4-D convolution weights in channels_last layout (16-bit eval models).

Before: conv2d(x, weight[NCHW-contiguous])   cuDNN transposes around NHWC tensor-core kernels
After:  conv2d(x, weight[channels_last])     the output is channels_last and stays so downstream

Values are unchanged: only the memory layout of the stored weight differs. Applied when the graph has
2-D convolutions running in 16-bit, the case where NHWC kernels pay on tensor-core GPUs.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from rewriter.passes.graph_utils import attr_owner
from rewriter.passes.infra import Pass, PassResult
from rewriter import meta
from rewriter.config import ConvertConfig

__all__ = ["ChannelsLast"]

_CONV2D = {torch.ops.aten.conv2d.default, F.conv2d}


class ChannelsLast(Pass):
    name = "channels_last"

    def __init__(self, config: ConvertConfig):
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        count = 0
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in _CONV2D:
                continue
            weight = node.args[1]
            decision = meta.get(node, meta.DECISION) or {}
            if decision.get("dtype") not in ("float16", "bfloat16") or weight.op != "get_attr":
                continue
            module, name = attr_owner(gm, weight.target)
            tensor = getattr(module, name)
            if tensor.dim() != 4 or tensor.is_contiguous(memory_format=torch.channels_last):
                continue
            new = tensor.detach().contiguous(memory_format=torch.channels_last)
            if name in module._parameters:
                module._parameters[name] = torch.nn.Parameter(new, requires_grad=False)
            else:
                module._buffers[name] = new
            notes = list(meta.get(node, meta.REWRITTEN) or [])
            notes.append({"pass": self.name, "reason": "weight stored channels_last for NHWC conv kernels"})
            meta.put(node, meta.REWRITTEN, notes)
            count += 1
        return PassResult(gm, count > 0)
