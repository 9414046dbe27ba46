"""Adaptive precision under torch.compile (rewriter/runtime/adaptive_switch.py, adaptive_ops.py, rewriter/adaptive.py):
the adaptive ops are traced, steady-state steps make no graph break and one graph per step kind, a switch
compiles one new graph, the number of configurations is bounded. CPU, FP8 GEMMs emulated."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import rewriter
from rewriter.adaptive import AdaptivePrecision
from rewriter.adaptive_demo import B, D, H, Planted
from rewriter.errors import ConfigError
from rewriter.fp8_options import Fp8Options
from rewriter.runtime.adaptive_ops import SLOTS
from rewriter.runtime.fp8_ops import Fp8EmulationWarning

pytestmark = pytest.mark.filterwarnings(f"ignore::{Fp8EmulationWarning.__module__}.Fp8EmulationWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo(one_thread):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


class _Counting:
    """A dynamo backend that records every graph it is given and runs it with `inner`."""

    def __init__(self, inner: str = "aot_eager"):
        self.graphs: list[torch.fx.GraphModule] = []
        self.inner = inner

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        if self.inner == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)


def _planted(seed: int = 0):
    torch.manual_seed(seed)
    return rewriter.convert(Planted(), (torch.randn(B, D), torch.zeros(B, H)), precision="fp8", mode="train",
                            fp8=Fp8Options.always())


def _batches(n: int, spikes: dict | None = None):
    gen = torch.Generator().manual_seed(5)
    out = []
    for step in range(n):
        s = torch.zeros(B, H)
        if spikes and step in spikes:
            s[::8, 0] = spikes[step]
        out.append((torch.randn(B, D, generator=gen), s))
    return out


def _train(run, model, ctl, batches, before_step=None, lr=1e-2):
    """Steps of SGD on the mean square of the output; lr=0: the sum (grad_out = 1) and no update, so an
    outlier in the head's input stays in the head (the planted tests' way)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step, (x, s) in enumerate(batches):
        if before_step is not None:
            before_step(step)
        opt.zero_grad(set_to_none=True)
        out = run(x, s).float()
        loss = out.pow(2).mean() if lr else out.sum()
        loss.backward()
        opt.step()
        if ctl is not None:
            ctl.step()
        losses.append(float(loss))
    return losses


def _breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


