"""PaddingMask: Hugging Face's key padding mask subgraph becomes cast -> unsqueeze x2 -> expand with the same
values; masks that are not a plain key padding mask (query padding too, causal + padding) stay."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rewriter.passes.infra import PassManager
from rewriter.passes import CausalAttention, PaddingMask
from rewriter import meta
from rewriter.capture import capture

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_A = torch.ops.aten
_SDPA = _A.scaled_dot_product_attention.default


def _sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _SDPA]


def _mask_of(node):
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")


def _rewrite(model, **kwargs):
    gm = capture(model, (), kwargs).graph_module
    before = copy.deepcopy(gm)
    modified = PassManager([CausalAttention(), PaddingMask()])(gm).modified
    return before, gm, modified


def _masks(batch: int, seq: int):
    ones = torch.ones(batch, seq, dtype=torch.long)
    right, left = ones.clone(), ones.clone()
    right[0, seq // 2:] = 0
    left[-1, : seq // 3] = 0
    return [ones, right, left]


@pytest.fixture(scope="module")
def bert():
    import transformers
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def test_bert_padding_mask_rebuilt_same_outputs(bert):
    ids = torch.randint(0, 128, (3, 16))
    before, gm, modified = _rewrite(bert, input_ids=ids, attention_mask=torch.ones_like(ids))
    assert modified
    nodes = _sdpa_nodes(gm)
    masks = {_mask_of(n) for n in nodes}
    assert len(masks) == 1  # one mask, shared by both layers
    (mask,) = masks
    assert mask.target is _A.expand.default and mask.args[1][:2] == [-1, 1] and mask.args[1][3] == -1
    length = mask.args[1][2]  # the query length stays symbolic: a size read, not 16
    assert isinstance(length, torch.fx.Node) and length.target is _A.sym_size.int
    assert meta.get(mask, meta.CREATED)["pass"] == "padding_mask"
    note = meta.get(nodes[0], meta.REWRITTEN)[-1]
    assert note["pass"] == "padding_mask" and "key padding mask of input 'attention_mask'" in note["reason"]
    assert "checked on 7 padding patterns at sizes" in note["reason"]
    assert note["reason"].count(";") >= 2  # at several sizes of batch and length, not only the example
    ops = lambda g: {n.target for n in g.graph.nodes if n.op == "call_function"}
    assert _A.index.Tensor in ops(before) and _A.index.Tensor not in ops(gm)
    assert len(gm.graph.nodes) < len(before.graph.nodes) - 10
    with torch.no_grad():
        for batch, seq in ((3, 16), (1, 16), (2, 9), (4, 33)):
            ids = torch.randint(0, 128, (batch, seq))
            for am in _masks(batch, seq):
                want = bert(input_ids=ids, attention_mask=am).last_hidden_state
                got = gm(input_ids=ids, attention_mask=am).last_hidden_state
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not PassManager([PaddingMask()])(gm).modified  # idempotent


class _QueryAndKeyPadding(nn.Module):
    """mask[b, i, j] = keep[b, i] & keep[b, j]: not a key padding mask, must stay."""

    def forward(self, x, keep):
        k = keep.bool()
        mask = (k[:, None, :, None] & k[:, None, None, :])
        q = x.view(x.shape[0], x.shape[1], 2, -1).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)


class _KeyPadding(nn.Module):
    def forward(self, x, keep):
        mask = (keep != 0)[:, None, None, :].expand(-1, 1, x.shape[1], -1) & torch.ones(
            x.shape[1], x.shape[1], dtype=torch.bool)
        q = x.view(x.shape[0], x.shape[1], 2, -1).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)


def test_query_and_key_padding_is_kept():
    x, keep = torch.randn(2, 8, 16), torch.ones(2, 8, dtype=torch.long)
    _, gm, modified = _rewrite(_QueryAndKeyPadding(), x=x, keep=keep)
    assert not modified
    assert all(_mask_of(n).target is not _A.expand.default or not meta.get(_mask_of(n), meta.CREATED)
               for n in _sdpa_nodes(gm))


def test_hand_written_key_padding_is_rebuilt():
    model = _KeyPadding()
    x, keep = torch.randn(2, 8, 16), torch.ones(2, 8, dtype=torch.long)
    before, gm, modified = _rewrite(model, x=x, keep=keep)
    assert modified
    keep = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    torch.testing.assert_close(gm(x=x, keep=keep), model(x, keep))


def test_gpt2_causal_and_padding_is_kept():
    import transformers
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     use_cache=False)
    model = transformers.GPT2Model(config).eval()
    ids = torch.randint(0, 128, (2, 16))
    _, gm, _ = _rewrite(model, input_ids=ids, attention_mask=torch.ones_like(ids))
    assert not any(meta.get(_mask_of(n), meta.CREATED, {}).get("pass") == "padding_mask"
                   for n in _sdpa_nodes(gm) if isinstance(_mask_of(n), torch.fx.Node))
    with torch.no_grad():
        for am in _masks(2, 16):
            # padded positions attend to nothing valid in a left-padded causal row: compare the kept ones
            want = model(input_ids=ids, attention_mask=am).last_hidden_state
            got = gm(input_ids=ids, attention_mask=am).last_hidden_state
            valid = am.bool()
            torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)


class _KeyPaddingEqOne(nn.Module):
    """The model's own test is `keep == 1`: positions holding 2 are masked out."""

    def forward(self, x, keep):
        mask = (keep == 1)[:, None, None, :].expand(-1, 1, x.shape[1], -1) & torch.ones(
            x.shape[1], x.shape[1], dtype=torch.bool)
        q = x.view(x.shape[0], x.shape[1], 2, -1).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)


def test_the_models_own_comparison_is_kept_exact_for_every_mask_value():
    """issue 19 item 6: `keep == 1` was rewritten as `keep != 0` (rel. error 0.18 with a 2 in the mask)."""
    model = _KeyPaddingEqOne()
    x, keep = torch.randn(2, 8, 16), torch.ones(2, 8, dtype=torch.long)
    _, gm, modified = _rewrite(model, x=x, keep=keep)
    assert modified
    (mask,) = {_mask_of(n) for n in _sdpa_nodes(gm)}
    tests = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (_A.eq.Scalar, _A.ne.Scalar)]
    assert [n.target for n in tests] == [_A.eq.Scalar] and tests[0].args[1] == 1  # the test kept as written
    for values in ([[1, 2, 1, 0, 2, 1, 1, 1], [2, 2, 2, 2, 1, 1, 1, 1]],
                   [[-1, 1, 1, 7, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]]):
        keep = torch.tensor(values)
        torch.testing.assert_close(gm(x=x, keep=keep), model(x, keep), rtol=0, atol=0)
    x, keep = torch.randn(3, 5, 16), torch.tensor([[1, 2, 1, 0, 1]] * 3)
    torch.testing.assert_close(gm(x=x, keep=keep), model(x, keep), rtol=0, atol=0)
