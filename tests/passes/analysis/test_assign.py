"""Assign: the dtype autocast would use per node, overrides with one precedence, casts placed by a
min-cut on the smaller tensor, a recorded rule and reason for every decision, no graph edits."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rewriter.passes.analysis import Assign, Classify
from rewriter.passes.graph_utils import is_cast
from rewriter.passes.infra import PassManager, graph_signature
from rewriter.passes import InsertCasts
from rewriter import meta
from rewriter.capture import capture
from rewriter.config import ConvertConfig

F16, BF16, F32 = "float16", "bfloat16", "float32"


def _assigned(model, *inputs, **config):
    torch.manual_seed(0)
    gm = capture(model.eval(), inputs, {}).graph_module
    cfg = ConvertConfig(**config)
    PassManager([Classify(), Assign(cfg)])(gm)
    return gm, cfg


def _decisions(gm) -> list[tuple[str, str, str]]:
    """(op, dtype, rule) of every decided node, in graph order."""
    rows = []
    for node in gm.graph.nodes:
        decision = meta.get(node, meta.DECISION)
        if decision is not None:
            rows.append((meta.get(node, meta.OP_CLASS)["op"], decision["dtype"], decision["rule"]))
    return rows


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


class _Residual(nn.Module):
    """Pre-norm residual block: autocast keeps the residual stream fp32 (add promotes)."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        h = self.down(F.gelu(self.up(self.ln(x))))
        y = x + h
        return torch.softmax(y, -1), torch.exp(y).sum(-1)


@pytest.mark.parametrize("precision, low", [("fp16", F16), ("bf16", BF16)])
def test_autocast_dtypes(precision, low):
    gm, _ = _assigned(_Residual(), torch.randn(4, 16), precision=precision)
    assert _decisions(gm) == [
        ("layer_norm", F32, "op-table"),
        ("linear", low, "op-table"),
        ("gelu", low, "follow"),
        ("linear", low, "op-table"),
        ("add", F32, "promote"),        # fp32 residual + low branch -> fp32, as under autocast
        ("softmax", F32, "op-table"),
        ("exp", F32, "op-table"),
        ("sum", F32, "op-table"),
    ]


def test_reasons_explain_follow_and_promote():
    gm, _ = _assigned(_Residual(), torch.randn(4, 16))
    gelu = meta.get(_node(gm, "gelu"), meta.DECISION)
    assert "follows its input linear" in gelu["reason"] and "float16" in gelu["reason"]
    add = next(meta.get(n, meta.DECISION) for n in gm.graph.nodes
               if meta.get(n, meta.OP_CLASS, {}).get("op") == "add")
    assert "widest" in add["reason"] and "x:float32" in add["reason"]


def test_assign_is_an_analysis_pass():
    torch.manual_seed(0)
    gm = capture(_Residual().eval(), (torch.randn(4, 16),), {}).graph_module
    Classify()(gm)
    before = graph_signature(gm)
    cfg = ConvertConfig()
    first, second = Assign(cfg)(gm), Assign(cfg)(gm)
    assert first.modified is False and second.modified is False
    assert graph_signature(gm) == before
    gm.graph.lint()


# ------------------------------------------------------------------ overrides

class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)

    def forward(self, x):
        return self.ln(self.fc(x))


class _Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(3))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return torch.softmax(self.head(x), -1)


def _by_module(gm) -> dict[str, tuple[str, str]]:
    return {meta.module_path(n): (meta.get(n, meta.DECISION)["dtype"], meta.get(n, meta.DECISION)["rule"])
            for n in gm.graph.nodes
            if meta.get(n, meta.DECISION) is not None and meta.module_path(n)}


def test_override_by_op_type():
    gm, _ = _assigned(_Deep(), torch.randn(4, 8), overrides={"softmax": "fp16", "linear": "fp32"})
    decisions = _by_module(gm)
    assert decisions["head"] == (F32, "override:op")
    assert decisions["blocks.0.fc"] == (F32, "override:op")
    assert decisions["blocks.0.ln"] == (F32, "op-table")
    softmax = next(n for n in gm.graph.nodes if meta.get(n, meta.OP_CLASS, {}).get("op") == "softmax")
    assert meta.get(softmax, meta.DECISION)["dtype"] == F16
    assert meta.get(softmax, meta.DECISION)["rule"] == "override:op"
    assert meta.get(softmax, meta.DECISION)["reason"] == "user override softmax=fp16 on op softmax"


def test_override_by_module_regex():
    gm, _ = _assigned(_Deep(), torch.randn(4, 8), overrides={"re:blocks\\.[12]\\..*": "fp32"})
    decisions = _by_module(gm)
    assert decisions["blocks.0.fc"] == (F16, "op-table")
    assert decisions["blocks.1.fc"] == (F32, "override:regex")
    assert decisions["blocks.2.fc"] == (F32, "override:regex")
    assert decisions["head"] == (F16, "op-table")


def test_override_by_exact_module_path_covers_the_module_and_below():
    gm, _ = _assigned(_Deep(), torch.randn(4, 8), overrides={"blocks.1": "fp32", "head": "bf16"})
    decisions = _by_module(gm)
    assert decisions["blocks.1.fc"] == (F32, "override:module")
    assert decisions["blocks.1.ln"] == (F32, "override:module")
    assert decisions["blocks.0.fc"] == (F16, "op-table")
    assert decisions["head"] == (BF16, "override:module")


