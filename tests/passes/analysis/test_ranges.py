"""Ranges: one fp32 calibration run records max |x|, smallest nonzero |x| and non-finite counts per
node; the producer whose output overflows (or flushes to zero) and the low-precision consumers that
would round such a value are kept, with the measured figures as the reason; assign follows them."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from rewriter.passes.analysis import Assign, Classify, Ranges
from rewriter.passes.analysis._calibration import as_batches
from rewriter.passes.analysis.ranges import _all_reduce
from rewriter.passes.infra import PassManager, graph_signature
from rewriter import meta
from rewriter.capture import capture
from rewriter.config import ConvertConfig
from rewriter.errors import ConfigError, InputError


class _Overflow(nn.Module):
    """up -> relu -> down, down's output reaching ~1e5; a norm brings it back."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        with torch.no_grad():
            self.down.weight.mul_(1e5)

    def forward(self, x):
        h = self.down(torch.relu(self.up(x)))
        return torch.nn.functional.layer_norm(h, (16,))


class _SumThenHead(nn.Module):
    """A long sum (fp32 by the op table) read by a linear whose own output is small."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            self.head.weight.mul_(1e-4)

    def forward(self, x):
        return self.head(x.sum(1))


class _Masked(nn.Module):
    """An attention-style additive mask of finfo(fp32).min: a sentinel, not an overflow."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)

    def forward(self, x, mask):
        scores = self.q(x) + (1.0 - mask) * torch.finfo(torch.float32).min
        return torch.softmax(scores, -1)


