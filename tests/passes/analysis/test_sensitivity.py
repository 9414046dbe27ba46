"""Sensitivity: the accuracy-budget search keeps the fewest nodes fp32, finds a planted culprit among
hundreds of candidates within the stated number of forward runs, names it with its measured error
contribution, and leaves DECISION to assign."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rewriter.passes.analysis import Assign, Classify, Sensitivity
from rewriter.passes.analysis._calibration import as_batches
from rewriter.passes.analysis.sensitivity import _search, run_bound
from rewriter.passes.infra import PassManager, graph_signature
from rewriter import meta
from rewriter.capture import capture
from rewriter.config import ConvertConfig
from rewriter.errors import ConfigError


class Planted(nn.Module):
    """`blocks` residual MLP blocks (4 low-precision candidates each); block `plant` adds and removes
    2048, which in fp16 rounds its branch to multiples of 2 (catastrophic cancellation)."""

    def __init__(self, blocks: int = 50, dim: int = 8, plant: int = 31):
        super().__init__()
        self.up = nn.ModuleList(nn.Linear(dim, dim) for _ in range(blocks))
        self.down = nn.ModuleList(nn.Linear(dim, dim) for _ in range(blocks))
        self.plant = plant

    def forward(self, x):
        for i, (up, down) in enumerate(zip(self.up, self.down)):
            h = down(F.gelu(up(x))) * 0.5
            if i == self.plant:
                h = (h + 2048.0) - 2048.0
            x = x + h
        return x


def _searched(model, batches, held_out=None, **config):
    torch.manual_seed(0)
    gm = capture(model.eval(), batches[0], {}).graph_module
    cfg = ConvertConfig(precision="fp16", **config)
    sens = Sensitivity(as_batches(batches), cfg, held_out=held_out)
    PassManager([Classify()])(gm)
    before = graph_signature(gm)
    result = sens(gm)
    assert graph_signature(gm) == before and not result.modified
    assert not any(meta.DECISION in n.meta for n in gm.graph.nodes)  # assign's to write
    return gm, sens, cfg


def _kept(gm):
    return {n.name: n for n in gm.graph.nodes if (n.meta.get(meta.SENSITIVITY) or {}).get("keep")}


def test_planted_culprit_is_found_within_the_run_bound():
    torch.manual_seed(0)
    batches = [(torch.randn(8, 8),) for _ in range(3)]
    gm, sens, cfg = _searched(Planted(), batches[:2], held_out=batches[2:], tolerance=1e-2)
    summary = sens.summary
    assert summary["candidates"] >= 200
    assert summary["all_low_error"] > 10 * cfg.tolerance  # the plant breaks fp16 ...
    kept = _kept(gm)
    planted = [n for n in gm.graph.nodes if n.op == "call_function"
               and (meta.get(n, meta.OP_CLASS) or {}).get("op") == "add"
               and any(a == 2048.0 for a in n.args)]
    assert list(kept) == [planted[0].name]  # ... and the search finds it and nothing else
    n = summary["candidates"]
    assert summary["runs"] <= run_bound(n, 1) == 6 + 2 * math.ceil(math.log2(n))
    assert summary["runs"] <= 5 + math.ceil(math.log2(n))  # one culprit: one bisection
    record = planted[0].meta[meta.SENSITIVITY]
    assert record["keep"] == "float32" and record["measured"] and record["contribution"] > 0.1
    assert record["reason"].startswith("add in '<top level>' adds ") and "relative L2" in record["reason"]
    assert summary["error"] <= 0.8 * cfg.tolerance and summary["held_out_error"] <= cfg.tolerance
    # every other candidate has an estimate and stays low
    assert all(r["kept_fp32"] is False and r["error"] is not None for n in gm.graph.nodes
               if (r := n.meta.get(meta.SENSITIVITY)) and n is not planted[0])
    Assign(cfg)(gm)
    assert planted[0].meta[meta.DECISION]["rule"] == "analysis:sensitivity"
    assert planted[0].meta[meta.DECISION]["dtype"] == "float32"


def test_within_budget_means_two_runs_and_nothing_kept():
    torch.manual_seed(0)
    batches = [(torch.randn(8, 8),) for _ in range(2)]
    gm, sens, _ = _searched(Planted(blocks=4, plant=-1), batches, tolerance=5e-2)
    assert sens.summary["runs"] == 2 and sens.summary["kept"] == [] and _kept(gm) == {}


def test_a_user_metric_replaces_relative_l2():
    torch.manual_seed(0)
    batches = [(torch.randn(8, 8),) for _ in range(2)]
    seen = []

    def max_abs(reference, candidate):
        seen.append((type(reference), type(candidate)))
        return float((reference - candidate).abs().max())

    gm, sens, _ = _searched(Planted(blocks=4, plant=2), batches, tolerance=0.05, metric=max_abs)
    assert sens.summary["metric"] == "metric" and seen and seen[0] == (torch.Tensor, torch.Tensor)
    assert list(_kept(gm)) and sens.summary["error"] <= 0.04 < sens.summary["all_low_error"]


def test_sensitivity_needs_a_tolerance():
    with pytest.raises(ConfigError, match="tolerance"):
        Sensitivity([(torch.randn(2, 8),)], ConvertConfig(precision="fp16"))


def _synthetic(n, contributions, target, estimates=None, cap=None):
    """_search on errors that add in quadrature; returns (culprits, untested, runs)."""
    order = sorted(range(n), key=lambda i: (estimates or contributions)[i])
    runs = [0]

    def trial(kept, what):
        runs[0] += 1
        return math.sqrt(sum(contributions[i] ** 2 for i in range(n) if i not in kept))

    all_low = trial(frozenset(), "all low")
    culprits, rest, error, _ = _search(order, trial, target, all_low,
                                       lambda: cap is not None and runs[0] >= cap,
                                       None if estimates is None else dict(enumerate(estimates)))
    assert error <= target
    return sorted(culprits), rest, runs[0] + 2  # + reference and estimate runs


@pytest.mark.parametrize("n", [64, 300, 1000])
def test_search_runs_grow_logarithmically(n):
    rng = random.Random(n)
    small = [1e-4 * rng.random() for _ in range(n)]
    one = list(small)
    one[n // 3] = 1.0
    culprits, rest, runs = _synthetic(n, one, 1e-2)
    assert culprits == [n // 3] and rest == [] and runs <= run_bound(n, 1)
    # a misranked culprit (estimated in the middle of the pack) costs one run more
    estimates = [rng.random() for _ in range(n)]
    culprits, rest, runs = _synthetic(n, one, 1e-2, estimates)
    assert culprits == [n // 3] and rest == [] and runs <= run_bound(n, 1)
    # three culprits with uninformative estimates
    three = list(small)
    for i in (3, n // 2, n - 1):
        three[i] = 0.5
    culprits, rest, runs = _synthetic(n, three, 1e-2, [rng.random() * 1e-9 for _ in range(n)])
    assert culprits == [3, n // 2, n - 1] and rest == [] and runs <= run_bound(n, 3)


def test_search_cap_keeps_the_untested_rest():
    rng = random.Random(0)
    n = 200
    diffuse = [1e-3 * rng.random() for _ in range(n)]
    target = 0.5 * math.sqrt(sum(c * c for c in diffuse))
    culprits, rest, runs = _synthetic(n, diffuse, target, cap=run_bound(n, 2))
    assert runs <= run_bound(n, 2) + 3 and len(culprits) + len(rest) < n