def test_override_precedence_exact_path_beats_regex_beats_op():
    overrides = {
        "linear": "fp32",                    # op type: every linear ...
        "re:blocks\\.[01]\\..*": "bf16",     # ... but a regex beats it in blocks 0 and 1 ...
        "blocks.1.fc": "fp16",               # ... and an exact path beats the regex.
    }
    for ordering in (overrides, dict(reversed(list(overrides.items())))):  # order of keys is irrelevant
        gm, _ = _assigned(_Deep(), torch.randn(4, 8), overrides=ordering)
        decisions = _by_module(gm)
        assert decisions["blocks.0.fc"] == (BF16, "override:regex")
        assert decisions["blocks.0.ln"] == (BF16, "override:regex")
        assert decisions["blocks.1.fc"] == (F16, "override:module")
        assert decisions["blocks.2.fc"] == (F32, "override:op")
        assert decisions["blocks.2.ln"] == (F32, "op-table")
        assert decisions["head"] == (F32, "override:op")
        reason = next(meta.get(n, meta.DECISION)["reason"] for n in gm.graph.nodes
                      if meta.module_path(n) == "blocks.1.fc" and meta.get(n, meta.DECISION))
        assert reason == "user override blocks.1.fc=fp16 on module 'blocks.1.fc'"


# ------------------------------------------------------------------ placement (min-cut)

class _FirstToken(nn.Module):
    """fp32 layer_norm over [B, S, H] -> first token [B, H] -> fp16 linear: cast the [B, H] slice."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc(self.ln(x)[:, 0])


class _Broadcast(nn.Module):
    """fp32 layer_norm over [B, H] -> expand to [B, S, H] -> fp16 linear: cast before the expand."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc(self.ln(x).unsqueeze(1).expand(-1, 16, -1))


def _activation_casts(gm, dtype):
    """Casts of computed values (weights are cast too until cast_weights stores them 16-bit)."""
    return [n for n in gm.graph.nodes if is_cast(n) and n.kwargs["dtype"] == dtype
            and n.args[0].op != "get_attr"]


def test_min_cut_casts_the_selected_token_not_the_sequence():
    gm, cfg = _assigned(_FirstToken(), torch.randn(4, 16, 32))
    assert _decisions(gm) == [("layer_norm", F32, "op-table"), ("slice", F32, "min-cut"),
                              ("select", F32, "min-cut"), ("linear", F16, "op-table")]
    InsertCasts(cfg)(gm)
    down = _activation_casts(gm, torch.float16)
    assert len(down) == 1
    assert meta.get(down[0].args[0], meta.OP_CLASS)["op"] == "select"
    assert meta.numel_hint(down[0]) == 4 * 32          # [B, H], not [B, S, H]


def test_min_cut_moves_the_cast_before_a_broadcast():
    gm, cfg = _assigned(_Broadcast(), torch.randn(4, 32))
    assert _decisions(gm) == [("layer_norm", F32, "op-table"), ("unsqueeze", F16, "min-cut"),
                              ("expand", F16, "min-cut"), ("linear", F16, "op-table")]
    expand = next(n for n in gm.graph.nodes if meta.get(n, meta.OP_CLASS, {}).get("op") == "expand")
    assert "so the cast sits on the smaller tensor" in meta.get(expand, meta.DECISION)["reason"]
    InsertCasts(cfg)(gm)
    down = _activation_casts(gm, torch.float16)
    assert len(down) == 1
    assert meta.get(down[0].args[0], meta.OP_CLASS)["op"] == "layer_norm"
    assert meta.numel_hint(down[0]) == 4 * 32          # [B, H], not [B, S, H]


def test_min_cut_never_rounds_a_value_an_fp32_op_reads():
    class Net(_Broadcast):
        def forward(self, x):
            h = self.ln(x)
            wide = h.unsqueeze(1).expand(-1, 16, -1)
            return self.fc(wide), torch.softmax(wide, -1)   # softmax needs the fp32 expand

    gm, cfg = _assigned(Net(), torch.randn(4, 32))
    rows = dict((op, (dtype, rule)) for op, dtype, rule in _decisions(gm))
    assert rows["expand"] == (F32, "min-cut") and rows["unsqueeze"] == (F32, "min-cut")
    assert rows["softmax"] == (F32, "op-table")
    InsertCasts(cfg)(gm)
    down = _activation_casts(gm, torch.float16)
    assert [meta.get(c.args[0], meta.OP_CLASS)["op"] for c in down] == ["expand"]
    softmax = next(n for n in gm.graph.nodes if meta.get(n, meta.OP_CLASS, {}).get("op") == "softmax")
    assert meta.get(softmax.args[0], meta.OP_CLASS)["op"] == "expand"   # reads the fp32 value directly


def test_data_movement_after_a_low_precision_op_stays_low():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 32)
            self.ln = nn.LayerNorm(32)

        def forward(self, x):
            return self.ln(torch.relu(self.fc(x))[:, 0])

    gm, _ = _assigned(Net(), torch.randn(4, 16, 32))
    assert _decisions(gm) == [("linear", F16, "op-table"), ("relu", F16, "min-cut"),
                              ("slice", F16, "min-cut"), ("select", F16, "min-cut"),
                              ("layer_norm", F32, "op-table")]
