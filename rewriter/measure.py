"""Timing and error metrics: the one place the CLI (`rewrite bench`) and tools/ measure with.

    >>> from rewriter import measure
    >>> err = measure.compare(model(x), converted(x))       # reference first, candidate second
    >>> err.rel_l2, err.max_abs, err.reason                 # reason says why a metric is nan
    >>> times = measure.round_robin([("fp32", f), ("fp16", g)], device=dev, warmup=3, repeats=20)
    >>> times["fp16"].median_ms

Timing: CUDA events around a block of calls on a GPU (the host's clock would count launch latency, not
kernels), `time.perf_counter` on the CPU. Several variants are timed round-robin (v1, v2, ..., v1, v2,
...), so a slow spell of the machine spreads over every variant instead of landing on one.

Errors: `rel_l2(reference, candidate)` in that fixed order, computed in float64 over every floating
tensor in the outputs (nested tuples, dicts, ModelOutputs, dataclasses, caches registered with pytree),
matched by their position in the structure. A metric that cannot be computed honestly (non-finite values,
different structures or shapes) is nan, and `compare(...).reason` says why.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

__all__ = ["Timing", "Comparison", "PeakMemory", "time_block", "measure", "round_robin", "compare", "rel_l2",
           "float_leaves", "peak_memory"]


# ---------------------------------------------------------------------------------------------- timing

@dataclasses.dataclass(frozen=True)
class Timing:
    """Milliseconds per call: the median over `samples_ms` (one sample = one block of `iters` calls)."""

    median_ms: float
    samples_ms: tuple[float, ...]
    iters: int

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    def to_dict(self) -> dict:
        return {"ms": self.median_ms, "min_ms": self.min_ms, "samples_ms": list(self.samples_ms),
                "iters": self.iters}


def _device_of(device: "torch.device | str | None") -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def time_block(fn: Callable[[], Any], device: "torch.device | str | None" = None, iters: int = 1) -> float:
    """Milliseconds per call of `fn`, timed over one block of `iters` calls.

    Args:
        fn: the call to time (no arguments; close over the inputs).
        device: where `fn` runs; cuda uses CUDA events and synchronizes, cpu uses perf_counter.
        iters: calls in the block (more calls per block hide launch and clock granularity).
    Returns:
        Milliseconds per call.
    """
    device = _device_of(device)
    iters = max(1, int(iters))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def _grad_context(no_grad: bool):
    return torch.no_grad() if no_grad else contextlib.nullcontext()


def measure(fn: Callable[[], Any], *, device: "torch.device | str | None" = None, warmup: int = 3,
            repeats: int = 10, iters: int = 1, no_grad: bool = True) -> Timing:
    """Time one call: `warmup` untimed calls, then `repeats` blocks of `iters` calls.

    Example:
        >>> measure(lambda: model(x), device="cpu", warmup=1, repeats=5).median_ms
    """
    return round_robin([("_", fn)], device=device, warmup=warmup, repeats=repeats, iters=iters,
                       no_grad=no_grad)["_"]


def round_robin(variants: "Sequence[tuple[str, Callable[[], Any]]] | Mapping[str, Callable[[], Any]]", *,
                device: "torch.device | str | None" = None, warmup: int = 3, repeats: int = 10, iters: int = 1,
                no_grad: bool = True, context: "Callable[[str], contextlib.AbstractContextManager] | None" = None,
                on_round: "Callable[[int], None] | None" = None) -> dict[str, Timing]:
    """Time several variants in rounds (v1, v2, ..., v1, v2, ...); each gets the median of its blocks.

    Args:
        variants: (name, fn) pairs or a name -> fn mapping; names must be distinct.
        device: where the variants run (see `time_block`).
        warmup: untimed calls of each variant before the first round.
        repeats: rounds; each round times one block of `iters` calls per variant.
        no_grad: run under torch.no_grad() (inference); False for training steps.
        context: name -> context manager entered around each of that variant's warmups and blocks
            (e.g. TF32 on for a "tf32" variant).
        on_round: called with the round index before each round (progress).
    Returns:
        name -> Timing, in the order given.
    """
    pairs = list(variants.items()) if isinstance(variants, Mapping) else list(variants)
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"round_robin: variant names must be distinct, got {names}")
    device = _device_of(device)

    def scope(name: str):
        return context(name) if context is not None else contextlib.nullcontext()

    samples: dict[str, list[float]] = {name: [] for name in names}
    with _grad_context(no_grad):
        for name, fn in pairs:
            with scope(name):
                for _ in range(max(0, int(warmup))):
                    fn()
        for i in range(max(1, int(repeats))):
            if on_round is not None:
                on_round(i)
            for name, fn in pairs:
                with scope(name):
                    samples[name].append(time_block(fn, device, iters))
    return {name: Timing(statistics.median(samples[name]), tuple(samples[name]), max(1, int(iters)))
            for name in names}


# ---------------------------------------------------------------------------------------------- memory

class PeakMemory:
    """Peak CUDA memory allocated inside a `with` block, above what was allocated when it started.

    `bytes` is None on the CPU (torch does not track host allocations), with `reason` saying so.

    Example:
        >>> with PeakMemory(device) as mem:
        ...     model(x)
        >>> mem.bytes
    """

    def __init__(self, device: "torch.device | str | None" = None):
        self.device = _device_of(device)
        self.bytes: int | None = None
        self.reason: str | None = None
        self._base = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self.reason = f"peak memory is tracked on CUDA devices only, not on {self.device.type}"


def peak_memory(device: "torch.device | str | None" = None) -> PeakMemory:
    """`with peak_memory(device) as mem: ...` then `mem.bytes` (see PeakMemory)."""
    return PeakMemory(device)


# ---------------------------------------------------------------------------------------------- errors

@dataclasses.dataclass(frozen=True)
class Comparison:
    """Errors of a candidate's outputs against a reference's; nan metrics come with a reason."""

    rel_l2: float
    max_abs: float
    reason: str | None = None
    tensors: int = 0

    def to_dict(self) -> dict:
        return {"rel_l2": self.rel_l2, "max_abs": self.max_abs, "reason": self.reason, "tensors": self.tensors}


def _is_leaf_container(value) -> bool:
    return isinstance(value, (str, bytes, int, float, bool, type(None), torch.dtype, torch.device))


def float_leaves(value, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for every floating-point tensor in a nested output, in structure order.

    Handles tensors, tuples/lists (and namedtuples), mappings (dicts, ModelOutput), dataclasses, and any
    type registered with torch.utils._pytree (e.g. transformers' caches).
    """
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            yield path or "output", value
        return
    if _is_leaf_container(value):
        return
    if isinstance(value, Mapping):
        for key in value:
            yield from float_leaves(value[key], f"{path}[{key!r}]")
        return
    if isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from float_leaves(item, f"{path}[{i}]")
        return
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from float_leaves(getattr(value, field.name), f"{path}.{field.name}")
        return
    import torch.utils._pytree as pytree

    leaves, _ = pytree.tree_flatten(value)
    if len(leaves) == 1 and leaves[0] is value:
        return  # an opaque object: nothing to compare
    for i, item in enumerate(leaves):
        yield from float_leaves(item, f"{path}<{type(value).__name__}>[{i}]")


