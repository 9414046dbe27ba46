"""FP8 cost model (passes/plan/fp8_cost.py), rewrite (passes/lower/fp8.py) and run-time op
(rewriter/runtime/fp8_ops.py), on small graphs, CPU only (the op's emulation path)."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rewriter.passes.analysis import Assign, Classify
from rewriter.passes.plan.fp8_cost import (FP8_MIN_MNK, FP8_MIN_ROWS, Fp8Cost, Fp8Options, GemmShape, estimate_speedup,
                                      estimate_train_speedup, resolve_options, target_capability)
from rewriter.passes.infra import PassManager
from rewriter.passes import CastWeights, FoldCasts, InsertCasts
from rewriter.passes.lower.fp8 import Fp8Rewrite
from rewriter.runtime import fp8_ops
from rewriter.runtime.fp8_ops import E4M3_MAX, fp8_linear_op, quantize_weight
from rewriter import meta
from rewriter.capture import capture
from rewriter.config import ConvertConfig
from rewriter.errors import ConfigError
from helpers import cpu_scaled_mm

FP8 = ConvertConfig(precision="fp8")
ALWAYS = Fp8Options.always()
_NEEDS_CPU_SCALED_MM = pytest.mark.skipif(not cpu_scaled_mm(),
                                          reason="this torch build has no CPU torch._scaled_mm for float8 e4m3")
SQNR_FLOOR_DB = 22.0  # one e4m3 GEMM on random data measures ~25 dB (3 mantissa bits); bf16 ~46 dB


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().float(), out.detach().float()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


class _Mlp(nn.Module):
    """Three eligible linears and one whose N (10) is not a multiple of 16."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 128, bias=False)
        self.fc3 = nn.Linear(128, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x))))))