def _calls(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_steady_state_makes_one_graph_per_step_kind_and_the_bare_step_is_static_fp8():
    gm = _planted()
    ctl = AdaptivePrecision(gm, observe_every=2, sample_every=4)
    counting = _Counting()
    _train(torch.compile(gm, backend=counting), gm, ctl, _batches(12))
    # step 0 observed, 1 bare, 4 sampled; then every step reuses one of the three
    assert len(counting.graphs) == 3 and _breaks() == 0
    for g in counting.graphs:  # the switch flags were specialised: no SymInt input, no symbolic shape
        values = [n.meta.get("example_value") for n in g.graph.nodes if n.op == "placeholder"]
        assert all(isinstance(v, torch.Tensor) for v in values), values
    observed, bare, sampled = counting.graphs
    static = _planted()
    static_counting = _Counting()
    _train(torch.compile(static, backend=static_counting), static, None, _batches(2))
    (static_graph,) = static_counting.graphs
    assert _calls(bare) == _calls(static_graph)  # an unobserved step compiles to exactly static FP8
    assert len(_calls(static_graph)) < len(_calls(observed)) < len(_calls(sampled))


def test_by_default_every_observed_step_is_sampled_so_a_configuration_costs_two_graphs():
    gm = _planted()
    ctl = AdaptivePrecision(gm, observe_every=3)  # sample_every=None: the SQNR and grad-norm check ride along
    judged = []
    judge = ctl.kind.judge
    ctl.kind.judge = lambda t, prev, row, *rest: (judged.append(list(row)), judge(t, prev, row, *rest))[1]
    counting = _Counting()
    _train(torch.compile(gm, backend=counting), gm, ctl, _batches(10))
    assert len(counting.graphs) == 2 and _breaks() == 0  # observed (and sampled) at 0, 3, 6, 9; bare between
    observed, bare = counting.graphs
    assert len(_calls(bare)) < len(_calls(observed))
    sqnr, gnorm = SLOTS.index("x_neg_sqnr"), SLOTS.index("gnorm_dev")
    assert judged and all(math.isfinite(row[sqnr]) and -row[sqnr] > 10 for row in judged)  # measured, in dB
    assert all(0 <= row[gnorm] < 0.1 for row in judged)  # healthy: FP8 grad_x norm near its bf16 reference


def test_a_switch_compiles_one_new_graph_and_none_after():
    gm = _planted()
    ctl = AdaptivePrecision(gm, sample_every=0, patience=100)
    counting = _Counting()
    run = torch.compile(gm, backend=counting)
    seen = []

    def before(step):
        seen.append(len(counting.graphs))
        if step == 3:
            ctl.set_precision("fc1", "bf16")
        if step == 6:
            ctl.set_precision("fc1", "fp8")  # back to a configuration compiled before: cached

    _train(run, gm, ctl, _batches(10), before, lr=0.0)
    assert seen == [0, 1, 1, 1, 2, 2, 2, 2, 2, 2] and len(counting.graphs) == 2 and _breaks() == 0
    # a switch decided by the controller: the outlier on step 10 moves the head (configuration 3 of 3)
    _train(run, gm, ctl, _batches(6, spikes={0: 1e6}), lr=0.0)
    assert len(counting.graphs) == 3 and _breaks() == 0
    timeline = ctl.timeline()
    auto = [e for e in timeline["events"] if e["reason"] != "set by hand"]
    assert [(e["step"], e["layer"], e["to"], e["new_configuration"]) for e in auto] == [(10, "head", "bf16", True)]
    assert [e["new_configuration"] for e in timeline["events"]] == [True, False, True]
    assert timeline["configurations"] == 3 and timeline["dynamo_graphs"] == 3


def test_adaptive_all_fp8_compiled_matches_static_fp8_and_eager_statistics():
    batches = _batches(6)
    static = _planted()
    want = _train(torch.compile(static, backend="aot_eager"), static, None, batches)
    gm = _planted()
    ctl = AdaptivePrecision(gm, sample_every=3)
    got = _train(torch.compile(gm, backend="aot_eager"), gm, ctl, batches)
    assert got == pytest.approx(want, rel=1e-6, abs=0)
    assert ctl.timeline()["events"] == []
    # the statistics of one sampled step: compiled (in the graph, probe gradients) == eager
    stats = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        m = _planted(seed=1)
        c = AdaptivePrecision(m)
        for sw in c._switches:
            sw.sample = 1
        run = torch.compile(m, backend="aot_eager") if compiled else m
        x, s = _batches(1, spikes={0: 30.0})[0]
        run(x, s).float().pow(2).mean().backward()
        stats[name] = torch.stack([sw.stats for sw in c._switches])
        assert all(sw.probe.grad is None for sw in c._switches)
    i = {k: SLOTS.index(k) for k in ("g_amax", "x_neg_sqnr", "g_neg_sqnr", "gnorm_dev", "flops")}
    assert (stats["eager"][:, i["g_amax"]] > 0).all() and (stats["eager"][:, i["gnorm_dev"]] > 0).all()
    assert torch.isfinite(stats["eager"][:, [i["x_neg_sqnr"], i["g_neg_sqnr"]]]).all()
    torch.testing.assert_close(stats["compiled"], stats["eager"], rtol=1e-5, atol=1e-7)


def test_the_configuration_bound_refuses_switches_and_records_why():
    gm = _planted()
    ctl = AdaptivePrecision(gm, sample_every=0, max_configurations=1)
    assert torch._dynamo.config.recompile_limit >= 4 * ctl.max_configurations
    counting = _Counting()
    _train(torch.compile(gm, backend=counting), gm, ctl, _batches(4, spikes={1: 1e6, 2: 1e6}), lr=0.0)
    timeline = ctl.timeline()
    assert timeline["events"] == [] and ctl.precisions()["head"] == "fp8"
    assert [(r["step"], r["layer"], r["to"]) for r in timeline["refused"]] == [(1, "head", "bf16"), (2, "head", "bf16")]
    assert "max_configurations=1" in timeline["refused"][0]["refused"]
    assert "flush to zero" in timeline["refused"][0]["reason"]
    assert len(counting.graphs) == 1
    with pytest.raises(ConfigError, match="max_configurations=1"):
        ctl.set_precision("fc1", "bf16")
    with pytest.raises(ConfigError, match="must be >= 1"):
        AdaptivePrecision(_planted(), min_steps_between_switches=0)


def test_switches_wait_for_min_steps_between_switches_and_go_together():
    gm = _planted()
    ctl = AdaptivePrecision(gm, sample_every=0, patience=2, min_steps_between_switches=5)
    _train(torch.compile(gm, backend="aot_eager"), gm, ctl, _batches(8, spikes={0: 1e6, 1: 1e6}), lr=0.0)
    events = ctl.timeline()["events"]
    # up at step 0; calm on steps 2 and 3 decides the way back at 3, held until step 0 + 5
    assert [(e["step"], e["layer"], e["to"]) for e in events] == [(0, "head", "bf16"), (5, "head", "fp8")]
    assert "decided at step 3, held by min_steps_between_switches" in events[1]["reason"]
    assert events[1]["configuration"] == 0 and not events[1]["new_configuration"]


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x, spike):
        return self.down(torch.relu(self.up(x)) + spike[:, :64])


