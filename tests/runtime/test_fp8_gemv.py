"""The Triton GEMV of weight-only FP8 decode GEMMs (rewriter/runtime/fp8_gemv.py) and the routing of
rewriter::fp8_weight_linear to it.

The kernel tests need triton and either a CUDA GPU or Triton's interpreter on CPU tensors:
    TRITON_INTERPRET=1 python -m pytest -q tests/runtime/test_fp8_gemv.py
(the interpreter is chosen when triton is imported, so it cannot be switched on from inside the test run;
without it, and on machines without triton, those tests skip). The routing and configuration tests run
everywhere.
"""
from __future__ import annotations

import os

import pytest
import torch

from rewriter.runtime import fp8_gemv
from rewriter.runtime.fp8_gemv import GemvConfig, choose_config
from rewriter.runtime.fp8_weight_ops import fp8_weight_linear_op, fp8_weight_linear_reference

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_DEVICE = "cuda" if torch.cuda.is_available() and fp8_gemv.gemv_available() else "cpu"
needs_kernel = pytest.mark.skipif(
    fp8_gemv.triton is None or (_DEVICE == "cpu" and not _INTERPRET),
    reason="needs triton and a CUDA sm_89+ GPU, or TRITON_INTERPRET=1 (Triton's interpreter on CPU tensors)")

# fp32 accumulation in both: the outputs differ by the output rounding (one bf16 ulp is 2^-8 relative: the
# interpreter's fp32 -> bf16 conversion truncates, the GPU's rounds to nearest) and the reference's extra
# rounding of its bf16 GEMM before the scale
REL_VS_REFERENCE = 1e-2
REL_VS_TRUTH = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -10, torch.float32: 1e-5}


def _operands(m, n, k, dtype, per_channel, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * 100).to(torch.float8_e4m3fn)  # spans e4m3's exponents
    scale = torch.rand(n, generator=g) / 100 + 1e-3 if per_channel else torch.tensor(3e-3)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    return [t.to(_DEVICE) if t is not None else None for t in (x, w, scale, bias)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _check(out, x, w, scale, bias, out_dtype):
    truth = (x.double() @ w.double().T) * scale.double() + (0 if bias is None else bias.double())
    assert out.dtype == out_dtype and out.shape == truth.shape
    assert torch.isfinite(out.float()).all()
    # elementwise: within the output rounding of the exact result (plus fp32 summation order)
    err = (out.double() - truth).abs() / truth.abs().clamp_min(truth.abs().max() * 1e-3)
    assert float(err.max()) <= 2 * REL_VS_TRUTH[out_dtype] + 1e-5, float(err.max())
    reference = fp8_weight_linear_reference(x, w, scale, bias, out_dtype)
    assert _rel(out, reference) <= REL_VS_REFERENCE


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("n,k", [(24, 64), (37, 96), (20, 1040)])  # N off the block; K tail; K split in 2
def test_gemv_matches_reference(m, n, k, dtype):
    for per_channel, with_bias in ((True, True), (True, False), (False, True), (False, False)):
        x, w, scale, bias = _operands(m, n, k, dtype, per_channel, with_bias)
        out = fp8_gemv._launch(x, w, scale, bias, dtype)
        _check(out, x, w, scale, bias, dtype)


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 8, 16])
def test_both_inner_product_forms_and_split_k_agree(m):
    # the rule picks one form per row count; forced, the other form and other splits give the same numbers
    x, w, scale, bias = _operands(m, 40, 288, torch.bfloat16, True, True, seed=1)
    x = x.reshape(m, 1, 288)  # a decode step's [B, 1, K] activation
    outs = []
    for config in (None, GemvConfig(16, 64, 1, use_dot=True), GemvConfig(16, 32, 4, use_dot=True),
                   GemvConfig(8, 64, 3, use_dot=False), GemvConfig(32, 128, 1, use_dot=False)):
        out = fp8_gemv._launch(x, w, scale, bias, torch.float32, config=config)
        assert out.shape == (m, 1, 40)
        _check(out.reshape(m, 40), x.reshape(m, 288), w, scale, bias, torch.float32)
        outs.append(out)
    for out in outs[1:]:
        assert _rel(out, outs[0]) <= 1e-5


@needs_kernel
def test_registered_op_runs_the_kernel_and_has_a_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, scale, bias = _operands(3, 24, 64, torch.float16, True, True)
    out = fp8_gemv.fp8_weight_gemv(x, w, scale, bias, torch.float16)
    _check(out, x, w, scale, bias, torch.float16)
    mode = FakeTensorMode()
    fakes = [mode.from_tensor(t) for t in (x.reshape(3, 1, 64), w, scale)]
    with mode:
        fake = fp8_gemv.fp8_weight_gemv(*fakes, None, torch.bfloat16)
    assert fake.shape == (3, 1, 24) and fake.dtype == torch.bfloat16


@pytest.mark.skipif(not (torch.cuda.is_available() and fp8_gemv.gemv_available()),
                    reason="needs CUDA sm_89+ and triton")