class _Gemms(nn.Module):
    """GPT-2's Conv1D (addmm on a [K, N] weight), x @ W with a stored weight, and x @ x^T."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 96) * 0.1)      # [K, N], read by addmm
        self.b = nn.Parameter(torch.randn(96) * 0.1)
        self.w2 = nn.Parameter(torch.randn(96, 32) * 0.1)     # [K, N], read by matmul

    def forward(self, x):
        b, t, k = x.shape
        h = torch.addmm(self.b, x.reshape(-1, k), self.w).reshape(b, t, -1)
        h = torch.matmul(F.relu(h), self.w2)
        return torch.matmul(h, h.transpose(-2, -1))


def _mlp():
    torch.manual_seed(0)
    return _Mlp().eval()


X = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(1))


def _captured(model, x=X):
    return capture(model, (x,), {}, dynamic_batch=True, train=False).graph_module


def _analyse(gm, config=FP8, options=ALWAYS):
    PassManager([Classify(), Assign(config), Fp8Cost(config, options)])(gm)
    return {n.name: meta.get(n, meta.FP8) for n in gm.graph.nodes if meta.get(n, meta.FP8)}


def _convert(gm, config=FP8, options=ALWAYS):
    """The fp8 pipeline pass by pass; returns the Fp8Rewrite result of the first and second run."""
    _analyse(gm, config, options)
    PassManager([InsertCasts(config), FoldCasts()])(gm)
    first = Fp8Rewrite(config, options)(gm)
    gm.graph.lint()
    gm.recompile()
    second = Fp8Rewrite(config, options)(gm)
    PassManager([CastWeights(config)])(gm)
    return first, second


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.fixture(scope="module")
def mlp_fp8():
    model = _mlp()
    gm = _captured(model)
    first, second = _convert(gm)
    return model, gm, first, second


# ---------------------------------------------------------------- the rewrite


def test_rewrite_contract_and_structure(mlp_fp8):
    model, gm, first, second = mlp_fp8
    assert first.modified and not second.modified
    gm.graph.lint()
    ops = _ops(gm)
    assert ops.count(fp8_linear_op) == 3
    assert ops.count(torch.ops.aten.linear.default) == 1  # head: N=10
    rewritten = [n for n in gm.graph.nodes if n.target is fp8_linear_op]
    assert [meta.module_path(n) for n in rewritten] == ["fc1", "fc2", "fc3"]
    for node in rewritten:
        x, w, s, bias, x_scale, out_dtype, fast = node.args
        assert meta.value_dtype(x) == torch.bfloat16 and out_dtype == torch.bfloat16 and x_scale is None
        assert meta.get(node, meta.OP_CLASS)["op"] == "fp8_linear"
        assert meta.get(node, meta.DECISION)["dtype"] == "bfloat16"
        assert meta.get(node, meta.REWRITTEN)[-1]["pass"] == "fp8"
    assert rewritten[1].args[3] is None  # fc2 has no bias
    with torch.no_grad():
        assert sqnr(model(X), gm(X)) >= SQNR_FLOOR_DB


def test_weights_stored_as_float8_one_byte_each(mlp_fp8):
    model, gm, _, _ = mlp_fp8
    params = dict(gm.named_parameters())
    buffers = dict(gm.named_buffers())
    for name, layer in (("fc1", model.fc1), ("fc2", model.fc2), ("fc3", model.fc3)):
        assert f"{name}.weight" not in params and f"{name}.weight" not in buffers  # fp32 original dropped
        w8, scale = buffers[f"{name}.weight_fp8"], buffers[f"{name}.weight_fp8_scale"]
        assert w8.dtype == torch.float8_e4m3fn and w8.element_size() == 1
        assert tuple(w8.shape) == tuple(layer.weight.shape)
        assert w8.numel() * w8.element_size() == layer.weight.numel()  # 1 byte per weight
        assert scale.dtype == torch.float32 and scale.numel() == 1      # + 4 bytes of scale
        torch.testing.assert_close(scale, layer.weight.abs().amax() / E4M3_MAX)
    assert params["head.weight"].dtype == torch.bfloat16  # kept layer: stored bf16 by cast_weights
    summary = gm.meta[meta.FP8]
    eligible = sum(layer.weight.numel() for layer in (model.fc1, model.fc2, model.fc3))
    assert summary["weight_bytes_fp8"] == eligible and summary["scale_bytes"] == 3 * 4


def test_quantize_weight_scales():
    torch.manual_seed(0)
    w = torch.randn(32, 48) * torch.logspace(-6, 1, 32)[:, None]  # rows spanning 2^23
    q, s = quantize_weight(w, per_channel=False)
    assert q.dtype == torch.float8_e4m3fn and s.shape == () and float(s) == pytest.approx(
        float(w.abs().amax()) / 448, rel=1e-6)
    assert q.float().abs().max() == 448  # the largest weight maps to e4m3's largest value
    qc, sc = quantize_weight(w, per_channel=True)
    torch.testing.assert_close(sc, w.abs().amax(dim=1) / 448)
    # e4m3 spans 2^-9..448 (2^18): rows 2^20 below the largest flush to zero with one scale for
    # the tensor, and keep e4m3's relative precision with a scale per output channel
    assert sqnr(w[:4], q[:4].float() * s) < 1 and sqnr(w[:4], qc[:4].float() * sc[:4, None]) >= 28
    assert sqnr(w, qc.float() * sc[:, None]) >= 28  # e4m3 rounding: ~2^-4 relative


def test_static_scale_is_448_over_amax_times_margin():
    import rewriter

    model = _mlp()
    calibration = [(torch.randn(4, 16, 64) * 3,), (torch.randn(2, 16, 64),)]
    gm = rewriter.convert(model, (X,), precision="fp8", calibration=calibration,
                          fp8=Fp8Options.always(margin=1.5))
    rewritten = [n for n in gm.graph.nodes if n.target is fp8_linear_op]
    assert len(rewritten) == 3
    for node in rewritten:
        record = meta.get(node, meta.FP8)
        source = node.args[0].args[0] if node.args[0].op == "call_function" and \
            node.args[0].target is torch.ops.aten._to_copy.default else node.args[0]
        amax = meta.get(source, meta.RANGE)["amax"]
        assert record["mode"] == "static" and record["amax"] == amax and record["margin"] == 1.5
        assert record["scale"] == pytest.approx(448 / (amax * 1.5), rel=1e-12)
        stored = getattr(gm.get_submodule(node.args[4].target.rpartition(".")[0]),
                         node.args[4].target.rpartition(".")[2])
        assert stored.dtype == torch.float32 and stored.shape == ()
        assert float(stored) == pytest.approx(amax * 1.5 / 448, rel=1e-6)  # dequantization scale
    # an input far beyond the calibrated range saturates at +-448 instead of overflowing to NaN
    with torch.no_grad():
        loud = gm(X * 1e4)
    assert torch.isfinite(loud).all()


def test_addmm_conv1d_and_matmul_with_stored_weight():
    torch.manual_seed(0)
    model = _Gemms().eval()
    x = torch.randn(2, 16, 64)
    gm = _captured(model, x)
    _convert(gm)
    rewritten = [n for n in gm.graph.nodes if n.target is fp8_linear_op]
    assert sorted(meta.get(n, meta.FP8)["from_op"] for n in rewritten) == ["addmm", "matmul"]
    kept = [meta.get(n, meta.FP8) for n in gm.graph.nodes
            if meta.get(n, meta.FP8) and not meta.get(n, meta.FP8)["use"]]
    assert len(kept) == 1 and kept[0]["rule"] == "op" and "two activations" in kept[0]["reason"]
    w8 = dict(gm.named_buffers())["w_t_fp8"]  # [K, N] stored once transposed to [N, K]
    assert w8.shape == (96, 64) and w8.dtype == torch.float8_e4m3fn
    assert "w" not in dict(gm.named_parameters())
    with torch.no_grad():
        assert sqnr(model(x), gm(x)) >= SQNR_FLOOR_DB - 4  # two FP8 GEMMs feed a third bf16 one


def test_row_granularity_per_channel_scales():
    model = _mlp()
    gm = _captured(model)
    _convert(gm, options=Fp8Options.always(granularity="row"))
    buffers = dict(gm.named_buffers())
    torch.testing.assert_close(buffers["fc1.weight_fp8_scale"], model.fc1.weight.abs().amax(1) / 448)
    node = next(n for n in gm.graph.nodes if n.target is fp8_linear_op)
    assert meta.get(node, meta.FP8)["granularity"] == "row"
    with torch.no_grad():
        assert sqnr(model(X), gm(X)) >= SQNR_FLOOR_DB


# ---------------------------------------------------------------- what is kept, and why


@pytest.fixture(scope="module")
def captured_mlp():
    return _captured(_mlp())


def test_kept_layers_say_why(captured_mlp):
    gm = copy.deepcopy(captured_mlp)
    records = _analyse(gm, options=Fp8Options())  # default thresholds: these GEMMs are tiny
    by_module = {meta.module_path(n): meta.get(n, meta.FP8) for n in gm.graph.nodes if meta.get(n, meta.FP8)}
    assert len(records) == 4 and not any(r["use"] for r in records.values())
    assert by_module["head"]["rule"] == "dims" and "N=10 not a multiple of 16" in by_module["head"]["reason"]
    for name in ("fc1", "fc2", "fc3"):
        record = by_module[name]
        assert record["rule"] == "size" and record["m"] == 64
        assert record["reason"].startswith("kept bf16: M*N*K =") and "FP8 loses on small GEMMs" in record["reason"]
    assert set(gm.meta[meta.FP8]["kept"]) == set(records)  # the graph-level record lists every one

    for target, words in (("sm_80", "sm_80 has no FP8 tensor cores"), ("cpu", "the CPU has no FP8")):
        records = _analyse(gm, options=Fp8Options.always(target=target))
        assert {r["rule"] for n, r in records.items() if r["rule"] != "dims"} == {"hardware"}
        assert all(words in r["reason"] for r in records.values() if r["rule"] == "hardware")
    records = _analyse(gm, options=Fp8Options.always(target="sm_90"))
    assert sum(r["use"] for r in records.values()) == 3
    # the row floor (FP8_MIN_ROWS, measured end to end) applies on its own: M = 64 rows here
    records = _analyse(gm, options=Fp8Options.always(target="sm_90", min_rows=128))
    kept = [r for r in records.values() if r["rule"] == "size"]
    assert len(kept) == 3 and all("M = 64 rows < 128" in r["reason"] for r in kept)
    assert Fp8Options().min_rows == FP8_MIN_ROWS == 8192


def test_fp32_override_keeps_bf16_and_training_mode_judges_the_training_step(captured_mlp):
    gm = copy.deepcopy(captured_mlp)
    records = _analyse(gm, ConvertConfig(precision="fp8", overrides={"fc2": "fp32"}))
    fc2 = next(r for n, r in records.items() if r.get("m") is None and "fp32" in r["reason"])
    assert fc2["rule"] == "precision" and fc2["reason"].startswith("kept fp32: linear was decided float32 by "
                                                                    "override:module")
    assert sum(r["use"] for r in records.values()) == 2
    train = ConvertConfig(precision="fp8", mode="train")
    records = _analyse(gm, train)
    used = [r for r in records.values() if r["use"]]
    assert len(used) == 3 and {r["rule"] for r in records.values()} == {"fp8", "dims"}
    for r in used:  # always dynamic per tensor, e5m2 gradients, the three GEMMs of a training step
        assert r["training"] and r["scaling"] == "dynamic" and r["grad_dtype"] == "float8_e5m2"
        assert r["reason"].startswith("FP8 training GEMMs") and "forward + grad_x + grad_w" in r["reason"]
    records = _analyse(gm, train, Fp8Options())
    assert {r["rule"] for r in records.values()} == {"size", "dims"}
    with pytest.raises(ConfigError, match="granularity='row'.*mode='train'"):
        Fp8Cost(train, Fp8Options(granularity="row"))


def test_bf16_override_keeps_that_gemm_out_of_fp8(captured_mlp):
    gm = copy.deepcopy(captured_mlp)
    records = _analyse(gm, ConvertConfig(precision="fp8", overrides={"re:fc[23]": "bf16"}))
    by_module = {meta.module_path(n): meta.get(n, meta.FP8) for n in gm.graph.nodes if meta.get(n, meta.FP8)}
    assert by_module["fc1"]["use"] and sum(r["use"] for r in records.values()) == 1
    for name in ("fc2", "fc3"):
        record = by_module[name]
        assert record["rule"] == "override" and not record["use"]
        assert record["reason"] == (f"kept bf16: user override re:fc[23]=bf16 on module '{name}': under "
                                    "precision fp8 a bf16 override keeps the GEMM in bf16")


class _AttentionOut(nn.Module):
    """attention -> transpose -> reshape -> out projection (the quantization cannot fuse into the
    attention kernel) beside LayerNorm -> up projection (it fuses into the LayerNorm)."""

    def __init__(self, d=64):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q = self.up(self.norm(x)).reshape(b, t, 4, d // 4).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(b, t, d)
        return self.out(a)


def test_quantization_after_an_extern_kernel_is_charged_its_own_kernel():
    gm = _captured(_AttentionOut().eval())
    fused = Fp8Options.always(fused_quantization=True)
    _analyse(gm, options=fused)
    by_module = {meta.module_path(n): meta.get(n, meta.FP8) for n in gm.graph.nodes if meta.get(n, meta.FP8)
                 and meta.get(n, meta.FP8).get("m")}
    up, out = by_module["up"], by_module["out"]
    assert up["quantize"] == "fused into layer_norm"
    assert out["quantize"].startswith("own kernel: scaled_dot_product_attention is not fusable")
    assert "quantizing the activation (own kernel: scaled_dot_product_attention" in out["reason"]
    # BERT-large's attention output projection (M=12288, 1024x1024): measured 26.8 + 12.2 us in FP8
    # against 37.3 us in bf16 on the H100; the estimate keeps it bf16, the fused GEMMs FP8
    shape, threshold = GemmShape(12288, 1024, 1024), Fp8Options().min_speedup
    assert estimate_speedup(shape, static=True, fused=True, own_kernel=True)[0] < threshold
    assert estimate_speedup(shape, static=True, fused=True)[0] >= threshold
    assert estimate_speedup(GemmShape(12288, 4096, 1024), static=True, fused=True)[0] >= threshold
    # eager: every quantization is its own kernels already, so the producer changes nothing
    _analyse(gm, options=Fp8Options.always())
    assert all("quantize" not in meta.get(n, meta.FP8) for n in gm.graph.nodes if meta.get(n, meta.FP8))


def test_cost_model_on_benchmark_shapes():
    """The decisions tools/bench_fp8.py checks on the H100: BERT-base and ViT-B stay bf16 in eager
    mode, the Llama MLP's gate/up GEMMs go FP8; speed-up grows with size."""
    eager = dict(static=False, fused=False)
    bert_base = [GemmShape(4096, n, k) for k, n in ((768, 768), (768, 3072), (3072, 768))]
    vit = [GemmShape(64 * 197, n, k) for k, n in ((768, 2304), (768, 768), (768, 3072), (3072, 768))]
    threshold = Fp8Options().min_speedup
    assert all(estimate_speedup(s, **eager)[0] < threshold for s in bert_base + vit)
    assert estimate_speedup(GemmShape(8192, 14336, 4096), **eager)[0] >= threshold
    sizes = [estimate_speedup(GemmShape(m, m, m), **eager)[0] for m in (1024, 2048, 4096, 8192, 16384)]
    assert sizes == sorted(sizes) and sizes[0] < 1 < sizes[-1]
    # fusing the quantization (torch.compile) and static scales only make FP8 cheaper
    shape = GemmShape(12288, 4096, 1024)
    assert estimate_speedup(shape, static=True, fused=True)[0] > estimate_speedup(shape, static=False,
                                                                                   fused=True)[0] \
        > estimate_speedup(shape, **eager)[0]
    assert GemmShape(1024, 1024, 2048).mnk == FP8_MIN_MNK  # torchao's 0.80x point is the floor
    # training: three GEMMs, and x, the weight and grad_out quantized (and transposed) on every step;
    # compiled, the Llama MLP's GEMMs pay, GPT-2 medium's and BERT-base's do not
    llama = [GemmShape(8192, 14336, 4096), GemmShape(8192, 4096, 14336)]
    gpt2_medium = [GemmShape(8192, n, k) for k, n in ((1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024))]
    assert all(estimate_train_speedup(s, fused=True)[0] >= threshold for s in llama)
    assert all(estimate_train_speedup(s, fused=True)[0] < threshold for s in gpt2_medium + bert_base)
    assert all(estimate_train_speedup(s, fused=False)[0] < estimate_train_speedup(s, fused=True)[0] for s in llama)


