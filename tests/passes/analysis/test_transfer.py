"""TransferMeasurements: a measurement made on the evaluation graph decides the training graph too."""
from __future__ import annotations

import torch
import torch.nn as nn

from rewriter.passes.analysis import Assign, Classify
from rewriter.passes.analysis.transfer import TransferMeasurements, node_keys
from rewriter.passes.infra import PassManager, graph_signature
from rewriter import meta
from rewriter.capture import capture
from rewriter.config import ConvertConfig


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.drop, self.fc2 = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), \
            nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def _linear(gm, path):
    return next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default
                and meta.module_path(n) == path)


def test_measured_keep_decision_reaches_the_training_graph():
    torch.manual_seed(0)
    model, x = _Net(), torch.randn(4, 8)
    eval_gm = capture(model, (x,), {}, train=False).graph_module
    train_gm = capture(model, (x,), {}, train=True).graph_module
    # what the ranges pass writes when fc2's output overflows fp16
    meta.put(_linear(eval_gm, "fc2"), meta.RANGE, {"amax": 1e5, "keep": "float32", "reason": "amax 1e5"})

    before = graph_signature(train_gm)
    config = ConvertConfig(precision="fp16", mode="train")
    result = PassManager([TransferMeasurements(eval_gm), Classify(), Assign(config)])(train_gm)
    assert result.modified is False and graph_signature(train_gm) == before

    fc2, fc1 = _linear(train_gm, "fc2"), _linear(train_gm, "fc1")
    assert meta.get(fc2, meta.RANGE)["keep"] == "float32"
    assert meta.get(fc2, meta.DECISION)["dtype"] == "float32"
    assert meta.get(fc2, meta.DECISION)["rule"] == "analysis:range"
    assert meta.get(fc1, meta.RANGE) is None and meta.get(fc1, meta.DECISION)["dtype"] == "float16"


def test_keys_ignore_mode_dependent_nodes():
    torch.manual_seed(0)
    model, x = _Net(), torch.randn(4, 8)
    eval_keys = set(node_keys(capture(model, (x,), {}, train=False).graph_module.graph).values())
    train_keys = set(node_keys(capture(model, (x,), {}, train=True).graph_module.graph).values())
    for key in [("fc1", "linear", 0), ("fc2", "linear", 0), ("bn", "batch_norm", 0), ("", "relu", 0)]:
        assert key in eval_keys and key in train_keys, key
    assert ("drop", "dropout", 0) in train_keys - eval_keys