def _nonfinite(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum())


def compare(reference, candidate) -> Comparison:
    """Relative L2 error and max abs error of `candidate` against `reference` (in that order).

    rel_l2 = ||candidate - reference|| / ||reference|| over all floating tensors, in float64 on the CPU.
    Returns nan metrics with a reason when the outputs differ in structure or shape, or when either
    side holds inf/nan (a finite error over non-finite values would hide the failure).

    Example:
        >>> compare(model(x), converted(x)).rel_l2
    """
    ref = list(float_leaves(reference))
    got = list(float_leaves(candidate))
    nan = float("nan")
    if not ref:
        return Comparison(nan, nan, "the reference output holds no floating-point tensor")
    if [p for p, _ in ref] != [p for p, _ in got]:
        missing = sorted({p for p, _ in ref} ^ {p for p, _ in got})
        return Comparison(nan, nan, f"the outputs differ in structure: the reference has {len(ref)} floating "
                          f"tensors, the candidate {len(got)} (first difference at {missing[0] if missing else '?'})")
    num = den = 0.0
    max_abs = 0.0
    for (path, r), (_, g) in zip(ref, got):
        if tuple(r.shape) != tuple(g.shape):
            return Comparison(nan, nan, f"{path}: shape {tuple(g.shape)} in the candidate, {tuple(r.shape)} in "
                              "the reference")
        r64 = r.detach().to("cpu", torch.complex128 if r.is_complex() else torch.float64)
        g64 = g.detach().to("cpu", torch.complex128 if g.is_complex() else torch.float64)
        bad_r, bad_g = _nonfinite(r64), _nonfinite(g64)
        if bad_r:
            return Comparison(nan, nan, f"{path}: the reference holds {bad_r} non-finite values of {r.numel()}",
                              len(ref))
        if bad_g:
            return Comparison(nan, nan, f"{path}: the candidate holds {bad_g} non-finite values of {g.numel()} "
                              "(overflow or nan in the converted model)", len(ref))
        diff = g64 - r64
        num += float(diff.abs().pow(2).sum())
        den += float(r64.abs().pow(2).sum())
        if diff.numel():
            max_abs = max(max_abs, float(diff.abs().max()))
    if den == 0.0:
        if num == 0.0:
            return Comparison(0.0, 0.0, None, len(ref))
        return Comparison(math.inf, max_abs, "the reference output is all zeros: relative error is unbounded",
                          len(ref))
    return Comparison(math.sqrt(num / den), max_abs, None, len(ref))


def rel_l2(reference, candidate) -> float:
    """||candidate - reference|| / ||reference|| (reference FIRST); nan when not comparable (see compare)."""
    return compare(reference, candidate).rel_l2
