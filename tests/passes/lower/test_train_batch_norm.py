"""TrainBatchNorm: the training graph updates batch-norm statistics in place, in fp32, so backward
works (no copy_ into tensors autograd saved) and the statistics match eager PyTorch's."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from rewriter.passes.analysis import Assign, Classify
from rewriter.passes.infra import PassManager
from rewriter.passes import FoldCasts, InsertCasts
from rewriter.passes.lower.train_batch_norm import TrainBatchNorm
from rewriter import meta
from rewriter.capture import capture
from rewriter.config import ConvertConfig

aten = torch.ops.aten


class _ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def _train_graph(overrides=None):
    torch.manual_seed(0)
    model, x = _ConvBN(), torch.randn(4, 3, 6, 6)
    gm = capture(model, (x,), {}, train=True).graph_module
    config = ConvertConfig(precision="fp16", mode="train", overrides=overrides)
    PassManager([Classify(), Assign(config), InsertCasts(config), FoldCasts()])(gm)
    return model, x, gm, config


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("overrides", [None, {"bn": "fp32"}], ids=["fp16", "bn-fp32-override"])
def test_statistics_update_in_place_and_backward_works(overrides):
    model, x, gm, config = _train_graph(overrides)
    copies_before = [n for n in gm.graph.nodes if n.target is aten.copy_.default]
    assert len(copies_before) == 3  # running_mean, running_var, num_batches_tracked

    result = TrainBatchNorm(config)(gm)
    assert result.modified
    gm.graph.lint()
    gm.recompile()
    assert TrainBatchNorm(config)(gm).modified is False

    targets = _targets(gm)
    assert aten._native_batch_norm_legit_functional.default not in targets
    assert targets.count(aten._native_batch_norm_legit.default) == 1
    copies = [n for n in gm.graph.nodes if n.target is aten.copy_.default]
    assert [c.args[0].target for c in copies] == ["bn.num_batches_tracked"]  # stats: in the kernel
    bn = next(n for n in gm.graph.nodes if n.target is aten._native_batch_norm_legit.default)
    assert [a.target for a in bn.args[1:5]] == ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
    assert meta.get(bn, meta.CREATED)["pass"] == "train_batch_norm"

    out = gm(x)
    out.float().sum().backward()  # failed before the pass whenever the stats were read uncast
    assert gm.bn.weight.grad is not None and gm.conv.weight.grad.dtype == torch.float32
    model.train()(x)
    assert gm.bn.running_mean.dtype == torch.float32
    assert torch.allclose(gm.bn.running_mean, model.bn.running_mean, rtol=1e-2, atol=1e-4)
    assert torch.allclose(gm.bn.running_var, model.bn.running_var, rtol=1e-2, atol=1e-4)
    assert int(gm.bn.num_batches_tracked) == 1


def test_without_the_pass_backward_fails_on_uncast_statistics():
    _, x, gm, _ = _train_graph({"bn": "fp32"})  # the statistics reach the functional op uncast
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        gm(x).float().sum().backward()


def test_pass_table_runs_it_for_training_conversions_only():
    from rewriter.pipeline import build_passes

    def names(mode):
        return [p.pass_name for p in build_passes(ConvertConfig(precision="fp16", mode=mode))]
    assert "train_batch_norm" in names("train") and "train_batch_norm" not in names("eval")