def test_options_are_validated():
    with pytest.raises(ConfigError, match="granularity='channel'.*'tensor'.*'row'"):
        Fp8Options(granularity="channel")
    with pytest.raises(ConfigError, match="margin"):
        Fp8Options(margin=0.5)
    with pytest.raises(ConfigError, match="min_rows=-1"):
        Fp8Options(min_rows=-1)
    with pytest.raises(ConfigError, match="sm_90"):
        Fp8Options(target="h100")
    assert target_capability("sm_89") == (8, 9) and target_capability("9.0") == (9, 0)
    assert target_capability("sm_100") == (10, 0) and target_capability((9, 0)) == (9, 0)



def test_fused_quantization_follows_the_backend():
    """Unset, fused_quantization is True exactly when inductor will compile the converted model."""
    def fused(options=None, **config):
        return resolve_options(options, ConvertConfig(precision="fp8", **config)).fused_quantization

    assert fused() is False and fused(backend="cuda_graphs") is False
    assert fused(backend="compile") is True
    assert fused(backend="compile", backend_options={"compiler": "aot_eager"}) is False
    assert fused(Fp8Options(fused_quantization=False), backend="compile") is False  # the user's word wins
    assert fused(Fp8Options(fused_quantization=True)) is True
    assert Fp8Cost(ConvertConfig(precision="fp8", backend="compile")).options.fused_quantization is True


