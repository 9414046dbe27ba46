"""FoldCasts: remove casts that change no value (chains through a wider type, duplicates, no-op casts);
keep every cast that rounds."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from rewriter.passes.graph_utils import is_cast
from rewriter.passes.infra import PassManager
from rewriter.passes import FoldCasts
from rewriter.capture import capture

_TO_COPY = torch.ops.aten._to_copy.default
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


def _cast(graph: fx.Graph, value: fx.Node, dtype: torch.dtype) -> fx.Node:
    node = graph.call_function(_TO_COPY, (value,), {"dtype": dtype})
    node.meta["val"] = torch.empty(4, 8, dtype=dtype)
    return node


def _graph(src: torch.dtype, build) -> fx.GraphModule:
    """A graph with one placeholder x of dtype `src`; `build(graph, x)` returns the outputs."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(4, 8, dtype=src)
    graph.output(build(graph, x))
    gm = fx.GraphModule(nn.Module(), graph)
    gm.graph.lint()
    return gm


def _chain(src, *dtypes) -> fx.GraphModule:
    def build(graph, x):
        value = x
        for dtype in dtypes:
            value = _cast(graph, value, dtype)
        return value
    return _graph(src, build)


def _casts(gm) -> list[tuple[torch.dtype, torch.dtype | str]]:
    """(source dtype or 'cast', target dtype) of every cast, in order."""
    rows = []
    for node in gm.graph.nodes:
        if is_cast(node):
            src = node.args[0]
            rows.append(("cast" if is_cast(src) else src.meta["val"].dtype, node.kwargs["dtype"]))
    return rows


def _no_chains(gm) -> bool:
    return not any(is_cast(n) and is_cast(n.args[0]) for n in gm.graph.nodes)


def _fold(gm):
    """Fold twice; return the two results. Checks lint and the idempotence contract."""
    first = PassManager([FoldCasts()])(gm)
    gm.graph.lint()
    second = PassManager([FoldCasts()])(gm)
    assert second.modified is False
    return first


def _sample(dtype):
    torch.manual_seed(0)
    # values that fp16 and bf16 round differently, and some beyond fp16's range when the source is wide
    x = torch.randn(4, 8) * torch.logspace(-3, 3, 8)
    if dtype in (F32, F64):
        x[0, 0] = 70000.0
    return x.to(dtype)


def _run(gm, x):
    out = gm(x)
    return out if isinstance(out, (tuple, list)) else (out,)


def _assert_same_values(before, after):
    for a, b in zip(before, after, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("src, chain, left", [
    # widening then back to the source: the chain disappears
    (F16, (F32, F16), []),
    (BF16, (F32, BF16), []),
    (F16, (F32, F64, F16), []),
    # through a wider type to a third one: one direct cast (fp16 -> fp32 is exact)
    (F16, (F32, BF16), [(F16, BF16)]),
    (BF16, (F32, F16), [(BF16, F16)]),
    # a cast to the dtype the value already has
    (F32, (F32,), []),
])
def test_chains_that_change_no_value_are_folded(src, chain, left):
    gm = _chain(src, *chain)
    x = _sample(src)
    before = _run(gm, x)
    assert _fold(gm).modified is True
    assert _casts(gm) == left
    assert _no_chains(gm)
    _assert_same_values(before, _run(gm, x))


@pytest.mark.parametrize("src, chain", [
    (F32, (F16, F32)),    # rounds to fp16 (and 70000 overflows to inf): must stay
    (F32, (BF16, F32)),
    (F16, (BF16, F16)),   # fp16 and bf16 do not hold each other
    (F32, (F16, BF16)),
])
def test_value_changing_chains_are_kept(src, chain):
    gm = _chain(src, *chain)
    x = _sample(src)
    before = _run(gm, x)
    assert PassManager([FoldCasts()])(gm).modified is False
    assert len(_casts(gm)) == len(chain)
    _assert_same_values(before, _run(gm, x))


def test_duplicate_casts_become_one():
    def build(graph, x):
        a, b = _cast(graph, x, F16), _cast(graph, x, F16)
        return (graph.call_function(torch.add, (a, b)),)

    gm = _graph(F32, build)
    x = _sample(F32)
    before = _run(gm, x)
    assert _fold(gm).modified is True
    assert _casts(gm) == [(F32, F16)]
    add = next(n for n in gm.graph.nodes if n.target is torch.add)
    assert add.args[0] is add.args[1]
    _assert_same_values(before, _run(gm, x))


def test_shared_inner_cast_stays_for_its_other_reader():
    def build(graph, x):
        wide = _cast(graph, x, F32)
        back = _cast(graph, wide, F16)
        return (graph.call_function(torch.exp, (wide,)), back)

    gm = _graph(F16, build)
    x = _sample(F16)
    before = _run(gm, x)
    assert _fold(gm).modified is True
    assert _casts(gm) == [(F16, F32)]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert output.args[0][1].op == "placeholder"  # fp16 -> fp32 -> fp16 is x itself
    _assert_same_values(before, _run(gm, x))


def test_user_written_rounding_in_a_captured_model_is_kept():
    class Net(nn.Module):
        def forward(self, x, y):
            return x.half().float() * 2, y.float().half() + 1   # the first rounds, the second does not

    x, y = torch.randn(4, 8) * 1e3, torch.randn(4, 8).half()
    gm = capture(Net(), (x, y), {}).graph_module
    before = gm(x, y)
    assert _fold(gm).modified is True
    assert _casts(gm) == [(F32, F16), ("cast", F32)]
    _assert_same_values(before, gm(x, y))
    assert not torch.equal(gm(x, y)[0], x * 2)  # x was rounded, as written