class _Tiny(nn.Module):
    """Values of ~1e-9 (below fp16's smallest subnormal) scaled back up after a linear."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x * 1e-9) * 1e9


def _measured(model, batches, **config):
    torch.manual_seed(0)
    first = batches[0]
    gm = capture(model.eval(), first if isinstance(first, tuple) else (), first if isinstance(first, dict)
                 else {}).graph_module
    cfg = ConvertConfig(**config)
    ranges = Ranges(as_batches(batches), cfg)
    before = graph_signature(gm)
    result = PassManager([Classify(), ranges, Assign(cfg)])(gm)
    assert graph_signature(gm) == before and not result.modified  # analysis only
    gm.graph.lint()
    return gm, ranges


def _node(gm, op=None, path=None):
    found = [n for n in gm.graph.nodes if (op is None or (meta.get(n, meta.OP_CLASS) or {}).get("op") == op)
             and (path is None or meta.module_path(n) == path)]
    assert found, (op, path)
    return found[0]


def _kept(gm) -> dict[str, str]:
    return {n.name: n.meta[meta.RANGE]["reason"] for n in gm.graph.nodes
            if (n.meta.get(meta.RANGE) or {}).get("keep")}


def test_overflowing_producer_is_kept_fp32_with_its_figures():
    torch.manual_seed(0)
    batches = [(torch.randn(4, 16),) for _ in range(3)]
    gm, ranges = _measured(_Overflow(), batches, precision="fp16")
    down = _node(gm, "linear", "down")
    record = down.meta[meta.RANGE]
    assert record["amax"] > 65504 and record["batches"] == 3 and record["nonfinite"] == 0
    assert record["keep"] == "float32"
    assert record["reason"].startswith("max |x| = ") and "> fp16 max 65504" in record["reason"]
    assert down.meta[meta.DECISION] == {**down.meta[meta.DECISION], "dtype": "float32",
                                         "rule": "analysis:range"}
    up = _node(gm, "linear", "up")
    assert "keep" not in up.meta[meta.RANGE] and up.meta[meta.DECISION]["dtype"] == "float16"
    assert set(_kept(gm)) == {down.name}  # layer_norm reads it in fp32 anyway: not named
    assert ranges.summary["kept"] == {down.name: record["reason"]}
    assert gm.meta[meta.CALIBRATION]["ranges"]["batches"] == 3


def test_low_precision_consumer_of_a_large_value_is_kept():
    torch.manual_seed(0)
    batches = [(torch.full((2, 4096, 8), 30.0) + torch.randn(2, 4096, 8),) for _ in range(2)]
    gm, _ = _measured(_SumThenHead(), batches, precision="fp16")
    total, head = _node(gm, "sum"), _node(gm, "linear", "head")
    assert total.meta[meta.RANGE]["amax"] > 65504
    assert head.meta[meta.RANGE]["amax"] < 100  # its own output fits ...
    reason = head.meta[meta.RANGE]["reason"]  # ... but it would round its input to inf
    assert reason.startswith(f"reads {total.name}") and "would round it to fp16" in reason
    assert head.meta[meta.DECISION]["dtype"] == "float32"


def test_mask_sentinels_are_not_overflow():
    torch.manual_seed(0)
    mask = torch.ones(2, 8)
    mask[:, 6:] = 0
    batches = [(torch.randn(2, 8), mask) for _ in range(2)]
    gm, _ = _measured(_Masked(), batches, precision="fp16")
    assert _kept(gm) == {}
    add = _node(gm, "add")
    assert add.meta[meta.RANGE]["sentinels"] == 2 * 2 * 2 and add.meta[meta.RANGE]["amax"] < 100


def test_values_that_flush_to_zero_are_kept():
    torch.manual_seed(0)
    batches = [(torch.randn(4, 8),) for _ in range(2)]
    gm, _ = _measured(_Tiny(), batches, precision="fp16")
    mul = _node(gm, "mul")
    record = mul.meta[meta.RANGE]
    assert record["min_nonzero"] < 3e-8 and record["flush_error"] > 0.5
    assert record["keep"] == "float32" and "flush to zero in fp16" in record["reason"]
    lin = _node(gm, "linear")  # reads the tiny values: kept too
    assert lin.meta[meta.RANGE]["keep"] == "float32" and lin.meta[meta.DECISION]["dtype"] == "float32"
    # bf16 has fp32's exponent range: nothing to keep
    gm16, _ = _measured(_Tiny(), batches, precision="bf16")
    assert _kept(gm16) == {}


def test_bf16_fallback_for_range_problems():
    torch.manual_seed(0)
    batches = [(torch.randn(4, 16),) for _ in range(2)]
    gm, _ = _measured(_Overflow(), batches, precision="fp16", allow_bf16_fallback=True)
    down = _node(gm, "linear", "down")
    assert down.meta[meta.RANGE]["keep"] == "bfloat16"
    assert down.meta[meta.DECISION]["dtype"] == "bfloat16"


def test_calibration_from_a_dataloader_with_labels_and_from_dicts():
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 16), torch.zeros(8, dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=4)  # yields [x, label]: label dropped
    gm, ranges = _measured(_Overflow(), [(torch.randn(4, 16),)], precision="fp16")
    Ranges(loader, ConvertConfig(precision="fp16"))(gm)
    assert _node(gm, "linear", "down").meta[meta.RANGE]["batches"] == 2
    mask = torch.ones(2, 8)
    batches = [{"x": torch.randn(2, 8), "mask": mask} for _ in range(3)]
    gm, _ = _measured(_Masked(), batches, precision="fp16")
    assert _node(gm, "linear").meta[meta.RANGE]["batches"] == 3


def test_bad_calibration_is_reported():
    gm, _ = _measured(_Overflow(), [(torch.randn(4, 16),)], precision="fp16")
    with pytest.raises(ConfigError, match="empty"):
        Ranges([], ConvertConfig())(gm)
    with pytest.raises(ConfigError, match="iterable of batches"):
        Ranges(torch.randn(4, 16), ConvertConfig())(gm)
    with pytest.raises(InputError, match="calibration batch 0 failed"):
        Ranges([(torch.randn(4, 7),)], ConvertConfig())(gm)


def _reduce_worker(rank: int, path: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    maxes = torch.tensor([[float(rank + 1), -float(10 - rank)]])
    sums = torch.tensor([[float(rank + 1)]])
    m, s = _all_reduce(maxes, sums)
    if rank == 0:
        torch.save((m, s), out)
    dist.destroy_process_group()


def test_statistics_reduce_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "reduced.pt")
    mp.spawn(_reduce_worker, args=(str(tmp_path / "store"), out), nprocs=2, join=True)
    m, s = torch.load(out)
    # amax: MAX; smallest nonzero is stored negated so MAX gives the minimum; counts: SUM
    assert m.tolist() == [[2.0, -9.0]] and s.tolist() == [[3.0]]
