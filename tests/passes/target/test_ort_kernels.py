"""OrtKernels: the 16-bit ops an ONNX Runtime target cannot run get node.meta[TARGET] (fp32, with the
reason) before export; the graph is left as it is; the table agrees with the installed EPs (the CUDA cases
run where onnxruntime-gpu is installed)."""
from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper

import rewriter
from rewriter import meta
from rewriter.errors import ConfigError
from rewriter.passes import OrtKernels
from rewriter.passes.infra import graph_signature
from rewriter.passes.op_tables import op_name, target_gap


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.mean(dim=(2, 3)).view(x.shape[0], 8))


def _converted(precision):
    torch.manual_seed(0)
    return rewriter.convert(_Conv().eval(), (torch.randn(2, 3, 8, 8),), precision=precision)


def _targets(gm) -> dict[str, str]:
    return {op_name(n): meta.get(n, meta.TARGET)["reason"] for n in gm.graph.nodes if meta.get(n, meta.TARGET)}


def test_bf16_on_cpu_ep_records_fp32_with_reason():
    gm = _converted("bf16")
    before = graph_signature(gm)
    result = OrtKernels("ort-cpu")(gm)
    assert result.modified is False and graph_signature(gm) == before
    decided = _targets(gm)
    assert {"conv2d", "relu", "linear"} <= set(decided)
    assert "CPU execution provider has no bfloat16 kernel for conv2d" in decided["conv2d"]
    assert "exists on target ort-cuda" in decided["linear"]  # the reason says where it runs
    assert all(meta.get(n, meta.TARGET)["dtype"] == "float32" and meta.get(n, meta.TARGET)["rule"] == "target:ort-cpu"
               for n in gm.graph.nodes if meta.get(n, meta.TARGET))
    assert not any(op_name(n) in ("view", "_to_copy") for n in gm.graph.nodes if meta.get(n, meta.TARGET))
    again = OrtKernels("ort-cpu")(gm)  # the same records again
    assert again.modified is False and _targets(gm) == decided


class _Pool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)


def test_other_target_replaces_the_records_and_fp16_keeps_kernels():
    gm = _converted("bf16")
    OrtKernels("ort-cpu")(gm)
    OrtKernels("ort-cuda")(gm)
    assert _targets(gm) == {}  # the CUDA EP has bf16 Conv (measured: onnxruntime-gpu 1.31.1), GEMMs, elementwise
    torch.manual_seed(0)
    pool = rewriter.convert(_Pool().eval(), (torch.randn(2, 3, 8, 8),), precision="bf16")
    OrtKernels("ort-cuda")(pool)
    decided = _targets(pool)
    assert set(decided) == {"max_pool2d"}  # no bf16 MaxPool on the CUDA EP (nor on the CPU EP)
    assert "CUDA execution provider has no bfloat16 kernel for max_pool2d" in decided["max_pool2d"]
    assert "exists on target" not in decided["max_pool2d"]
    fp16 = _converted("fp16")
    OrtKernels("ort-cpu")(fp16)
    assert _targets(fp16) == {}  # every op here has an fp16 kernel (the CPU EP casts the rest itself)


def test_diff_shows_the_target_decision():
    gm = _converted("bf16")
    OrtKernels("ort-cpu")(gm)
    rows = {e.name: e for e in rewriter.diff(gm, gm).nodes}
    conv = next(n.name for n in gm.graph.nodes if op_name(n) == "conv2d")
    assert rows[conv].rule == "target:ort-cpu"
    assert "target:ort-cpu: ONNX Runtime's CPU execution provider has no bfloat16 kernel for conv2d" in rows[conv].reason


def test_unknown_target_is_refused():
    with pytest.raises(ConfigError, match="'ort-cpu', 'ort-cuda', 'tensorrt'"):
        OrtKernels("cpu")


_ONE_NODE = {  # op of the converted graph -> (ONNX op, inputs, attributes) it exports to
    "conv2d": ("Conv", [[1, 4, 4, 4], [4, 4, 1, 1]], {}),
    "linear": ("MatMul", [[4, 4], [4, 4]], {}),
    "add": ("Add", [[4, 4], [4, 4]], {}),
    "relu": ("Relu", [[4, 4]], {}),
    "softmax": ("Softmax", [[4, 4]], {}),
    "gelu": ("Gelu", [[4, 4]], {}),
    "max_pool2d": ("MaxPool", [[1, 4, 4, 4]], {"kernel_shape": [2, 2]}),
    "layer_norm": ("LayerNormalization", [[4, 4], [4]], {}),
    "clamp": ("Clip", [[4, 4]], {}),
    "topk": None,  # on the list for fp16 only
}


_EPS = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider"}


@pytest.mark.parametrize("target", ["ort-cpu", "ort-cuda"])
@pytest.mark.parametrize("op", [k for k, v in _ONE_NODE.items() if v is not None])
def test_bf16_table_matches_the_installed_onnxruntime(op, target):
    """A one-node bfloat16 model loads on the target's EP alone (no CPU fallback) exactly when the table
    says the EP has the kernel. The CUDA case runs where onnxruntime-gpu is installed (the GPU machine)."""
    import onnxruntime as ort

    provider = _EPS[target]
    if provider not in ort.get_available_providers():
        pytest.skip(f"{provider} is not in this onnxruntime ({ort.get_available_providers()})")
    onnx_op, shapes, attrs = _ONE_NODE[op]
    inputs = [helper.make_tensor_value_info(f"i{k}", TensorProto.BFLOAT16, s) for k, s in enumerate(shapes)]
    output = helper.make_tensor_value_info("o", TensorProto.BFLOAT16, None)
    graph = helper.make_graph([helper.make_node(onnx_op, [i.name for i in inputs], ["o"], **attrs)], "g",
                              inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])
    model.ir_version = 10  # opset 22's; a newer onnx writes an IR an older onnxruntime refuses (1.31.1: <= 13)
    options = ort.SessionOptions()
    if provider != "CPUExecutionProvider":  # a node without a kernel there may not run on the CPU instead
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=[provider])
        loads = True
    except Exception as exc:  # no kernel for this dtype on that EP; the CUDA EP of onnxruntime-gpu 1.31.1 says
        # so for a bf16 MaxPool as "transformer_memcpy.cc ... Provider type for MaxPool node with name '' is not set"
        text = str(exc)
        assert ("implementation" in text or "fallback" in text.lower() or "assigned" in text
                or ("Provider type for" in text and "is not set" in text)), text
        loads = False
    assert target_gap(target, "bfloat16", op) == (not loads), onnx.helper.printable_graph(graph)
