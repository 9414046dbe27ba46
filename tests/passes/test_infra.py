"""Pass contract and PassManager: honest `modified`, lint + recompile by the manager, errors that name
the failing pass and the passes that ran before it, analysis passes that may not edit the graph."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from rewriter.passes.infra import AnalysisPass, Pass, PassManager, PassResult, graph_signature
from rewriter.errors import ConfigError, PassError


class _Net(nn.Module):
    def forward(self, x):
        return torch.relu(x) + 1


def _gm() -> fx.GraphModule:
    return fx.symbolic_trace(_Net())


def _ops(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


class _Noop(Pass):
    name = "noop"

    def call(self, gm):
        return PassResult(gm, False)


class _ReluToSigmoid(Pass):
    """A real rewrite: modified only when it replaced something."""

    name = "relu_to_sigmoid"

    def call(self, gm):
        count = 0
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.relu:
                node.target = torch.sigmoid
                count += 1
        return PassResult(gm, count > 0)


class _EditingAnalysis(AnalysisPass):
    name = "sneaky_analysis"

    def call(self, gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            gm.graph.call_function(torch.neg, (out.args[0],))
        return PassResult(gm, False)


class _RelabelingAnalysis(AnalysisPass):
    name = "relabel"

    def call(self, gm):
        for node in gm.graph.nodes:
            node.meta["seen"] = True
        return PassResult(gm, True)  # even a claim of modification is overruled


class _Raises(Pass):
    name = "broken"

    def call(self, gm):
        raise ValueError("boom")


class _RaisesUserError(Pass):
    name = "strict"

    def call(self, gm):
        raise ConfigError("bad setting")


class _ReturnsNone(Pass):
    name = "returns_none"

    def call(self, gm):
        return None


class _ReturnsCopy(Pass):
    name = "returns_copy"

    def call(self, gm):
        return PassResult(fx.GraphModule(gm, gm.graph), False)


class _BreaksGraph(Pass):
    name = "dangling"

    def call(self, gm):
        relu = next(n for n in gm.graph.nodes if n.op == "call_function")
        relu.args = (fx.Node(fx.Graph(), "foreign", "placeholder", "foreign", (), {}),)
        return PassResult(gm, True)


def test_rewrite_pass_reports_modified_once_then_not():
    gm = _gm()
    first = _ReluToSigmoid()(gm)
    second = _ReluToSigmoid()(gm)
    assert first.modified is True and first.graph_module is gm
    assert second.modified is False
    gm.graph.lint()
    assert _ops(gm) == [torch.sigmoid, _ops(_gm())[1]]


def test_manager_recompiles_and_lints_after_a_modifying_pass():
    gm = _gm()
    x = torch.randn(3, 4)
    result = PassManager([_Noop(), _ReluToSigmoid()])(gm)
    assert result.modified is True and result.graph_module is gm
    torch.testing.assert_close(gm(x), torch.sigmoid(x) + 1, rtol=0, atol=0)  # recompiled code runs
    assert PassManager([_Noop(), _ReluToSigmoid()])(gm).modified is False


def test_manager_reports_each_pass_to_the_callback():
    seen = []
    PassManager([_Noop(), _ReluToSigmoid()], on_pass=lambda name, s, m: seen.append((name, m)))(_gm())
    assert seen == [("noop", False), ("relu_to_sigmoid", True)]


def test_analysis_pass_that_edits_the_graph_is_rejected():
    gm = _gm()
    with pytest.raises(PassError, match="analysis pass sneaky_analysis edited the graph"):
        _EditingAnalysis()(gm)


def test_analysis_pass_may_write_meta_and_never_reports_modified():
    gm = _gm()
    before = graph_signature(gm)
    result = _RelabelingAnalysis()(gm)
    assert result.modified is False
    assert graph_signature(gm) == before
    assert all(n.meta.get("seen") for n in gm.graph.nodes)


def test_failure_names_the_pass_and_what_ran_before():
    with pytest.raises(PassError) as info:
        PassManager([_Noop(), _ReluToSigmoid(), _Raises()])(_gm())
    message = str(info.value)
    assert "pass broken failed after [noop, relu_to_sigmoid]" in message
    assert "ValueError: boom" in message
    assert isinstance(info.value.__cause__, ValueError)


def test_user_errors_keep_their_type_and_gain_the_pass_name():
    with pytest.raises(ConfigError, match=r"bad setting \[in pass strict\]"):
        PassManager([_RaisesUserError()])(_gm())


def test_broken_graph_is_caught_by_the_managers_lint():
    with pytest.raises(PassError, match="pass dangling failed after \\[noop\\]"):
        PassManager([_Noop(), _BreaksGraph()])(_gm())


@pytest.mark.parametrize("bad, reason", [
    (_ReturnsNone, "returned NoneType, not PassResult"),
    (_ReturnsCopy, "works in place but returned another GraphModule"),
])
def test_contract_violations_are_named(bad, reason):
    with pytest.raises(TypeError, match=f"pass {bad.name} {reason}"):
        bad()(_gm())
    with pytest.raises(PassError, match=f"pass {bad.name} failed after \\[nothing\\]"):
        PassManager([bad()])(_gm())


def test_passes_can_be_imported_before_rewriter():
    # rewriter's init imports the pipeline, which imports the passes, which import rewriter.errors:
    # importing a pass first must not meet a half-initialised rewriter.passes.infra.
    root = Path(__file__).resolve().parents[2]
    for module in ("rewriter.passes.infra", "rewriter.passes.op_tables", "rewriter.passes.lower.fold_casts"):
        done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=root, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
