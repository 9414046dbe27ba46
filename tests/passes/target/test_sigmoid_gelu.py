"""SigmoidGelu: tanh-GELUs become x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)) in fp32, the same function,
only in graphs inductor compiles."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rewriter
from rewriter.backends.torch_backend import graph_module_of
from rewriter.passes.plan.fp8_cost import Fp8Options
from rewriter.passes import SigmoidGelu
from rewriter import meta
from rewriter.config import ConvertConfig
from rewriter.pipeline import build_passes
from helpers import check_graph_nodes, rel_l2

_A = torch.ops.aten


class _Mlp(nn.Module):
    def __init__(self, approximate="tanh"):
        super().__init__()
        self.up, self.down, self.approximate = nn.Linear(32, 64), nn.Linear(64, 32), approximate

    def forward(self, x):
        return self.down(F.gelu(self.up(x), approximate=self.approximate))


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _gelu_graph(dtype):
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta[meta.DTYPE] = meta.dtype_name(dtype)
    y = graph.call_function(_A.gelu.default, (x,), {"approximate": "tanh"})
    y.meta[meta.DTYPE] = meta.dtype_name(dtype)
    graph.output(y)
    return torch.fx.GraphModule(nn.Module(), graph)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_same_function_as_gelu(dtype):
    """fp32: within 1e-6 of gelu; 16-bit: both round the fp32 value once, so at most one ulp apart."""
    x = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    x[:4] = torch.tensor([0.0, -20.0, 20.0, float("nan")])
    gm = _gelu_graph(dtype)
    want = gm(x)
    assert SigmoidGelu()(gm).modified
    got = gm(x)
    check_graph_nodes(gm, sequence=[(_A.sigmoid.default, "float32"), (_A.mul.Tensor, "float32")],
                      counts={_A.sigmoid.default: 1}, absent=[_A.gelu.default])
    assert got.dtype == dtype and got[3].isnan() and got[1] == 0 and got[2] == 20
    if dtype == torch.float32:
        torch.testing.assert_close(got[4:], want[4:], rtol=0, atol=1e-6)
    else:
        ulp = torch.finfo(dtype).eps * want[4:].float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((got[4:].float() - want[4:].float()).abs() <= ulp).all()
    made = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert all((meta.get(n, meta.CREATED) or {}).get("pass") == "sigmoid_gelu" for n in made)
    assert not SigmoidGelu()(gm).modified  # idempotent: no tanh-GELU left


def test_exact_gelu_is_left_alone():
    gm = _gelu_graph(torch.float32)
    next(n for n in gm.graph.nodes if n.target is _A.gelu.default).kwargs = {}
    assert not SigmoidGelu()(gm).modified


@pytest.mark.parametrize("config, fp8, expected", [
    (dict(precision="bf16"), None, False),
    (dict(precision="bf16", backend="cuda_graphs"), None, False),
    (dict(precision="bf16", backend="compile"), None, True),
    (dict(precision="bf16", backend="compile", backend_options={"compiler": "aot_eager"}), None, False),
    (dict(precision="fp8"), None, False),
    (dict(precision="fp8"), Fp8Options(fused_quantization=True), True),  # planned for inductor
    (dict(precision="fp8", backend="compile"), None, True),
])
def test_only_in_graphs_inductor_compiles(config, fp8, expected):
    passes = build_passes(ConvertConfig(**config), fp8=fp8)
    assert any(isinstance(p, SigmoidGelu) for p in passes) is expected


def test_converted_for_compile_matches_the_eager_conversion_and_says_why():
    torch.manual_seed(0)
    model, x = _Mlp().eval(), torch.randn(4, 16, 32)
    eager = rewriter.convert(model, (x,), precision="bf16")
    compiled = graph_module_of(rewriter.convert(model, (x,), precision="bf16", backend="compile"))
    assert _A.gelu.default in _targets(eager) and _A.gelu.default not in _targets(compiled)
    with torch.no_grad():  # the rewritten graph runs eagerly too: same values, more kernels
        a, b = eager(x).float(), compiled(x).float()
    assert rel_l2(a, b) < 4e-3  # one bf16 rounding of the GELU apart at most
    text = str(rewriter.diff(model, compiled))
    assert "sigmoid" in text and "tanh" in text
    notes = [r for n in compiled.graph.nodes for r in (meta.get(n, meta.REWRITTEN) or [])]
    assert any(r["pass"] == "sigmoid_gelu" and str(round(2 * math.sqrt(2 / math.pi), 6)) in r["reason"]
               for r in notes)