# ---------------------------------------------------------------- run time


def test_emulation_is_reported_once(mlp_fp8):
    _, gm, _, _ = mlp_fp8
    node = next(n for n in gm.graph.nodes if n.target is fp8_linear_op)
    assert meta.get(node, meta.FP8)["emulated"] is True
    assert "emulated on this machine" in meta.get(node, meta.REWRITTEN)[-1]["reason"]
    assert gm.meta[meta.FP8]["emulated"] is True and "no FP8 GEMMs" in gm.meta[meta.FP8]["emulation"]
    fp8_ops.reset_emulation_notice()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        gm(X)
        gm(X[:1])
    mine = [w for w in caught if issubclass(w.category, fp8_ops.Fp8EmulationWarning)]
    assert len(mine) == 1 and "emulated" in str(mine[0].message)
    assert fp8_ops.emulation_noticed()


@_NEEDS_CPU_SCALED_MM
def test_scaled_mm_path_matches_emulation():
    """The CUDA path's torch._scaled_mm call (scale layout, bias epilogue, transposed weight) checked
    through the CPU implementation of _scaled_mm, against the emulation path, bit for bit."""
    torch.manual_seed(0)
    w, x = torch.randn(64, 32), torch.randn(24, 32, dtype=torch.bfloat16)
    bias = torch.randn(64, dtype=torch.bfloat16)
    for per_channel in (False, True):
        w8, ws = quantize_weight(w, per_channel)
        for static in (None, torch.tensor(0.01)):
            s_x = fp8_ops.activation_scale(x, per_channel) if static is None else static
            q = fp8_ops.quantize_activation(x, s_x, saturate=static is not None)
            real = fp8_ops._scaled_mm(q, s_x, w8, ws, bias, torch.bfloat16, False, per_channel)
            emulated = fp8_ops._emulated_mm(q, s_x, w8, ws, bias, torch.bfloat16)
            assert torch.equal(real, emulated)


