"""ChannelsLast: 4-D convolution weights of 16-bit convolutions stored channels_last, values unchanged,
the reason on the convolution; fp32 convolutions and other weights are left alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import rewriter
from rewriter import meta
from rewriter.capture import capture
from rewriter.config import ConvertConfig
from rewriter.passes import CastWeights, ChannelsLast, FoldCasts, InsertCasts
from rewriter.passes.analysis import Assign, Classify
from rewriter.passes.graph_utils import attr_owner
from rewriter.passes.infra import PassManager
from helpers import check_graph_nodes, rel_l2

_A = torch.ops.aten
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
MAX_REL_L2 = {"fp16": 2e-3, "bf16": 1.5e-2}  # vs the fp32 model; measured ~3e-4 / ~2.5e-3


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return _ConvNet().eval()


def _lowered(model, **config):
    """The graph as ChannelsLast receives it in the pipeline: decisions made, casts in, weights cast."""
    cfg = ConvertConfig(**config)
    gm = capture(model, (X,), {}).graph_module
    PassManager([Classify(), Assign(cfg), InsertCasts(cfg), FoldCasts(), CastWeights(cfg)])(gm)
    return gm, cfg


def _conv_weights(gm) -> list[torch.Tensor]:
    convs = [n for n in gm.graph.nodes if n.target is _A.conv2d.default]
    return [getattr(*attr_owner(gm, c.args[1].target)) for c in convs]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_conv_weights_become_channels_last_with_the_same_values(precision):
    model = _model()
    gm, cfg = _lowered(model, precision=precision)
    before = [w.clone() for w in _conv_weights(gm)]
    assert not any(w.is_contiguous(memory_format=torch.channels_last) for w in before)
    with torch.no_grad():
        want = gm(X)
    result = ChannelsLast(cfg)(gm)
    assert result.modified is True
    gm.graph.lint()
    gm.recompile()
    after = _conv_weights(gm)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in after)
    assert all(torch.equal(a, b) and a.dtype == _DTYPES[precision] for a, b in zip(after, before))
    dtype = meta.dtype_name(_DTYPES[precision])
    check_graph_nodes(gm, sequence=[(_A.conv2d.default, dtype), _A.relu.default, (_A.conv2d.default, dtype),
                                    _A.relu.default], counts={_A.conv2d.default: 2})
    with torch.no_grad():
        got = gm(X)
        assert torch.equal(got, want)  # layout only: the same values
        assert rel_l2(model(X), got) <= MAX_REL_L2[precision]
    assert not ChannelsLast(cfg)(gm).modified  # idempotent


def test_the_reason_is_recorded_on_each_convolution():
    gm, cfg = _lowered(_model(), precision="fp16")
    ChannelsLast(cfg)(gm)
    for conv in (n for n in gm.graph.nodes if n.target is _A.conv2d.default):
        notes = meta.get(conv, meta.REWRITTEN)
        assert [n["pass"] for n in notes] == ["channels_last"]
        assert "channels_last" in notes[0]["reason"] and "NHWC" in notes[0]["reason"]


def test_fp32_convolutions_are_left_alone():
    """A convolution kept fp32 (an override) runs no tensor-core NHWC kernel: its weight keeps NCHW."""
    gm, cfg = _lowered(_model(), precision="fp16", overrides={"conv1": "fp32", "conv2": "fp32"})
    assert ChannelsLast(cfg)(gm).modified is False
    assert not any(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(gm))
    assert all(meta.get(n, meta.REWRITTEN) is None for n in gm.graph.nodes if n.target is _A.conv2d.default)


def test_convert_runs_it_in_eval_mode():
    model = _model()
    gm = rewriter.convert(model, (X,), precision="bf16")
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(gm))
    with torch.no_grad():
        assert rel_l2(model(X), gm(X)) <= MAX_REL_L2["bf16"]
