"""Classify: one op class per node from the op table, a reason for each, no graph edits."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rewriter.passes.analysis import Classify
from rewriter.passes.infra import graph_signature
from rewriter import meta
from rewriter.capture import capture


class _Net(nn.Module):
    """Every class once: lowp, follow, promote, fp32, untouched (ints, float64, explicit casts)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.ln = nn.LayerNorm(16)

    def forward(self, x, target):
        h = F.gelu(self.fc(x))                  # lowp, follow
        h = self.ln(h + x)                      # promote, fp32
        p = torch.softmax(h, -1)                # fp32
        idx = (torch.arange(8) * 2) % 16        # integer math: untouched
        d = x.double().exp().sum(-1)            # float64: untouched
        loss = F.mse_loss(p, target)            # loss: fp32
        t = p.transpose(0, 1)                   # data movement: follow, exact
        z = torch.zeros_like(h) + torch.log(p).sum(-1, keepdim=True)  # follow (dtype of h), fp32
        return p[:, idx], loss, d, t, p > 0.5, z, p.to(torch.float16)


def _classified(model, *inputs):
    gm = capture(model.eval(), inputs, {}).graph_module
    result = Classify()(gm)
    return gm, result


@pytest.fixture(scope="module")
def classified():
    torch.manual_seed(0)
    return _classified(_Net(), torch.randn(4, 16), torch.randn(4, 16))


def _table(gm) -> list[tuple[str, str]]:
    """(op, class) of every classified call_function node, in graph order."""
    rows = []
    for node in gm.graph.nodes:
        info = meta.get(node, meta.OP_CLASS)
        if node.op == "call_function" and info is not None:
            rows.append((info["op"], info["class"]))
    return rows


def _only(rows, ops):
    return [r for r in rows if r[0] in ops]


def test_op_classes_in_graph_order(classified):
    gm, _ = classified
    rows = _table(gm)
    assert _only(rows, {"linear", "gelu", "add", "layer_norm", "softmax", "mse_loss", "transpose",
                        "zeros_like", "log", "sum", "exp", "broadcast_tensors"}) == [
        ("linear", "lowp"),
        ("gelu", "follow"),
        ("add", "promote"),
        ("layer_norm", "fp32"),
        ("softmax", "fp32"),
        ("exp", "untouched"),     # float64
        ("sum", "untouched"),     # float64
        ("broadcast_tensors", "promote"),  # mse_loss(prediction, target) broadcasts both first
        ("mse_loss", "fp32"),
        ("transpose", "follow"),
        ("zeros_like", "follow"),
        ("log", "fp32"),
        ("sum", "fp32"),
        ("add", "promote"),
    ]


def test_integer_math_casts_and_guards_are_untouched(classified):
    gm, _ = classified
    rows = dict((op, cls) for op, cls in _table(gm) if op in {"arange", "mul", "remainder", "_to_copy",
                                                              "_assert_tensor_metadata"})
    assert rows == {"arange": "untouched", "mul": "untouched", "remainder": "untouched",
                    "_to_copy": "untouched", "_assert_tensor_metadata": "untouched"}
    guards = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert guards and all(meta.get(n, meta.OP_CLASS)["class"] == "untouched" for n in guards)


def test_comparison_of_floats_follows_its_input(classified):
    gm, _ = classified
    gt = next(n for n in gm.graph.nodes if meta.get(n, meta.OP_CLASS, {}).get("op") == "gt")
    assert meta.get(gt, meta.OP_CLASS)["class"] == "follow"


def test_exact_flag_marks_data_movement_only(classified):
    gm, _ = classified
    exact = {info["op"]: info["exact"] for n in gm.graph.nodes
             if (info := meta.get(n, meta.OP_CLASS)) is not None}
    assert exact["transpose"] is True and exact["slice"] is True and exact["index"] is True
    assert exact["gelu"] is False and exact["linear"] is False and exact["softmax"] is False


def test_every_class_carries_a_reason_naming_the_op(classified):
    gm, _ = classified
    for node in gm.graph.nodes:
        info = meta.get(node, meta.OP_CLASS)
        if node.op in ("placeholder", "get_attr", "output"):
            assert info is None
            continue
        assert info["reason"], node.format_node()
    reasons = {info["op"]: info["reason"] for n in gm.graph.nodes
               if (info := meta.get(n, meta.OP_CLASS)) is not None and info["class"] != "untouched"}
    assert "layer_norm" in reasons["layer_norm"] and "fp32" in reasons["layer_norm"]
    assert "tensor-core" in reasons["linear"]
    assert "dtype of its input" in reasons["zeros_like"]


def test_float64_reason(classified):
    gm, _ = classified
    exp = next(n for n in gm.graph.nodes if meta.get(n, meta.OP_CLASS, {}).get("op") == "exp")
    assert "float64" in meta.get(exp, meta.OP_CLASS)["reason"]


def test_explicit_dtype_factory_stays_untouched():
    class Net(nn.Module):
        def forward(self, x):
            return x * 2 + torch.ones_like(x, dtype=torch.float32)

    gm, _ = _classified(Net(), torch.randn(2, 3))
    info = next(meta.get(n, meta.OP_CLASS) for n in gm.graph.nodes
                if meta.get(n, meta.OP_CLASS, {}).get("op") == "ones_like")
    assert info["class"] == "untouched"


def test_classify_is_an_analysis_pass():
    torch.manual_seed(0)
    gm = capture(_Net().eval(), (torch.randn(4, 16), torch.randn(4, 16)), {}).graph_module
    before = graph_signature(gm)
    first = Classify()(gm)
    annotations = {n.name: dict(meta.get(n, meta.OP_CLASS) or {}) for n in gm.graph.nodes}
    second = Classify()(gm)
    assert first.modified is False and second.modified is False
    assert graph_signature(gm) == before
    assert {n.name: dict(meta.get(n, meta.OP_CLASS) or {}) for n in gm.graph.nodes} == annotations
    gm.graph.lint()
