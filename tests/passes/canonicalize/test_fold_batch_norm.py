"""FoldBatchNorm: an eval-mode batch norm after a convolution becomes the convolution's weight and bias,
computed in fp32, with the reason on the convolution."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import rewriter
from rewriter import meta
from rewriter.capture import capture
from rewriter.config import ConvertConfig
from rewriter.passes import FoldBatchNorm
from helpers import check_graph_nodes, rel_l2

_A = torch.ops.aten
_BN = _A._native_batch_norm_legit_no_training.default
FOLDED_FP32_MAX_REL_L2 = 1e-6   # the same math reassociated in fp32: measured ~1e-7
MAX_REL_L2 = {"fp16": 2e-3, "bf16": 1.5e-2}  # whole conversion vs the fp32 model; measured ~4e-4 / ~3e-3


class _ConvBnNet(nn.Module):
    """conv(no bias) -> bn -> relu -> conv(bias) -> bn -> relu -> pool -> linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _model() -> nn.Module:
    """Batch norms with trained-looking statistics and affine parameters (not the identity at init)."""
    torch.manual_seed(0)
    model = _ConvBnNet()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.5)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
    return model.eval()


X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def _captured(model):
    return capture(model, (X,), {}).graph_module


def test_folds_each_batch_norm_into_its_convolution():
    model = _model()
    gm = _captured(model)
    check_graph_nodes(gm, counts={_BN: 2, _A.conv2d.default: 2})
    result = FoldBatchNorm(ConvertConfig(precision="fp16"))(gm)
    assert result.modified is True
    gm.graph.lint()
    gm.recompile()
    check_graph_nodes(gm, sequence=[_A.conv2d.default, _A.relu.default, _A.conv2d.default, _A.relu.default,
                                    _A.mean.dim, _A.linear.default],
                      counts={_A.conv2d.default: 2}, absent=[_BN])
    with torch.no_grad():
        assert rel_l2(model(X), gm(X)) <= FOLDED_FP32_MAX_REL_L2
    # the batch norm tensors are gone; each convolution now reads a folded bias
    names = dict(gm.named_parameters())
    assert not any("bn" in name for name in list(names) + [n for n, _ in gm.named_buffers()])
    assert all(c.args[2] is not None for c in gm.graph.nodes if c.target is _A.conv2d.default)


def test_the_reason_names_the_batch_norm():
    gm = _captured(_model())
    FoldBatchNorm(ConvertConfig(precision="fp16"))(gm)
    convs = [n for n in gm.graph.nodes if n.target is _A.conv2d.default]
    reasons = [note for c in convs for note in meta.get(c, meta.REWRITTEN) or []]
    assert [r["pass"] for r in reasons] == ["fold_batch_norm", "fold_batch_norm"]
    assert "'bn1'" in reasons[0]["reason"] and "'bn2'" in reasons[1]["reason"]
    assert all("eval mode" in r["reason"] for r in reasons)


def test_second_run_changes_nothing():
    gm = _captured(_model())
    assert FoldBatchNorm(ConvertConfig(precision="fp16"))(gm).modified is True
    gm.recompile()
    code = gm.code
    assert FoldBatchNorm(ConvertConfig(precision="fp16"))(gm).modified is False
    assert gm.code == code


class _SharedConv(nn.Module):
    """The convolution's output feeds the batch norm and a residual add: folding would change the add."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_convolution_with_other_users_is_left_alone():
    model = _SharedConv().eval()
    with torch.no_grad():
        model.bn.running_var.fill_(2.0)
    gm = _captured(model)
    assert FoldBatchNorm(ConvertConfig(precision="fp16"))(gm).modified is False
    check_graph_nodes(gm, counts={_BN: 1})
    with torch.no_grad():
        assert torch.equal(gm(X), model(X))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_converted_model_against_fp32(precision):
    """Through convert(): no batch norm left, weights folded before the 16-bit cast (rounded once)."""
    model = _model()
    gm = rewriter.convert(model, (X,), precision=precision)
    check_graph_nodes(gm, absent=[_BN])
    with torch.no_grad():
        assert rel_l2(model(X), gm(X)) <= MAX_REL_L2[precision]