@pytest.mark.parametrize("cast_saturates", [True, False], ids=["saturating-cast", "clamp"])
def test_quantize_activation_matches_onnx_quantizelinear_rounding(monkeypatch, cast_saturates):
    """x / s in fp32, then round-to-nearest-even e4m3 with saturation (ONNX QuantizeLinear), whether
    the cast saturates by itself (torch >= 2.12, inductor's Triton) or a clamp does it (torch 2.11)."""
    if cast_saturates and not fp8_ops._probe_saturation(torch.device("cpu")):
        pytest.skip("this torch build's float8 casts give NaN on overflow")
    monkeypatch.setitem(fp8_ops._SATURATES, "cpu", cast_saturates)
    x = torch.tensor([[0.0, 1.0, -3.3, 447.0, 449.0, 470.0, 1e6, 2 ** -10, -1e6, float("inf")]],
                     dtype=torch.bfloat16)
    assert fp8_ops.casts_saturate(x) is cast_saturates
    q = fp8_ops.quantize_activation(x, torch.tensor(1.0), saturate=True)
    assert q.float().tolist()[0][:6] == [0.0, 1.0, -3.25, 448.0, 448.0, 448.0]
    assert q.float()[0, 6] == 448 and q.float()[0, 7] == 0  # saturated; 2^-10 ties to even: 0
    assert q.float()[0, 8] == -448 and q.float()[0, 9] == 448
    assert fp8_ops.quantize_activation(torch.tensor([[float("nan")]]), torch.tensor(1.0), True).float().isnan().all()
    finite = x[:, :-1].float()
    dynamic = fp8_ops.quantize_activation(finite, fp8_ops.activation_scale(finite, False), False)
    assert dynamic.float().abs().max() == 448 and not dynamic.float().isnan().any()


