"""FuseLinears: linears that read one input (q/k/v, gate/up) become one GEMM and a split, with the same
outputs; siblings with different decisions, shared weights or training mode are left alone."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import rewriter
from rewriter.passes.infra import PassManager, PassResult
from rewriter.passes import FuseLinears
from rewriter import meta
from helpers import rel_l2

_A = torch.ops.aten
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
MAX_REL_L2 = {"fp16": 1e-2, "bf16": 6e-2}  # the ceilings of tests/test_models.py


class _Attention(nn.Module):
    def __init__(self, d=32, heads=4, bias=True):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(d, d, bias=bias) for _ in range(3))
        self.out = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.query, self.key, self.value))
        y = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        return self.norm(x + self.out(y))


class _GatedMlp(nn.Module):  # Llama-style: gate and up read the same input, down reads their product
    def __init__(self, d=32, hidden=64):
        super().__init__()
        self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class _Tied(nn.Module):  # the key projection's weight is also read by the value projection
    def __init__(self, d=32):
        super().__init__()
        self.query, self.key = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.query(x) + self.key(x) + nn.functional.linear(x, self.key.weight)


def _linears(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _A.linear.default]


def _unfused(model, x, precision, monkeypatch):
    """The same conversion without FuseLinears (the pass made a no-op)."""
    with monkeypatch.context() as patch:
        patch.setattr(FuseLinears, "call", lambda self, gm: PassResult(gm, False))
        return rewriter.convert(model, (x,), precision=precision)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_qkv_fused_same_outputs(precision, monkeypatch):
    torch.manual_seed(0)
    model, x = _Attention().eval(), torch.randn(2, 8, 32)
    gm = rewriter.convert(model, (x,), precision=precision)
    plain = _unfused(model, x, precision, monkeypatch)
    assert len(_linears(plain)) == 4 and len(_linears(gm)) == 2  # q, k, v -> one; out stays
    fused = next(n for n in _linears(gm) if meta.get(n, meta.CREATED))
    (split,) = fused.users
    assert split.target is _A.split_with_sizes.default and split.args[1:] == ([32, 32, 32], -1)
    weight = gm.get_parameter(str(fused.args[1].target))
    assert weight.shape == (96, 32) and weight.dtype == DTYPES[precision]
    # the originals are gone: each weight is held once
    names = dict(gm.named_parameters())
    assert not any(n.startswith(("query.", "key.", "value.")) for n in names)
    assert "fused_query_key_value_weight" in names and "fused_query_key_value_bias" in names
    reason = meta.get(fused, meta.CREATED)["reason"]
    assert meta.get(fused, meta.CREATED)["pass"] == "fuse_linears"
    assert "query, key, value" in reason and "96 outputs instead of 3" in reason
    assert meta.module_path(fused) == ""  # the common parent: the root module here
    with torch.no_grad():
        want = model(x)
        for batch in (2, 1):
            xb = torch.randn(batch, 8, 32)
            torch.testing.assert_close(gm(xb), plain(xb), rtol=2e-3, atol=2e-3)
        assert rel_l2(want, gm(x)) < MAX_REL_L2[precision]
    assert not PassManager([FuseLinears(rewriter.ConvertConfig(precision=precision))])(gm).modified


def test_gate_up_fused_without_bias():
    torch.manual_seed(0)
    model, x = _GatedMlp().eval(), torch.randn(2, 8, 32)
    gm = rewriter.convert(model, (x,), precision="bf16")
    assert len(_linears(gm)) == 2
    fused = next(n for n in _linears(gm) if meta.get(n, meta.CREATED))
    assert len(fused.args) == 2 and fused.args[0].op != "get_attr"  # no bias
    assert "gate, up" in meta.get(fused, meta.CREATED)["reason"]
    with torch.no_grad():
        assert rel_l2(model(x), gm(x)) < MAX_REL_L2["bf16"]


def test_different_decisions_are_not_fused():
    model, x = _Attention().eval(), torch.randn(2, 8, 32)
    gm = rewriter.convert(model, (x,), precision="fp16", overrides={"query": "fp32"})
    linears = _linears(gm)
    assert len(linears) == 3  # query alone in fp32, key + value fused, out
    query = next(n for n in linears if meta.get(n, meta.DECISION)["dtype"] == "float32")
    assert meta.module_path(query) == "query"
    fused = next(n for n in linears if meta.get(n, meta.CREATED))
    assert "key, value" in meta.get(fused, meta.CREATED)["reason"]


def test_shared_weight_is_not_fused():
    model, x = _Tied().eval(), torch.randn(2, 8, 32)
    gm = rewriter.convert(model, (x,), precision="fp16")
    assert not any(meta.get(n, meta.CREATED) for n in _linears(gm))
    with torch.no_grad():
        assert rel_l2(model(x), gm(x)) < MAX_REL_L2["fp16"]


def test_training_mode_keeps_the_parameters():
    model, x = _Attention().train(), torch.randn(2, 8, 32)
    gm = rewriter.convert(copy.deepcopy(model), (x,), precision="bf16", mode="train")
    assert {n for n, _ in gm.named_parameters()} >= {"query.weight", "key.weight", "value.weight"}


def test_diff_shows_the_fusion():
    model, x = _Attention().eval(), torch.randn(2, 8, 32)
    gm = rewriter.convert(model, (x,), precision="fp16")
    text = str(rewriter.diff(model, gm))
    assert "fuse_linears" in text
