"""CausalAttention: a shape-only lower-triangular attention mask becomes SDPA's is_causal=True (exact);
data-dependent, non-causal, parameter-built and random masks stay as they are."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rewriter
from rewriter.passes.infra import PassManager
from rewriter.passes import CausalAttention
from rewriter import meta
from rewriter.capture import capture
from helpers import rel_l2

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_SDPA = torch.ops.aten.scaled_dot_product_attention.default
# the ceilings of tests/test_models.py for transformers in bf16
BF16_MAX_REL_L2 = 6e-2
AUTOCAST_SLACK, AUTOCAST_EPS = 1.05, 1e-6


def _sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _SDPA]


def _mask_of(node):
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")


def _is_causal(node) -> bool:
    return bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False))


def _rewrite(model, *args, **kwargs):
    """(captured fp32 graph, the same graph after CausalAttention, whether it modified)."""
    gm = capture(model, args, kwargs).graph_module
    before = copy.deepcopy(gm)
    result = PassManager([CausalAttention()])(gm)
    return before, gm, result.modified


# ------------------------------------------------------------------ GPT-2


def _gpt2():
    import transformers
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     use_cache=False, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def gpt2():
    return _gpt2()


def _ids(batch, seq=16, seed=0):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_gpt2_mask_becomes_is_causal(gpt2):
    gm = rewriter.convert(gpt2, (), {"input_ids": _ids(4)}, precision="bf16")
    nodes = _sdpa_nodes(gm)
    assert len(nodes) == 2
    for node in nodes:
        assert _mask_of(node) is None and _is_causal(node)
        note = meta.get(node, meta.REWRITTEN)[-1]
        assert note["pass"] == "causal_attention"
        sizes = note["reason"].split("verified at sizes ")[1].split(")")[0].split("; ")
        assert len(sizes) >= 3 and any("=16" in s and "=4" in s for s in sizes)  # the example and others
    # the mask subgraph is gone, including the metadata asserts on its values
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert not ops & {"aten.cumsum.default", "aten.diff.default", "aten.le.Tensor", "aten.new_ones.default",
                      "aten.__and__.Tensor", "aten.index.Tensor"}
    gm.graph.lint()
    removed = [e for e in rewriter.diff(gpt2, gm).nodes if e.change == "removed" and e.op == "cumsum"]
    assert removed and removed[0].rule == "causal_attention"  # `rewrite diff` says why it is gone
    for batch in (4, 1, 7):  # the batch dimension stays dynamic
        ids = _ids(batch, seed=10 + batch)
        with torch.no_grad():
            want = gpt2(input_ids=ids).logits
            got = gm(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = gpt2(input_ids=ids).logits.float()
        error = rel_l2(want, got)
        assert error <= BF16_MAX_REL_L2
        assert error <= rel_l2(want, autocast) * AUTOCAST_SLACK + AUTOCAST_EPS


def test_gpt2_rewrite_is_exact_in_fp32(gpt2):
    before, after, modified = _rewrite(gpt2, input_ids=_ids(4))
    assert modified
    assert all(_mask_of(n) is None and _is_causal(n) for n in _sdpa_nodes(after))
    assert len(after.graph.nodes) < len(before.graph.nodes)
    for batch in (4, 1, 9):
        ids = _ids(batch, seed=batch)
        with torch.no_grad():
            want, got = before(input_ids=ids).logits, after(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gpt2_padding_mask_is_data_dependent(gpt2):
    ids = _ids(4)
    attention = torch.ones(4, 16, dtype=torch.long)
    attention[0, 10:] = 0
    _, gm, modified = _rewrite(gpt2, input_ids=ids, attention_mask=attention)
    assert not modified
    nodes = _sdpa_nodes(gm)
    assert nodes and all(_mask_of(n) is not None and not _is_causal(n) for n in nodes)


def test_gpt2_train_mode(gpt2):
    model = copy.deepcopy(gpt2)
    model.config.attn_pdrop = 0.1
    gm = rewriter.convert(model, (), {"input_ids": _ids(4)}, precision="bf16", mode="train")
    for graph, dropout in ((gm.graph, 0.1), (gm.eval_graph, 0.0)):
        nodes = [n for n in graph.nodes if n.op == "call_function" and n.target is _SDPA]
        assert nodes and all(_mask_of(n) is None and _is_causal(n) for n in nodes)
        assert all((n.args[4] if len(n.args) > 4 else n.kwargs.get("dropout_p", 0.0)) == dropout
                   for n in nodes)  # dropout kept as it was
    gm.train()
    out = gm(input_ids=_ids(2, seed=3)).logits
    out.float().square().mean().backward()
    assert all(p.grad is not None for p in gm.parameters() if p.requires_grad)


# ------------------------------------------------------------------ small attention modules


class _Attention(nn.Module):
    """Self-attention whose mask is built by `make_mask(x)` (x: [batch, heads, seq, dim])."""

    def __init__(self, make_mask):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.make_mask = make_mask

    def forward(self, x):
        h = self.proj(x).reshape(x.shape[0], x.shape[1], 2, 4).transpose(1, 2)
        return F.scaled_dot_product_attention(h, h, h, attn_mask=self.make_mask(h))


def _positions(h):
    seq = torch.arange(h.shape[2], device=h.device)
    return seq[:, None], seq[None, :]


def _tril_bool(h):
    rows, cols = _positions(h)
    return (cols <= rows)[None, None].expand(h.shape[0], 1, -1, -1)


def _tril_float_inf(h):
    rows, cols = _positions(h)
    return torch.zeros(rows.shape[0], cols.shape[1]).masked_fill(cols > rows, float("-inf"))


def _tril_float_min(h):
    rows, cols = _positions(h)
    masked = torch.full((rows.shape[0], cols.shape[1]), torch.finfo(torch.float32).min)
    return torch.where(cols <= rows, 0.0, masked)


def _all_true(h):
    return torch.ones(h.shape[0], 1, h.shape[2], h.shape[2], dtype=torch.bool)


def _band(h):
    rows, cols = _positions(h)
    return (rows - cols).abs() <= 2


def _upper(h):
    rows, cols = _positions(h)
    return cols >= rows


def _soft_float(h):  # -1e4 is not -inf: softmax gives the masked keys a tiny weight
    rows, cols = _positions(h)
    return torch.zeros(rows.shape[0], cols.shape[1]).masked_fill(cols > rows, -1e4)


def _from_values(h):  # data-dependent: reads the activations
    rows, cols = _positions(h)
    return (cols <= rows) & (h[:, :1, :, :1] > -100)


def _random(h):
    rows, cols = _positions(h)
    return (cols <= rows) | (torch.rand(rows.shape[0], cols.shape[1]) > 2)


@pytest.mark.parametrize("make_mask", [_tril_bool, _tril_float_inf, _tril_float_min])
def test_causal_masks_are_rewritten_exactly(make_mask):
    torch.manual_seed(0)
    model = _Attention(make_mask).eval()
    before, after, modified = _rewrite(model, torch.randn(4, 6, 8))
    assert modified
    (node,) = _sdpa_nodes(after)
    assert _mask_of(node) is None and _is_causal(node)
    assert not any(n.target in (torch.ops.aten.arange.default, torch.ops.aten.arange.start)
                   for n in after.graph.nodes)
    for batch in (4, 1, 3):
        x = torch.randn(batch, 6, 8)
        torch.testing.assert_close(after(x), before(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(after(x), model(x), rtol=1e-6, atol=1e-6)
    again = PassManager([CausalAttention()])(after)  # idempotent
    assert not again.modified


def _all_zero_float(h):
    return torch.zeros(h.shape[0], 1, h.shape[2], h.shape[2])


@pytest.mark.parametrize("make_mask", [_all_true, _all_zero_float])
def test_masks_that_mask_nothing_are_dropped(make_mask):
    torch.manual_seed(0)
    model = _Attention(make_mask).eval()
    before, after, modified = _rewrite(model, torch.randn(4, 6, 8))
    assert modified
    (node,) = _sdpa_nodes(after)
    assert _mask_of(node) is None and not _is_causal(node)
    assert any("full mask" in note["reason"] for note in node.meta[meta.REWRITTEN])
    for batch in (4, 1, 3):
        x = torch.randn(batch, 6, 8)
        torch.testing.assert_close(after(x), model(x), rtol=1e-6, atol=1e-6)
    assert not PassManager([CausalAttention()])(after).modified


@pytest.mark.parametrize("make_mask", [_band, _upper, _soft_float, _from_values, _random])
def test_other_masks_are_left_alone(make_mask):
    torch.manual_seed(0)
    model = _Attention(make_mask).eval()
    before, after, modified = _rewrite(model, torch.randn(4, 6, 8))
    assert not modified
    assert [n.format_node() for n in after.graph.nodes] == [n.format_node() for n in before.graph.nodes]


class _BufferMask(nn.Module):
    """The mask is sliced from a stored tensor: a buffer (constant) or a parameter (learnable)."""

    def __init__(self, parameter: bool):
        super().__init__()
        tril = torch.ones(16, 16).tril()
        if parameter:
            self.bias = nn.Parameter(tril)
        else:
            self.register_buffer("bias", tril.bool())

    def forward(self, x):
        seq = x.shape[2]
        mask = self.bias[:seq, :seq]
        if mask.dtype != torch.bool:
            mask = mask > 0.5
        return F.scaled_dot_product_attention(x, x, x, attn_mask=mask)


@pytest.mark.parametrize("parameter", [False, True])
def test_mask_from_a_buffer_but_not_a_parameter(parameter):
    model = _BufferMask(parameter).eval()
    before, after, modified = _rewrite(model, torch.randn(4, 2, 8, 4))
    assert modified is not parameter
    (node,) = _sdpa_nodes(after)
    assert _is_causal(node) is not parameter
    x = torch.randn(3, 2, 8, 4)
    torch.testing.assert_close(after(x), before(x), rtol=1e-6, atol=1e-6)


def test_rectangular_mask_is_left_alone():
    class Cross(nn.Module):
        def forward(self, q, k):
            rows = torch.arange(q.shape[2])[:, None]
            cols = torch.arange(k.shape[2])[None, :]
            return F.scaled_dot_product_attention(q, k, k, attn_mask=cols <= rows)

    _, _, modified = _rewrite(Cross(), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 6, 8))
    assert not modified
