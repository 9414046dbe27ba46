"""The decode rule of the FP8 cost model (passes/plan/fp8_decode.py): a graph tagged as a causal LM's decode
step judges its GEMMs by the weight bytes they read; the weight-only rewrite and its run-time op."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from rewriter import meta
from rewriter.capture import capture
from rewriter.config import ConvertConfig
from rewriter.errors import ConfigError
from rewriter.fp8_options import Fp8Options
from rewriter.passes import CastWeights, FoldCasts, InsertCasts
from rewriter.passes.analysis import Assign, Classify
from rewriter.passes.infra import PassManager
from rewriter.passes.lower.fp8 import Fp8Rewrite
from rewriter.passes.plan.fp8_cost import Fp8Cost, GemmShape
from rewriter.passes.plan.fp8_decode import estimate_decode_speedup
from rewriter.runtime.fp8_ops import quantize_weight
from rewriter.runtime.fp8_weight_ops import fp8_weight_linear_op

FP8 = ConvertConfig(precision="fp8")


class _Up(nn.Module):
    """One Llama-1B-sized MLP projection (K=2048, N=8192): what a decode step multiplies by each row."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(2048, 8192, bias=False)

    def forward(self, x):
        return self.up(x)


@pytest.fixture(scope="module")
def up():
    torch.manual_seed(0)
    return _Up().eval()


def _graph(model, step: str | None):
    import copy

    model = copy.deepcopy(model)  # the rewrite drops the fp32 weight from the captured modules
    gm = capture(model, (torch.randn(2, 1, 2048),), {}, dynamic_batch=True, train=False).graph_module
    if step:
        gm.meta[meta.GENERATION_STEP] = step
    return gm


def _record(gm, options: Fp8Options, config=FP8) -> dict:
    PassManager([Classify(), Assign(config), Fp8Cost(config, options)])(gm)
    (record,) = [meta.get(n, meta.FP8) for n in gm.graph.nodes if meta.get(n, meta.FP8)]
    return record


def test_decode_gemm_is_judged_by_weight_bytes(up):
    compiled = Fp8Options(fused_quantization=True)
    record = _record(_graph(up, "decode"), compiled)
    assert record["use"] and record["rule"] == "decode" and record["kernel"] == "weight_only"
    assert record["reason"].startswith("fp8: decode GEMM is weight-bandwidth bound: 2x fewer weight bytes "
                                       "(33.554 MB bf16 -> 16.777 MB float8_e4m3fn per step)")
    assert "decode_gemms='auto'" in record["reason"] and record["est_speedup"] > 1.5 and record["m"] == 2
    # the same GEMM outside a decode graph: the FLOP rules keep it bf16 (M = 2 rows)
    plain = _record(_graph(up, None), compiled)
    assert not plain["use"] and plain["rule"] == "size"
    assert _record(_graph(up, "prefill"), compiled)["rule"] == "size"
    flops = _record(_graph(up, "decode"), Fp8Options(fused_quantization=True, decode_gemms="flops"))
    assert not flops["use"] and flops["rule"] == "size"


def test_eager_decode_keeps_bf16_where_the_estimate_loses(up, monkeypatch):
    from rewriter.passes.plan import fp8_decode

    monkeypatch.setattr(fp8_decode, "gemv_available", lambda: False)  # as on a machine without triton
    # eager: weight-only writes the widened weight every call, scaled_mm pays 4 quantization kernels
    record = _record(_graph(up, "decode"), Fp8Options(fused_quantization=False))
    assert not record["use"] and record["rule"] == "cost" and record["est_speedup"] < 1.05
    # scaled_mm asked for: its two quantization kernels (each at least a launch) cost more than the
    # 5 us the halved weights save, so only min_speedup=0 rewrites it, and the reason says so
    scaled = Fp8Options(fused_quantization=True, decode_gemms="scaled_mm")
    assert _record(_graph(up, "decode"), scaled)["rule"] == "cost"
    forced = _record(_graph(up, "decode"), Fp8Options(fused_quantization=True, decode_gemms="scaled_mm", min_speedup=0))
    assert forced["use"] and forced["kernel"] == "scaled_mm" and forced["scaling"] == "dynamic"
    assert "rewritten although below 1x, because Fp8Options(min_speedup=0)" in forced["reason"]
    cpu = _record(_graph(up, "decode"), Fp8Options(fused_quantization=True, target="cpu"))
    assert not cpu["use"] and cpu["rule"] == "hardware"


