"""rewriter.measure: the one timer and metrics module (CLI bench and tools/ use it)."""
import collections
import dataclasses
import math

import pytest
import torch

from rewriter import measure


def test_rel_l2_argument_order_is_reference_then_candidate():
    ref = torch.tensor([3.0, 4.0])           # norm 5
    cand = torch.tensor([3.0, 4.0 + 1.0])    # diff norm 1
    assert measure.rel_l2(ref, cand) == pytest.approx(1 / 5)
    # swapped, the denominator is the candidate's norm: a different number, so the order matters
    assert measure.rel_l2(cand, ref) == pytest.approx(1 / math.sqrt(9 + 25))


def test_compare_max_abs_and_identical_is_zero():
    x = torch.randn(4, 5)
    c = measure.compare(x, x.clone())
    assert c.rel_l2 == 0.0 and c.max_abs == 0.0 and c.reason is None and c.tensors == 1
    y = x.clone()
    y[1, 2] += 0.5
    assert measure.compare(x, y).max_abs == pytest.approx(0.5)


def test_low_precision_candidate_is_compared_in_float64():
    x = torch.randn(256)
    err = measure.rel_l2(x, x.half())
    assert 0 < err < 1e-3


def test_nested_outputs_are_pooled_over_every_float_tensor():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    ref = {"logits": a, "hidden": (b, torch.tensor([7]))}           # the int tensor is ignored
    cand = {"logits": a + torch.tensor([0.0, 1.0]), "hidden": (b, torch.tensor([9]))}
    # pooled: ||diff|| = 1, ||ref|| = sqrt(1 + 4)
    assert measure.rel_l2(ref, cand) == pytest.approx(1 / math.sqrt(5))


def test_model_output_and_dataclass_and_namedtuple():
    transformers = pytest.importorskip("transformers")
    out = transformers.modeling_outputs.BaseModelOutput(last_hidden_state=torch.ones(2, 3))
    out2 = transformers.modeling_outputs.BaseModelOutput(last_hidden_state=torch.ones(2, 3) * 1.5)
    assert measure.rel_l2(out, out2) == pytest.approx(0.5)

    @dataclasses.dataclass
    class Out:
        y: torch.Tensor

    assert measure.rel_l2(Out(torch.ones(3)), Out(torch.ones(3) * 2)) == pytest.approx(1.0)
    Pair = collections.namedtuple("Pair", "a b")
    assert measure.rel_l2(Pair(torch.ones(2), None), Pair(torch.ones(2), None)) == 0.0


def test_non_finite_gives_nan_with_a_reason():
    ref = torch.ones(4)
    bad = torch.tensor([1.0, float("inf"), 1.0, float("nan")])
    c = measure.compare(ref, bad)
    assert math.isnan(c.rel_l2) and math.isnan(c.max_abs)
    assert "candidate holds 2 non-finite" in c.reason
    c = measure.compare(bad, ref)
    assert math.isnan(c.rel_l2) and "reference holds 2 non-finite" in c.reason


def test_structure_and_shape_mismatch_give_nan_with_a_reason():
    c = measure.compare((torch.ones(2), torch.ones(2)), (torch.ones(2),))
    assert math.isnan(c.rel_l2) and "differ in structure" in c.reason
    c = measure.compare(torch.ones(2, 3), torch.ones(3, 2))
    assert math.isnan(c.rel_l2) and "shape" in c.reason
    c = measure.compare(torch.tensor([1, 2]), torch.tensor([1, 2]))
    assert math.isnan(c.rel_l2) and "no floating-point tensor" in c.reason


def test_zero_reference():
    assert measure.rel_l2(torch.zeros(3), torch.zeros(3)) == 0.0
    c = measure.compare(torch.zeros(3), torch.ones(3))
    assert c.rel_l2 == math.inf and "all zeros" in c.reason


def test_time_block_counts_calls_and_returns_ms():
    calls = []
    ms = measure.time_block(lambda: calls.append(1), "cpu", iters=7)
    assert len(calls) == 7 and ms >= 0.0


def test_round_robin_interleaves_variants_and_warms_up():
    order = []
    res = measure.round_robin([("a", lambda: order.append("a")), ("b", lambda: order.append("b"))],
                              device="cpu", warmup=2, repeats=3, iters=1)
    assert order == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert list(res) == ["a", "b"]
    for t in res.values():
        assert len(t.samples_ms) == 3 and t.iters == 1
        assert t.min_ms <= t.median_ms
        assert t.to_dict()["ms"] == t.median_ms


def test_round_robin_context_and_no_grad():
    seen = []

    class Ctx:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            seen.append(self.name)

        def __exit__(self, *a):
            return False

    grads = []
    measure.round_robin({"x": lambda: grads.append(torch.is_grad_enabled())}, device="cpu", warmup=0,
                        repeats=2, context=Ctx)
    assert seen == ["x", "x", "x"] and grads == [False, False]
    with pytest.raises(ValueError, match="distinct"):
        measure.round_robin([("a", lambda: 0), ("a", lambda: 0)], device="cpu")


def test_measure_single_and_peak_memory_on_cpu():
    t = measure.measure(lambda: torch.ones(8).sum(), device="cpu", warmup=1, repeats=4, iters=2)
    assert len(t.samples_ms) == 4 and t.iters == 2
    with measure.peak_memory("cpu") as mem:
        torch.ones(8)
    assert mem.bytes is None and "CUDA" in mem.reason
