"""Invariant hoisting in the eager fast forward (backends/invariants.py): exact for every input."""
import copy

import torch
import torch.nn as nn

import rewriter
from rewriter import meta


class _ShiftedMask(nn.Module):
    """A Swin-style mask built from the input's size on every call, plus a bias gathered from a table."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(15, 2))
        self.register_buffer("index", torch.randint(0, 15, (8, 8)), persistent=False)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        n = x.shape[-1]
        mask = x.new_zeros((n, n))
        mask[: n // 2, n // 2:] = 1.0
        mask[n // 2:, : n // 2] = 2.0
        mask = mask.masked_fill(mask != 0, -100.0)
        bias = self.table[self.index.view(-1)].view(8, 8, 2).permute(2, 0, 1).contiguous()
        scores = self.proj(x) @ x.transpose(-1, -2) + mask + bias.sum(0)
        return scores.softmax(-1)


def _standard(gm, *args):
    return type(gm)._rw_standard_forward(gm, *args)


def test_data_independent_regions_run_once_and_stay_exact():
    model = _ShiftedMask().eval()
    x = torch.randn(4, 8, 8)
    gm = rewriter.convert(model, (x,), precision="bf16")
    hoisted = gm.meta[meta.FAST_FORWARD]["hoisted"]
    assert hoisted["regions"] >= 2 and hoisted["ops"] >= 8, hoisted
    with torch.no_grad():
        for batch in (4, 1, 7):
            y = torch.randn(batch, 8, 8)
            assert torch.equal(gm(y), _standard(gm, y))


def test_weight_changes_are_seen():
    model = _ShiftedMask().eval()
    x = torch.randn(2, 8, 8)
    gm = rewriter.convert(model, (x,), precision="fp16")
    with torch.no_grad():
        before = gm(x)
        table = dict(gm.named_parameters()).get("table")
        table = table if table is not None else dict(gm.named_buffers())["table"]
        table.add_(1.0)                                   # in place: the version counter moves
        after = gm(x)
        assert not torch.equal(before, after)
        assert torch.equal(after, _standard(gm, x))
        gm.load_state_dict({k: v.clone() * 0 for k, v in gm.state_dict().items()}, strict=False)
        assert torch.equal(gm(x), _standard(gm, x))


def test_returned_and_random_values_are_not_hoisted():
    class Returns(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ self.w, self.w.t() * 2, torch.rand_like(self.w) + self.w.abs()

    gm = rewriter.convert(Returns().eval(), (torch.randn(2, 4),), precision="bf16")
    with torch.no_grad():
        _, doubled, noisy = gm(torch.randn(2, 4))
        doubled.zero_()                                    # a caller may modify what it gets back
        _, again, noisy2 = gm(torch.randn(2, 4))
    assert again.abs().sum() > 0
    assert not torch.equal(noisy, noisy2)


def test_training_graph_with_grad_is_not_cached():
    model = _ShiftedMask().train()
    x = torch.randn(2, 8, 8)
    gm = rewriter.convert(copy.deepcopy(model), (x,), precision="bf16", mode="train")
    for _ in range(2):  # a cached autograd graph would fail the second backward
        gm(x).float().sum().backward()
    assert gm.table.grad is not None
