"""CastWeights: parameters and buffers stored once in their consumer's precision (half the bytes),
norm statistics kept fp32, a tensor read in two precisions gets one extra copy, training mode keeps
fp32 master weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rewriter.passes.analysis import Assign, Classify
from rewriter.passes.graph_utils import is_cast
from rewriter.passes.infra import PassManager
from rewriter.passes import CastWeights, FoldCasts, InsertCasts
from rewriter import meta
from rewriter.capture import capture
from rewriter.config import ConvertConfig


def _prepared(model, *inputs, **config):
    """Captured graph with casts inserted, ready for CastWeights."""
    torch.manual_seed(0)
    cfg = ConvertConfig(**config)
    gm = capture(model, inputs, {}, train=cfg.mode.value == "train").graph_module
    PassManager([Classify(), Assign(cfg), InsertCasts(cfg), FoldCasts()])(gm)
    return gm, cfg


def _cast_weights(gm, cfg):
    first = PassManager([CastWeights(cfg)])(gm)
    gm.graph.lint()
    second = PassManager([CastWeights(cfg)])(gm)
    assert second.modified is False
    return first


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _weight_casts(gm) -> list:
    return [n for n in gm.graph.nodes if is_cast(n) and n.args[0].op == "get_attr"]


class _ConvNet(nn.Module):
    """Only tensor-core consumers: every parameter and the projection buffer go 16-bit."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 16)
        self.register_buffer("proj", torch.randn(4, 16))

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return F.linear(torch.relu(self.fc(h)), self.proj)


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_parameters_stored_16bit_and_bytes_halved(precision, dtype):
    model = _ConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    gm, cfg = _prepared(model, x, precision=precision)
    with torch.no_grad():
        before = gm(x)
    assert len(_weight_casts(gm)) == 5  # conv w/b, fc w/b, proj: cast on every call so far
    assert _cast_weights(gm, cfg).modified is True
    assert _weight_casts(gm) == []
    assert {name: p.dtype for name, p in gm.named_parameters()} == {
        "conv.weight": dtype, "conv.bias": dtype, "fc.weight": dtype, "fc.bias": dtype}
    assert dict(gm.named_buffers())["proj"].dtype == dtype
    assert _param_bytes(gm) * 2 == _param_bytes(model)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            assert meta.value_dtype(node) == dtype
    with torch.no_grad():
        after = gm(x)
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # cast once == cast on every call


def test_norm_parameters_stay_fp32():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(16, 32)
            self.bn = nn.BatchNorm1d(32)
            self.ln = nn.LayerNorm(32)
            self.fc2 = nn.Linear(32, 8)

        def forward(self, x):
            return self.fc2(self.ln(torch.relu(self.bn(self.fc1(x)))))

    model = Net().eval()
    gm, cfg = _prepared(model, torch.randn(4, 16))
    _cast_weights(gm, cfg)
    dtypes = {name: t.dtype for name, t in [*gm.named_parameters(), *gm.named_buffers()]}
    assert dtypes == {
        "fc1.weight": torch.float16, "fc1.bias": torch.float16,
        "bn.weight": torch.float32, "bn.bias": torch.float32,          # read in fp32 by the kernel,
        "bn.running_mean": torch.float32, "bn.running_var": torch.float32,  # as under autocast
        "bn.num_batches_tracked": torch.int64,
        "ln.weight": torch.float32, "ln.bias": torch.float32,          # layer_norm runs in fp32
        "fc2.weight": torch.float16, "fc2.bias": torch.float16,
    }


class _Tied(nn.Module):
    """An embedding read in fp32 (it feeds an fp32 layer_norm) tied to an fp16 output projection."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.ln(self.emb(ids)))


def test_tensor_read_in_two_precisions_keeps_its_original_and_gets_one_copy():
    model = _Tied().eval()
    ids = torch.randint(0, 50, (2, 5))
    gm, cfg = _prepared(model, ids)
    with torch.no_grad():
        before = gm(ids)
    assert _cast_weights(gm, cfg).modified is True
    tensors = {name: t.dtype for name, t in [*gm.named_parameters(), *gm.named_buffers()]}
    copies = {name: dtype for name, dtype in tensors.items() if dtype == torch.float16}
    assert len(copies) == 1, tensors   # one fp16 copy, read by the head
    assert tensors["emb.weight"] == torch.float32   # the original, read by the embedding
    copy_name = next(iter(copies))
    getters = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == copy_name]
    assert len(getters) == 1 and meta.get(getters[0], meta.CREATED)["pass"] == "cast_weights"
    assert [meta.get(u, meta.OP_CLASS)["op"] for u in getters[0].users] == ["linear"]
    assert _weight_casts(gm) == []
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), before, rtol=0, atol=0)


def test_training_mode_keeps_fp32_master_weights():
    model = _ConvNet().train()
    x = torch.randn(2, 3, 8, 8)
    gm, cfg = _prepared(model, x, mode="train")
    from rewriter.pipeline import build_passes

    assert not any(isinstance(p, CastWeights) for p in build_passes(cfg))  # the pass table skips it
    assert all(p.dtype == torch.float32 and p.requires_grad for p in gm.parameters())
    assert len(_weight_casts(gm)) == 5  # cast inside the graph, so autograd reaches the fp32 weights
    gm(x).float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in gm.parameters())
    assert model.conv.weight.grad is None  # the user's model is not touched