def test_compiled_static_quantization_saturates_as_eager():
    """Inductor (CPU codegen here) decides the clamp as eager does: beyond the range -> +-448, no NaN."""
    scale = torch.tensor(0.01)
    x = (torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * 100).to(torch.bfloat16)
    x[0, :3] = torch.tensor([float("inf"), -1e30, float("nan")])
    eager = fp8_ops.quantize_activation(x, scale, saturate=True).float()
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: fp8_ops.quantize_activation(t, scale, saturate=True))(x).float()
    assert torch.equal(eager.nan_to_num(), compiled.nan_to_num())
    assert compiled[0, :2].tolist() == [448.0, -448.0] and compiled[0, 2].isnan()
    assert not compiled[1:].isnan().any() and compiled.nan_to_num().abs().max() == 448


def test_reexport_save_load_and_decomposition(mlp_fp8):
    _, gm, _, _ = mlp_fp8
    with torch.no_grad():
        expected = gm(X[:3])
    ep = torch.export.export(gm, (X,), strict=False, dynamic_shapes=({0: torch.export.Dim.AUTO},))
    assert sum(n.target is fp8_linear_op for n in ep.graph.nodes) == 3  # kept whole by export
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    with torch.no_grad():
        assert torch.equal(loaded(X[:3]), expected)
    # torch.compile and the default decompositions see through the op: quantize + GEMM aten ops
    decomposed = ep.run_decompositions()
    targets = {str(n.target) for n in decomposed.graph.nodes}
    assert not any("fp8_linear" in t for t in targets)
    assert any("float8_e4m3fn" in str(n.kwargs.get("dtype", "")) or "float8_e4m3fn" in str(n.args)
               for n in decomposed.graph.nodes if n.op == "call_function")


@_NEEDS_CPU_SCALED_MM
def test_gpu_code_path_through_cpu_scaled_mm(mlp_fp8, monkeypatch):
    """The whole op as it runs on an FP8 GPU (quantize, torch._scaled_mm with bias), executed through
    the CPU implementation of torch._scaled_mm, equals the emulation path; a _scaled_mm that refuses
    a layout falls back to emulation with one warning."""
    _, gm, _, _ = mlp_fp8
    with torch.no_grad():
        emulated = gm(X)
    monkeypatch.setattr(fp8_ops, "fp8_gemm_supported", lambda device=None: True)
    with torch.no_grad():
        real = gm(X)
    assert torch.equal(real, emulated)

    def refuse(*args, **kwargs):
        raise RuntimeError("Invalid scaling configuration (test)")

    monkeypatch.setattr(fp8_ops, "_scaled_mm", refuse)
    monkeypatch.setattr(fp8_ops, "_SCALED_MM_FAILED", {})
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        fallback = gm(X)
        gm(X)
    refused = [w for w in caught if "refused" in str(w.message)]
    assert len(refused) == 2  # one per layout: with bias (fc1, fc3) and without (fc2)
    assert torch.equal(fallback, emulated)
