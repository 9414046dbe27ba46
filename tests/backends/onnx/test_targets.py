"""export_onnx(target=...): 16-bit ops the target's execution provider cannot run are computed in fp32 in
the file, with the reason on node.meta[TARGET] and in the report; the bf16 file for the CPU EP loads and
runs there; the fusion recipe follows the graph's attention."""
from __future__ import annotations

import warnings

import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rewriter
from tests.helpers import rel_l2
from rewriter import meta
from rewriter.backends.onnx import export_onnx, ort_session
from rewriter.backends.onnx.fusion import fusion_recipe
from rewriter.passes.op_tables import op_name

BF16_TOLERANCE = 1e-2  # relative L2 vs fp32: bf16 weights (8 bits of mantissa), fp32 arithmetic in the file


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.fc = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 10)

    def forward(self, x):
        y = F.max_pool2d(torch.relu(self.bn(self.conv1(x))), 2)
        y = torch.relu(self.conv2(y)) + y
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_bf16_conv_model_for_cpu_ep_loads_and_runs(tmp_path):
    torch.manual_seed(0)
    model = _ConvNet().eval()
    x = torch.randn(2, 3, 16, 16)
    gm = rewriter.convert(model, (x,), precision="bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_onnx(gm, tmp_path / "conv-bf16.onnx")  # the model is on the CPU: target ort-cpu
    assert report.target.startswith("ort-cpu") and "CPU" in report.target
    assert report.precision_mismatches == [] and report.cast_chains == 0
    conv = [m for m in report.fallbacks if "(Conv)" in m]
    assert len(conv) == 2 and all("CPU execution provider has no bfloat16 kernel for conv2d" in m for m in conv)
    assert report.initializer_dtypes.get("BFLOAT16", 0) >= 4  # weights stay bf16 in the file, read as fp32
    assert not {"Conv", "Gemm", "MatMul", "Relu", "MaxPool"} & set(report.ops_by_dtype.get("bfloat16", {}))
    decided = {op_name(n) for n in gm.graph.nodes if meta.get(n, meta.TARGET)}
    assert {"conv2d", "relu", "linear"} <= decided  # the decision is on the converted model: rewrite diff shows it

    session = ort_session(report.path, device="cpu")  # loads: every compute op has a kernel there
    x2 = torch.randn(5, 3, 16, 16)
    for batch in (x, x2):
        (got,) = session(batch)
        with torch.no_grad():
            want = model(batch).numpy()
        assert rel_l2(want, got) <= BF16_TOLERANCE


def test_fallback_error_names_node_and_the_ep_with_the_kernel(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    gm = rewriter.convert(model, (torch.randn(2, 8),), precision="bf16")
    with pytest.raises(rewriter.BackendError, match=r"'0/linear.*no bfloat16 kernel for linear.*target ort-cuda"):
        export_onnx(gm, tmp_path / "x.onnx", target="ort-cpu", fallback="error")
    report = export_onnx(gm, tmp_path / "cuda.onnx", target="ort-cuda", fallback="error")  # nothing to refuse
    assert report.fallbacks == [] and report.ops_by_dtype["bfloat16"]["Gemm"] == 2
    with pytest.raises(rewriter.ConfigError, match="'ort-cpu', 'ort-cuda', 'tensorrt'"):
        export_onnx(gm, tmp_path / "y.onnx", target="cuda")


def test_fp16_for_cpu_ep_keeps_its_kernels(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    gm = rewriter.convert(model, (torch.randn(2, 8),), precision="fp16")
    report = export_onnx(gm, tmp_path / "fp16.onnx", target="ort-cpu")
    assert report.fallbacks == [] and report.ops_by_dtype["float16"]["Gemm"] == 2
    assert onnx.load(report.path).opset_import[0].version == 18


class _Attention(nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.qkv, self.causal = nn.Linear(16, 48), causal

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


@pytest.mark.parametrize("causal, recipe", [(True, "gpt2"), (False, "bert")])
def test_fusion_recipe_from_the_attention(causal, recipe):
    gm = rewriter.convert(_Attention(causal).eval(), (torch.randn(2, 8, 16),), precision="fp16")
    chosen, why = fusion_recipe(gm)
    assert chosen == recipe
    assert ("causal" in why) and (("is_causal=True" in why) == causal)