def test_fp8_weight_linear_routes_to_the_gemv_on_cuda_eager_and_compiled():
    from torch._inductor.utils import run_and_get_code

    x, w, scale, bias = _operands(8, 3072, 2048, torch.bfloat16, True, False)
    fp8_gemv.reset_routing_counts()
    eager = fp8_weight_linear_op(x, w, scale, None, torch.bfloat16)
    assert fp8_gemv.routing_counts() == {"triton gemv": 1}
    _check(eager, x, w, scale, None, torch.bfloat16)
    fn = torch.compile(lambda a, b, s: fp8_weight_linear_op(a, b, s, None, torch.bfloat16), fullgraph=True)
    compiled, code = run_and_get_code(fn, x, w, scale)
    assert "_fp8_gemv_kernel" in "\n".join(code)
    assert _rel(compiled, eager) <= 1e-3  # the same kernel and configuration
    # captured in a CUDA graph after a warm-up (as the decode step is) and replayed on new inputs
    static = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn(static, w, scale)
    static.copy_(torch.flip(x, [0]))
    graph.replay()
    assert _rel(captured, torch.flip(eager, [0])) <= 1e-3  # the replay read the new rows


# ---------------------------------------------------------------- everywhere (no kernel launched)


def test_cpu_routing_falls_back_to_the_reference_and_says_why():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 64, generator=g).to(torch.bfloat16)
    w = torch.randn(24, 64, generator=g).to(torch.float8_e4m3fn)
    scale = torch.rand(24, generator=g)
    bias = torch.randn(24, generator=g).to(torch.bfloat16)
    fp8_gemv.reset_routing_counts()
    out = fp8_weight_linear_op(x, w, scale, bias, torch.bfloat16)
    # exactly what the op computed before the GEMV existed
    before = (torch.nn.functional.linear(x, w.to(x.dtype)) * scale + bias.float()).to(torch.bfloat16)
    assert torch.equal(out, before)
    (route,) = fp8_gemv.routing_counts()
    assert route.startswith("reference: ")
    reason = fp8_gemv.gemv_skip_reason(x, w, scale, bias)
    assert reason is not None and reason in route
    assert "cpu device" in reason or "triton" in reason
    fp8_gemv.reset_routing_counts()
    assert fp8_gemv.routing_counts() == {}


def test_without_triton_nothing_is_registered_and_the_op_still_runs():
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"  # as on a CPU-only torch build
            "import torch, rewriter\n"
            "from rewriter.runtime import fp8_gemv\n"
            "from rewriter.runtime.fp8_weight_ops import fp8_weight_linear_op\n"
            "assert fp8_gemv.fp8_weight_gemv is None and not fp8_gemv.gemv_available()\n"
            "assert not hasattr(torch.ops.rewriter, 'fp8_weight_gemv')\n"
            "x = torch.ones(2, 32, dtype=torch.bfloat16); w = torch.ones(8, 32).to(torch.float8_e4m3fn)\n"
            "y = fp8_weight_linear_op(x, w, torch.tensor(0.5), None, torch.bfloat16)\n"
            "assert y.shape == (2, 8) and bool((y == 16).all())\n"
            "print(list(fp8_gemv.routing_counts()))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reference: triton is not importable (ModuleNotFoundError" in done.stdout


def test_a_gemv_that_fails_to_compile_falls_back_once_with_a_warning(monkeypatch):
    from rewriter.runtime import fp8_weight_ops

    def broken(*args):
        raise RuntimeError("out of resource: shared memory, Required: 300000")

    monkeypatch.setattr(fp8_gemv, "_FAILED", [])  # the process-wide record, restored after the test
    monkeypatch.setattr(fp8_weight_ops, "gemv_skip_reason", lambda *a: None)  # as on a CUDA machine
    monkeypatch.setattr(fp8_weight_ops, "fp8_weight_gemv", broken)
    x = torch.randn(1, 32).to(torch.bfloat16)
    w = torch.randn(8, 32).to(torch.float8_e4m3fn)
    scale = torch.rand(8)
    fp8_gemv.reset_routing_counts()
    with pytest.warns(RuntimeWarning, match="the GEMV failed in this process .RuntimeError: out of resource"):
        out = fp8_weight_linear_op(x, w, scale, None, torch.bfloat16)
    assert torch.equal(out, fp8_weight_linear_reference(x, w, scale, None, torch.bfloat16))
    (route,) = fp8_gemv.routing_counts()
    assert route.startswith("reference: the GEMV failed in this process")
    assert not fp8_gemv.gemv_available()  # and the plan stops counting on it


def test_config_rule_fills_the_sms_for_the_decode_shapes():
    llama_1b = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (128256, 2048)]
    for m in (1, 2, 3, 8, 16):
        for n, k in llama_1b:
            c = choose_config(m, n, k, sms=132)
            programs = -(-n // c.block_n) * c.split_k
            assert c.use_dot == (m >= 3)
            assert c.block_k * c.block_n >= 4096  # >= 4 KB of weights per program and loop step
            assert k % (c.block_k * c.split_k) == 0  # these shapes need no masked tail
            assert programs >= 3 * 132, (m, n, k, c)  # every SM busy, several programs each
            if c.use_dot:
                assert c.block_n == 16  # tl.dot's smallest N; K is split instead
            else:
                assert c.split_k == 1  # 1-2 rows: a narrower, longer tile instead of a second kernel
    assert choose_config(1, 128256, 2048) == GemvConfig(16, 512, 1, 4, 2, False)
    assert choose_config(1, 2048, 8192) == GemvConfig(4, 2048, 1, 4, 2, False)  # 512 programs
    assert choose_config(8, 2048, 8192).split_k == 8  # 128 tiles x 8 = 1024 programs
    assert choose_config(4, 10, 40).block_k == 64  # small K: one block covers it