def test_decode_estimate_follows_the_roofline():
    llama_1b = [(2048 + 2 * 512, 2048), (2048, 2048), (2 * 8192, 2048), (2048, 8192), (128256, 2048)]
    for n, k in llama_1b:
        for m in (1, 8):
            wo = estimate_decode_speedup(GemmShape(m, n, k), "weight_only", fused=True, own_kernel=False)[0]
            eager = estimate_decode_speedup(GemmShape(m, n, k), "weight_only", fused=False, own_kernel=False)[0]
            assert 1.05 < wo <= 1.6 and eager < 1.0, (m, n, k, wo, eager)
    # at 512 rows the GEMM is compute-bound: 1-byte weights buy nothing
    assert estimate_decode_speedup(GemmShape(512, 2048, 2048), "weight_only", fused=True, own_kernel=False)[0] < 1.0


def test_weight_only_rewrite_stores_fp8_and_is_idempotent(up):
    gm = _graph(up, "decode")
    options = Fp8Options(min_speedup=0, decode_gemms="weight_only")
    _record(gm, options)
    PassManager([InsertCasts(FP8), FoldCasts()])(gm)
    assert Fp8Rewrite(FP8, options)(gm).modified
    gm.graph.lint()
    gm.recompile()
    assert not Fp8Rewrite(FP8, options)(gm).modified
    PassManager([CastWeights(FP8)])(gm)
    (node,) = [n for n in gm.graph.nodes if n.target is fp8_weight_linear_op]
    assert meta.get(node, meta.FP8)["mode"] == "weight-only"
    assert gm.meta[meta.FP8]["emulated"] is False  # no FP8 GEMM runs: nothing is emulated on the CPU
    assert "rewriter::fp8_weight_linear" in meta.get(node, meta.REWRITTEN)[-1]["reason"]
    fp8 = [t for _, t in gm.named_buffers() if t.dtype == torch.float8_e4m3fn]
    assert len(fp8) == 1 and fp8[0].shape == (8192, 2048)
    assert not any(t.dtype in (torch.float32, torch.bfloat16) and t.dim() == 2 for _, t in gm.named_parameters())
    x = torch.randn(3, 1, 2048)
    with torch.no_grad():
        ref = up(x)
        out = gm(x)
    assert out.dtype == torch.float32  # the graph's output keeps the model's dtype
    err = float((out - ref).norm() / ref.norm())
    assert err < 0.05, err  # e4m3 weights per output channel (~2-3 %) and a bf16 activation


def test_fp8_weight_linear_op_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    w, x, b = torch.randn(48, 32, generator=g), torch.randn(5, 32, generator=g), torch.randn(48, generator=g)
    q, s = quantize_weight(w, per_channel=True)
    y = fp8_weight_linear_op(x.bfloat16(), q, s, b, torch.bfloat16)
    expected = (x.bfloat16().float() @ (q.float() * s[:, None]).t() + b)
    assert y.dtype == torch.bfloat16 and y.shape == (5, 48)
    assert torch.allclose(y.float(), expected, rtol=2e-2, atol=2e-2)


def test_decode_gemms_option_is_validated():
    with pytest.raises(ConfigError, match="decode_gemms='fast'.*'auto', 'scaled_mm', 'weight_only', 'flops'"):
        Fp8Options(decode_gemms="fast")


def test_weight_only_record_names_its_kernel(up, monkeypatch):
    from rewriter.passes.plan import fp8_decode

    options = Fp8Options(fused_quantization=True, decode_gemms="weight_only", min_speedup=0)
    here = _record(_graph(up, "decode"), options)
    if not fp8_decode.gemv_available():  # this machine (CPU, or no triton): the reference path, and why
        assert here["weight_kernel"] == "reference"
        assert "the Triton GEMV rewriter::fp8_weight_gemv does not apply (" in here["reason"]
        assert "the reference (linear on the widened weight) runs" in here["reason"]
    # a CUDA machine with triton: the GEMV, estimated at the 1-byte roofline also when run eagerly
    monkeypatch.setattr(fp8_decode, "gemv_available", lambda: True)
    gemv = _record(_graph(up, "decode"), options)
    assert gemv["weight_kernel"] == "triton_gemv" and gemv["quant_us"] == 0
    assert "runs the Triton GEMV rewriter::fp8_weight_gemv (each weight byte read once" in gemv["reason"]
    assert "M=2 <= 16 rows" in gemv["reason"]
    eager = _record(_graph(up, "decode"), Fp8Options(fused_quantization=False))
    assert eager["use"] and eager["kernel"] == "weight_only" and eager["weight_kernel"] == "triton_gemv"
    assert eager["est_speedup"] > 1.3
    # more rows than a GEMV takes: the reference, whatever the machine
    shape = GemmShape(17, 8192, 2048)
    assert fp8_decode.gemv_choice(17, None) == (False, "M=17 rows > 16: not a GEMV")
    assert estimate_decode_speedup(shape, "weight_only", fused=False, own_kernel=False)[0] < 1.0
