"""SaturateConstants: fill values beyond a 16-bit op's range become that dtype's finite limits (what
the model's `torch.finfo(x.dtype).min` gives under autocast), so HF-style masks run and stay exact;
values in range, fp32 ops and ordinary large numbers in arithmetic are left as written."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import transformers

import rewriter
from rewriter import meta
from rewriter.capture import capture
from rewriter.config import ConvertConfig
from rewriter.passes import SaturateConstants
from rewriter.passes.infra import PassManager
from rewriter.pipeline import build_passes

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_F32_MIN = torch.finfo(torch.float32).min


class _Masks(nn.Module):
    """Every HF-style way to write a mask with fp32's limits, around 16-bit attention scores."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x, mask):
        scores = self.q(x) @ self.k(x).transpose(-1, -2)                      # 16-bit (matmul)
        a = scores.masked_fill(~mask, torch.finfo(torch.float32).min)         # masked_fill.Scalar
        b = scores.masked_fill(~mask, torch.tensor(torch.finfo(torch.float32).min))  # .Tensor
        c = torch.where(mask, scores, torch.finfo(torch.float32).min)        # where.ScalarOther
        d = torch.full_like(scores, torch.finfo(torch.float32).min)          # full_like
        e = scores.clamp(min=torch.finfo(torch.float32).min)                 # clamp bound
        keep = scores.sigmoid().round()                                      # a 16-bit 0/1 mask
        f = scores + (1.0 - keep) * torch.finfo(torch.float32).min           # arithmetic
        return a.softmax(-1), b.softmax(-1), c.softmax(-1), d, e, f.softmax(-1)


def _inputs():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    mask = torch.ones(2, 6, 6, dtype=torch.bool)
    mask[0, :, 4:] = False
    mask[1, 2, :] = False          # an all-masked row: uniform in fp32, must not turn NaN
    return x, mask


def _pipeline(precision):
    """The passes of PASS_TABLE before SaturateConstants and after it."""
    passes = build_passes(ConvertConfig(precision=precision))
    at = [p.name for p in passes].index("saturate_constants")
    return passes[:at], passes[at + 1:]


def _lowered_without_the_pass(model, args, precision):
    gm = capture(model, args, {}, dynamic_batch=False).graph_module
    before, after = _pipeline(precision)
    PassManager(before + after)(gm)
    return gm


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_limits_become_the_computing_dtype_limits(precision):
    model, args = _Masks().eval(), _inputs()
    with pytest.raises(RuntimeError, match="without overflow"):
        _lowered_without_the_pass(model, args, precision)(*args)
    gm = capture(model, args, {}, dynamic_batch=False).graph_module
    before, after = _pipeline(precision)
    PassManager(before)(gm)
    assert SaturateConstants().call(gm).modified
    gm.graph.lint()
    assert not SaturateConstants().call(gm).modified  # idempotent
    PassManager(after)(gm)
    low = torch.finfo(_DTYPES[precision]).min
    fills = {}
    for node in gm.graph.nodes:
        notes = [r for r in meta.get(node, meta.REWRITTEN) or [] if r["pass"] == "saturate_constants"]
        if notes:
            fills[str(node.target)] = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, float)]
            assert "became" in notes[0]["reason"] and meta.dtype_name(_DTYPES[precision]) in notes[0]["reason"]
    assert fills == {
        "aten.masked_fill.Scalar": [low],            # both masked_fills (Scalar, and .Tensor turned Scalar)
        "aten.where.ScalarOther": [low],
        "aten.full_like.default": [low],
        "aten.clamp.default": [low],
        "aten.mul.Tensor": [low],
    }
    assert sum(1 for n in gm.graph.nodes if n.target is torch.ops.aten.masked_fill.Scalar) == 2

    outs = gm(*args)
    with torch.no_grad():
        refs = model(*args)
    tol = {"fp16": 5e-3, "bf16": 3e-2}[precision]
    for out, ref in zip(outs, refs):
        assert torch.isfinite(out).all()
        if ref.abs().max() < 1e30:  # the softmaxes: same probabilities, masked ones exactly 0
            assert torch.allclose(out.float(), ref, atol=tol)
            assert torch.equal(out[ref == 0], torch.zeros_like(out[ref == 0]))
    assert torch.allclose(outs[0][1, 2], torch.full((6,), 1 / 6), atol=1e-3)  # all-masked row: uniform


def test_values_in_range_fp32_ops_and_plain_arithmetic_are_left_alone():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, mask):
            y = self.lin(x)
            a = y.masked_fill(mask, -1e4)                    # in fp16's range
            b = y * 1e6                                      # large, but an ordinary number
            c = y.float().softmax(-1).masked_fill(mask, _F32_MIN)  # softmax keeps fp32
            return a, b, c

    x, mask = torch.randn(3, 8), torch.rand(3, 8) > 0.5
    gm = _lowered_without_the_pass(Plain().eval(), (x, mask), "fp16")
    assert not SaturateConstants().call(gm).modified
    assert any(n.target is torch.ops.aten.masked_fill.Scalar and n.args[2] == _F32_MIN
               for n in gm.graph.nodes)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_deberta_v2_runs_after_conversion(precision):
    cfg = transformers.DebertaV2Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=64, relative_attention=True,
                                       position_buckets=8, pos_att_type=["p2c", "c2p"])
    torch.manual_seed(0)
    model = transformers.DebertaV2Model(cfg).eval()
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    fast = rewriter.convert(model, inputs, precision=precision)
    assert any(r["pass"] == "saturate_constants" for n in fast.graph.nodes
               for r in meta.get(n, meta.REWRITTEN) or [])
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
        out = fast(**inputs).last_hidden_state
        with torch.autocast("cpu", dtype=_DTYPES[precision]):
            auto = model(**inputs).last_hidden_state.float()
    err = float((out - ref).norm() / ref.norm())
    assert torch.isfinite(out).all()
    assert err <= 1.5 * float((auto - ref).norm() / ref.norm()) + {"fp16": 1e-3, "bf16": 5e-3}[precision]
