"""What the tests share: one error metric with a fixed argument order, and one op-sequence check.

    from helpers import rel_l2, check_graph_nodes

    assert rel_l2(want, got) <= 2e-3                      # reference FIRST, candidate second
    check_graph_nodes(gm, sequence=[(aten.linear.default, "bfloat16"), aten.softmax.default],
                      counts={aten._to_copy.default: 2}, absent=[aten.gelu.default])

`rel_l2` is `rewriter.measure.rel_l2` (float64, over every floating tensor of nested outputs; nan when
either side is not finite, so a `<=` check fails), taking numpy arrays too (ONNX Runtime outputs).
`check_graph_nodes` follows pt2e's `checkGraphModuleNodes`: an ordered sequence the graph's
call_function nodes must contain (other nodes may sit between them), exact occurrence counts, and
targets that must not appear; a (target, dtype) pair also checks the node's recorded output dtype.
"""
from __future__ import annotations

import collections
from typing import Any, Iterable

import torch
import torch.fx as fx

from rewriter import measure, meta

__all__ = ["rel_l2", "node_ops", "op_counts", "check_graph_nodes", "cpu_scaled_mm"]


def _as_torch(value: Any) -> Any:
    if type(value).__module__ == "numpy" and hasattr(value, "dtype"):
        return torch.from_numpy(value.copy() if not value.flags.writeable else value)
    if isinstance(value, (tuple, list)):
        return type(value)(_as_torch(v) for v in value)
    if isinstance(value, dict):
        return {k: _as_torch(v) for k, v in value.items()}
    return value


def rel_l2(reference: Any, candidate: Any) -> float:
    """||candidate - reference|| / ||reference||, reference first (rewriter.measure.rel_l2)."""
    return measure.rel_l2(_as_torch(reference), _as_torch(candidate))


def _dtype_of(node: fx.Node) -> str | None:
    recorded = node.meta.get(meta.DTYPE)
    if recorded is not None:
        return str(recorded)
    val = node.meta.get("val")
    return meta.dtype_name(val.dtype) if isinstance(val, torch.Tensor) else None


def node_ops(gm: fx.GraphModule) -> list[tuple[Any, str | None]]:
    """(target, output dtype name or None) of every call_function node, in graph order."""
    return [(n.target, _dtype_of(n)) for n in gm.graph.nodes if n.op == "call_function"]


def _matches(op: tuple[Any, str | None], want: Any) -> bool:
    if isinstance(want, tuple):
        target, dtype = want
        return op[0] == target and op[1] == (meta.dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype)
    return op[0] == want


def check_graph_nodes(gm: fx.GraphModule, *, sequence: Iterable | None = None, counts: dict | None = None,
                      absent: Iterable = ()) -> None:
    """Assert the graph's call_function nodes contain `sequence` in order, occur `counts` times each,
    and include none of `absent`. Entries are targets or (target, dtype) pairs (dtype a torch.dtype or
    its name as recorded in node.meta). The message lists the graph's ops when a check fails."""
    ops = node_ops(gm)

    def listing() -> str:
        return "\n  ".join(f"{getattr(t, '__name__', t)} {d or ''}" for t, d in ops)

    if sequence is not None:
        wanted = list(sequence)
        i = 0
        for op in ops:
            if i < len(wanted) and _matches(op, wanted[i]):
                i += 1
        assert i == len(wanted), (f"expected op {wanted[i]!r} (#{i} of the sequence) after {wanted[:i]!r}; "
                                  f"the graph's ops:\n  {listing()}")
    for want, n in (counts or {}).items():
        got = sum(_matches(op, want) for op in ops)
        assert got == n, f"expected {n} x {want!r}, found {got}; the graph's ops:\n  {listing()}"
    for want in absent:
        assert not any(_matches(op, want) for op in ops), f"{want!r} should be gone; ops:\n  {listing()}"


def op_counts(gm: fx.GraphModule) -> collections.Counter:
    """call_function target -> count."""
    return collections.Counter(t for t, _ in node_ops(gm))


def cpu_scaled_mm(*pairs: tuple[torch.dtype, torch.dtype]) -> bool:
    """True when this torch build runs torch._scaled_mm on the CPU for each (mat1, mat2) float8 dtype
    pair: a capability probe made before the code under test runs (tests skip on a build without it,
    and any error the code under test raises fails the test)."""
    for a_dtype, b_dtype in pairs or ((torch.float8_e4m3fn, torch.float8_e4m3fn),):
        a = torch.ones(16, 32).to(a_dtype)
        b = torch.ones(16, 32).to(b_dtype).t()  # column-major mat2, as the FP8 ops pass it
        one = torch.tensor(1.0)
        try:
            torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        except (RuntimeError, NotImplementedError):
            return False
    return True