def test_inductor_compiles_the_adaptive_model_without_graph_breaks():
    def build():
        torch.manual_seed(0)
        return rewriter.convert(_Tiny(), (torch.randn(16, 32), torch.zeros(16, H)), precision="fp8", mode="train",
                                fp8=Fp8Options.always())

    batches = [(torch.randn(16, 32, generator=torch.Generator().manual_seed(k)), torch.zeros(16, H))
               for k in range(3)]
    eager = build()
    eager_ctl = AdaptivePrecision(eager, sample_every=0)
    want = _train(eager, eager, None, batches)
    gm = build()
    ctl = AdaptivePrecision(gm, sample_every=0)
    counting = _Counting("inductor")
    got = _train(torch.compile(gm, backend=counting), gm, None, batches)
    assert len(counting.graphs) == 1 and _breaks() == 0
    # inductor's fused quantization rounds a few emulated-FP8 values differently from eager (as static FP8's)
    assert got == pytest.approx(want, rel=1e-2)
    got_stats = torch.stack([sw.stats for sw in ctl._switches])
    want_stats = torch.stack([sw.stats for sw in eager_ctl._switches])
    assert (want_stats[:, SLOTS.index("g_amax")] > 0).all()
    torch.testing.assert_close(got_stats, want_stats, rtol=2e-2, atol=1e-6)


def test_the_fp16_kind_compiles_without_graph_breaks_and_matches_eager():
    def build():
        torch.manual_seed(0)
        return rewriter.convert(Planted(), (torch.randn(B, D), torch.zeros(B, H)), precision="fp16", mode="train")

    batches = _batches(4)
    eager = build()
    eager_ctl = AdaptivePrecision(eager, sample_every=0)
    gm = build()
    ctl = AdaptivePrecision(gm, sample_every=0)
    counting = _Counting()
    run = torch.compile(gm, backend=counting)
    for runner in (eager, run):
        for x, s in batches[:2]:
            runner(x, s).float().sum().backward()
    assert len(counting.graphs) == 1 and _breaks() == 0
    torch.testing.assert_close(torch.stack([sw.stats for sw in ctl._switches]),
                               torch.stack([sw.stats for sw in eager_ctl._switches]), rtol=1e-6, atol=0)
    ctl.set_precision("head", "bf16")
    for x, s in batches[2:]:
        run(x, s).float().sum().backward()
    assert len(counting.graphs) == 2 and _breaks() == 0
