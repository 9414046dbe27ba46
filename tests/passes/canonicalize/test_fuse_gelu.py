"""FuseGelu: GELUs written out as elementwise ops (tanh approximation, exact erf) become one aten.gelu;
near misses (another constant, an intermediate read elsewhere) stay as written."""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn as nn

import rewriter
from rewriter.passes.infra import PassManager
from rewriter.passes import FuseGelu
from rewriter import meta
from rewriter.capture import capture
from helpers import check_graph_nodes, rel_l2

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_A = torch.ops.aten
MAX_REL_L2 = {"fp16": 1e-2, "bf16": 6e-2}  # the ceilings of tests/test_models.py
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
VS_AUTOCAST = 1e-2  # relative L2 between our output and autocast's


def _tanh_inner(x):
    return math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))


def hf_new_gelu(x):  # transformers' NewGELUActivation (GPT-2)
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def cube_by_mul(x):  # constants on the other side, x * x * x
    return x * 0.5 * (1 + torch.tanh((x + x * x * x * 0.044715) * 0.7978845608))


def half_outside(x):
    return 0.5 * (x * (1.0 + torch.tanh(_tanh_inner(x))))


def half_with_tanh(x):
    return x * ((torch.tanh(_tanh_inner(x)) + 1.0) * 0.5)


def erf_div(x):  # the exact GELU
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def erf_mul(x):
    return 0.5 * x * (1.0 + torch.erf(x * 0.7071067811865476))


def wrong_constant(x):  # 0.0447 is 3e-4 away from 0.044715
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.0447 * torch.pow(x, 3.0))))


def square_not_cube(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 2.0))))


def no_half(x):
    return x * (1.0 + torch.tanh(_tanh_inner(x)))


TANH_FORMS = [hf_new_gelu, cube_by_mul, half_outside, half_with_tanh]
ERF_FORMS = [erf_div, erf_mul]


class _Mlp(nn.Module):
    def __init__(self, act):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(32, 128), nn.Linear(128, 32)
        self.act = act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _SharedTanh(_Mlp):
    """The GELU's tanh is also an output: fusing would have to keep it, so nothing is gained."""

    def forward(self, x):
        h = self.fc1(x)
        t = torch.tanh(_tanh_inner(h))
        return self.fc2(0.5 * h * (1.0 + t)), t


def _ops(gm, *targets):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def _fuse(model, x):
    gm = capture(model, (x,), {}).graph_module
    before = copy.deepcopy(gm)
    return before, gm, PassManager([FuseGelu()])(gm).modified


@pytest.mark.parametrize("act", TANH_FORMS + ERF_FORMS, ids=lambda f: f.__name__)
def test_forms_are_fused_exactly(act):
    model = _Mlp(act).eval()
    before, gm, modified = _fuse(model, torch.randn(4, 8, 32))
    assert modified
    (gelu,) = _ops(gm, _A.gelu.default)
    approximate = "tanh" if act in TANH_FORMS else "none"
    assert gelu.kwargs.get("approximate", "none") == approximate
    check_graph_nodes(gm, sequence=[_A.linear.default, _A.gelu.default, _A.linear.default],
                      counts={_A.gelu.default: 1},
                      absent=[_A.tanh.default, _A.erf.default, _A.pow.Tensor_Scalar, _A.mul.Tensor, _A.div.Tensor])
    assert gelu.meta["val"].dtype == gelu.args[0].meta["val"].dtype == torch.float32
    final = _ops(before, _A.mul.Tensor)[-1]  # the last mul of the written-out GELU
    assert all(gelu.meta.get(k) is final.meta.get(k) for k in ("nn_module_stack", "stack_trace"))
    note = meta.get(gelu, meta.REWRITTEN)[-1]
    assert note["pass"] == "fuse_gelu" and f"gelu(approximate='{approximate}')" in note["reason"]
    assert "tensor-core reader linear" in note["reason"]
    for batch in (4, 1):
        x = torch.randn(batch, 8, 32) * 3
        torch.testing.assert_close(gm(x), before(x), rtol=1e-5, atol=1e-5)
    assert not PassManager([FuseGelu()])(gm).modified  # idempotent


@pytest.mark.parametrize("act", [wrong_constant, square_not_cube, no_half], ids=lambda f: f.__name__)
def test_near_misses_are_not_fused(act):
    _, gm, modified = _fuse(_Mlp(act).eval(), torch.randn(4, 8, 32))
    assert not modified and not _ops(gm, _A.gelu.default)


class _GeluIntoNorm(nn.Module):
    """The GELU feeds a layer norm (fp32 under autocast): fusing would round its result to 16-bit."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm = nn.Linear(32, 128), nn.LayerNorm(128)

    def forward(self, x):
        return self.norm(hf_new_gelu(self.fc1(x)))


class _GeluOut(nn.Module):
    """The GELU is the model's output (fp32 under autocast)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 128)

    def forward(self, x):
        return hf_new_gelu(self.fc1(x))


@pytest.mark.parametrize("model_cls", [_GeluIntoNorm, _GeluOut], ids=lambda c: c.__name__)
def test_gelu_read_in_fp32_is_not_fused(model_cls):
    _, gm, modified = _fuse(model_cls().eval(), torch.randn(4, 8, 32))
    assert not modified and not _ops(gm, _A.gelu.default)


def test_intermediate_with_another_user_is_not_fused():
    _, gm, modified = _fuse(_SharedTanh(None).eval(), torch.randn(4, 8, 32))
    assert not modified and not _ops(gm, _A.gelu.default)
    assert len(_ops(gm, _A.tanh.default)) == 1


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("act", [hf_new_gelu, erf_div], ids=lambda f: f.__name__)
def test_converted_matches_fp32_and_autocast(act, precision):
    model = _Mlp(act).eval()
    gm = rewriter.convert(model, (torch.randn(4, 8, 32),), precision=precision)
    assert len(_ops(gm, _A.gelu.default)) == 1
    assert not _ops(gm, _A.tanh.default, _A.erf.default, _A.pow.Tensor_Scalar)
    x = torch.randn(16, 8, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(x), gm(x)
    with torch.autocast("cpu", dtype=DTYPES[precision]):
        autocast = model(x).float()
    assert got.dtype == torch.float32
    assert rel_l2(want, got) <= MAX_REL_L2[precision]
    assert rel_l2(autocast, got) <= VS_AUTOCAST


def test_gpt2_has_no_pow_or_tanh():
    import transformers
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     use_cache=False, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    gm = rewriter.convert(model, (), {"input_ids": ids}, precision="bf16")
    assert not _ops(gm, _A.pow.Tensor_Scalar, _A.tanh.default)
    gelus = _ops(gm, _A.gelu.default)
    assert len(gelus) == 2 and all(n.kwargs["approximate"] == "tanh" for n in gelus)
    assert {meta.module_path(n) for n in gelus} == {"transformer.h.0.mlp.act", "transformer.h.1.mlp.act"}
    removed = [e for e in rewriter.diff(model, gm).nodes if e.change == "removed" and e.op == "tanh"]
    assert len(removed) == 2 and all(e.rule == "fuse_gelu" for e in removed)
