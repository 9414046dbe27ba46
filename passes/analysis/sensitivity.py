"""Sensitivity: keep the fewest nodes in fp32 that bring the converted output within an error budget.

Trial runs are exact simulations of the converted model: the decisions `assign` would take with a
given set of nodes kept fp32 (autocast semantics, min-cut placement, overrides and range decisions all
included) are computed, and the fp32 graph is run by a torch.fx.Interpreter that executes each node
in its decided dtype (inputs cast as insert_casts would; on CPU the low-precision op is emulated by
rounding its inputs and output, which is what fp16/bf16 kernels with fp32 accumulation compute).

Search, for n candidate nodes (those that would run in low precision and whose precision changes a
value) and a budget B = tolerance * margin on the calibration batches:
  1. reference (fp32) and all-low runs; if the all-low error is within B, nothing is kept.     2 runs
  2. estimate of every candidate's contribution, to order them: its local error in low precision d_i
     (with the inputs that are low anyway rounded in the reference too, so each rounding counts once)
     carried to the output to first order, |c_i| = |J_i d_i|, as E_r[<J_i^T r, d_i>^2] over random
     projections r: one backward pass per projection gives it for every node.    1 run (+ backwards)
  3. bisection over the candidates sorted by estimate, least sensitive first: the longest prefix that
     can run in low precision with the rest in fp32 and the error within B.         ceil(log2 n) runs
     The first node past that prefix is a culprit; its measured contribution is the error step.
  4. release everything ranked above that culprit (a misranked culprit leaves them harmless). 1 run
  5. if that breaks the budget: the next culprit by galloping (release 1, 2, 4, ... more) and
     bisection, repeated until all is released.                      <= 2 ceil(log2 n) runs each
  Forward runs <= 6 + 2 k ceil(log2 n) for k culprits (`run_bound`): logarithmic in the number of
  candidates for a fixed number of culprits. A cap (default `run_bound(n, 2)`) bounds the diffuse
  case, where many nodes each add a little: what is left untested when it is spent stays fp32, and
  every state the search moves to was measured within B.

Before: 300 candidate nodes in fp16, output error 4.1e-01 > budget 1e-02
After:  add_37 kept fp32 ("adds 4.1e-01 to the output error"), 299 in fp16, error 1.2e-03

Writes node.meta[SENSITIVITY] = {"error", "kept_fp32", ...} on every candidate, with "keep": "float32"
and "reason" (module path, op, measured error contribution) on the nodes kept, and a summary with the
number of forward runs in gm.meta[CALIBRATION]["sensitivity"]. DECISION annotations written by the
trial assignments are removed again: `assign` decides from SENSITIVITY (after budget_lowering,
passes/analysis/lowering.py, has spent what is left of the budget on the policy's fp32 nodes).

Example:
    >>> Sensitivity(as_batches(batches), ConvertConfig(precision="fp16", tolerance=1e-2))(gm)
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from rewriter.passes.analysis._calibration import (CalibrationData, Progress, as_batches, flat_inputs,
                                          float_leaves, graph_device, quiet, rel_l2,
                                          structured_output)
from rewriter.passes.analysis.assign import Assign
from rewriter.passes.graph_utils import explicit_dtype, is_param
from rewriter.passes.infra import AnalysisPass, PassResult
from rewriter import meta
from rewriter.config import ConvertConfig
from rewriter.errors import ConfigError, InputError

__all__ = ["Sensitivity", "run_bound", "decided_dtypes"]

_F32 = torch.float32
_COMPUTE = ("call_function", "call_method", "call_module")
_SKIP = {getattr(torch.ops.aten, "_assert_tensor_metadata", None)} - {None}
_SKIP = {getattr(op, "default", op) for op in _SKIP}


def run_bound(candidates: int, culprits: int = 1) -> int:
    """Forward runs the search needs at most: 6 + 2 k ceil(log2 n) for n candidates, k culprits."""
    return 6 + 2 * max(1, culprits) * math.ceil(math.log2(max(2, candidates)))


def decided_dtypes(gm: fx.GraphModule, config: ConvertConfig) -> dict[fx.Node, torch.dtype]:
    """Run `assign` with the SENSITIVITY marks as they stand and return the dtype it decides per node."""
    Assign(config).call(gm)
    return {n: meta.dtype_from_name(n.meta[meta.DECISION]["dtype"]) for n in gm.graph.nodes if meta.DECISION in n.meta}


def _search(order: list, trial: Callable[[frozenset, str], float], target: float, all_low: float,
            spent: Callable[[], bool], estimates: dict | None = None) -> tuple[dict, list, float, str]:
    """Fewest nodes to keep, `order` least sensitive first; `trial(kept, what)` measures an error.

    Returns (culprits {node: measured contribution}, nodes kept untested, error of the returned
    state, why they are untested: "cap" when `spent()`, "slack" when `estimates` (relative L2
    contributions, which add in quadrature) say that even the smallest of them would not fit in
    what is left of the budget). Every state the search moves to was measured within `target`.
    """
    n = len(order)
    # phase 1: the longest prefix that can run low with everything after it fp32 (bisection)
    errs = {n: all_low}
    lo, hi = 0, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        errs[mid] = trial(frozenset(order[mid:]), "bisect")
        lo, hi = (mid, hi) if errs[mid] <= target else (lo, mid)
    if lo not in errs:
        errs[lo] = trial(frozenset(order[lo:]), "check")
    culprits = {order[lo]: errs[hi] - errs[lo]}
    remaining, current = list(order[lo + 1:]), errs[lo]
    if remaining and not spent():
        # phase 2: the nodes ranked above the culprit may be harmless (a misranked culprit)
        e = trial(frozenset(culprits), "release the rest")
        if e <= target:
            return culprits, [], e, ""
    # phase 3: each next culprit by galloping (1, 2, 4, ... released) then bisection
    while remaining:
        if estimates is not None:
            smallest = min(estimates.get(n, 0.0) for n in remaining)
            if smallest ** 2 > 4.0 * max(0.0, target ** 2 - current ** 2):
                return culprits, remaining, current, "slack"
        kept = frozenset(culprits)
        size = len(remaining)
        good, good_err, bad, bad_err = 0, current, None, math.inf
        while good < size:
            if spent():
                return culprits, remaining[good:], good_err, "cap"
            j = min(max(1, 2 * good), size)
            e = trial(kept | frozenset(remaining[j:]), "gallop")
            if e <= target:
                good, good_err = j, e
            else:
                bad, bad_err = j, e
                break
        if bad is None:
            return culprits, [], good_err, ""
        while bad - good > 1:
            if spent():
                return culprits, remaining[good:], good_err, "cap"
            mid = (good + bad) // 2
            e = trial(kept | frozenset(remaining[mid:]), "bisect")
            good, good_err, bad, bad_err = (mid, e, bad, bad_err) if e <= target else (good, good_err, mid, e)
        culprits[remaining[good]] = bad_err - good_err
        remaining, current = remaining[good + 1:], good_err
    return culprits, [], current, ""


def _cast(tree: Any, dtype: torch.dtype, round_only: bool) -> Any:
    """Cast every fp32/fp16/bf16 tensor of an argument tree to `dtype` (or round it there and back)."""
    def one(v):
        if isinstance(v, torch.Tensor) and meta.is_float_dtype(v.dtype) and v.dtype != dtype:
            if round_only:
                return v.to(dtype).to(v.dtype) if dtype != _F32 else v
            return v.to(dtype)
        return v
    return pytree.tree_map(one, tree)


def _round_out(value: Any, dtype: torch.dtype) -> Any:
    if dtype == _F32:
        return value
    return pytree.tree_map(lambda v: v.to(dtype).to(v.dtype) if isinstance(v, torch.Tensor)
                           and v.dtype == _F32 else v, value)


class _Simulator(torch.fx.Interpreter):
    """Runs the fp32 graph with every node computing in the dtype of `dtypes` (None: fp32 as captured).

    native: really compute in fp16/bf16 (GPU); else round inputs and outputs through the low dtype and
    compute in fp32 (CPU, where 16-bit kernels compute in fp32 internally and are slower).
    """

    def __init__(self, gm: fx.GraphModule, dtypes: dict[fx.Node, torch.dtype] | None, native: bool):
        super().__init__(gm, garbage_collect_values=True)
        self.dtypes = dtypes or {}
        self.native = native

    def run_node(self, n: fx.Node) -> Any:
        d = self.dtypes.get(n)
        if n.op not in _COMPUTE:
            return super().run_node(n)
        if n.target in _SKIP:
            return None
        if d is None:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        fn = getattr(self, n.op)
        if self.native:
            try:
                return fn(n.target, _cast(args, d, False), _cast(kwargs, d, False))
            except (RuntimeError, NotImplementedError):
                pass  # no 16-bit kernel on this device: emulate
        out = fn(n.target, _cast(args, d, True), _cast(kwargs, d, True))
        if explicit_dtype(n) is not None:
            return out
        return _round_out(out, d)


class _Estimator(torch.fx.Interpreter):
    """fp32 run with autograd that also computes each candidate's local low-precision error d_i.

    d_i = low(node)(rounded inputs) - node(inputs, with those already stored in low precision
    rounded): keeping node i in fp32 cannot undo the rounding of an input that a low-precision
    producer made, so that rounding is its producer's error, counted once.
    """

    def __init__(self, gm: fx.GraphModule, dtypes: dict[fx.Node, torch.dtype], candidates: set,
                 need_grad: bool = True):
        super().__init__(gm, garbage_collect_values=False)
        self.dtypes = dtypes
        self.candidates = candidates
        self.need_grad = need_grad
        self.local: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}
        self.broken: set[fx.Node] = set()  # low precision makes inf/NaN here (out of range)

    def run_node(self, n: fx.Node) -> Any:
        if n.op in _COMPUTE and n.target in _SKIP:
            return None
        out = super().run_node(n)
        if n.op == "get_attr" and self.need_grad and isinstance(out, torch.Tensor) \
                and out.is_floating_point() and not out.requires_grad:
            # buffers (rotary inv_freq) feed values the output depends on: track them too, or the
            # nodes computed from them alone (cos, sin) would get no estimate
            out = out.detach().requires_grad_(True)
        if n in self.candidates and isinstance(out, torch.Tensor) and out.is_floating_point() \
                and (out.requires_grad or not self.need_grad):
            d = self.dtypes[n]
            fn = getattr(self, n.op)
            args, kwargs = self.fetch_args_kwargs_from_env(n)

            def stored(a):
                v = self.env[a]
                if self.dtypes.get(a) == d and isinstance(v, torch.Tensor) and v.dtype == _F32:
                    return v.detach().to(d).to(_F32)
                return v.detach() if isinstance(v, torch.Tensor) else v
            with torch.no_grad():
                low = fn(n.target, _cast(args, d, True), _cast(kwargs, d, True))
                ref = fn(n.target, fx.node.map_arg(n.args, stored), fx.node.map_arg(n.kwargs, stored))
                if isinstance(low, torch.Tensor) and isinstance(ref, torch.Tensor) \
                        and low.shape == out.shape:
                    if explicit_dtype(n) is None:
                        low = _round_out(low, d)
                    delta = low.float() - ref.float()
                    if not bool(torch.isfinite(delta).all()):
                        self.broken.add(n)
                        delta = torch.nan_to_num(delta, nan=0.0, posinf=0.0, neginf=0.0)
                    self.local[n] = (out, delta)
        return out


class Sensitivity(AnalysisPass):
    """Accuracy-budget search for the nodes to keep in fp32 (see the module docstring).

    Args:
        calibration: batches used for the search (iterable of input tuples / dicts, or CalibrationData).
        config: conversion config; `config.tolerance` is the budget, `config.metric(reference,
            candidate) -> float` replaces the relative L2 error when given.
        held_out: optional batches not used for the search; the final error on them is reported.
        margin: the search aims at tolerance * margin on the calibration batches (default 0.8), so that
            batches it has not seen stay within the tolerance.
        max_runs: cap on the search's forward runs (default 4 + 8 * (1 + ceil(log2(n + 1)))).
        projections: random projections per batch for the contribution estimate (default 2).
        estimate_batches: calibration batches used for the estimate (default 4).
        native: run trial nodes in real fp16/bf16 (default: on CUDA only).
        progress: `progress(step, text)` callback.

    After the pass, `self.summary` (also gm.meta[CALIBRATION]["sensitivity"]) holds "runs",
    "bound", "candidates", "kept", "error", "held_out_error" and "seconds".
    """

    name = "sensitivity"

    def __init__(self, calibration: Any, config: ConvertConfig, *, held_out: Any = None,
                 margin: float = 0.8, max_runs: int | None = None, projections: int = 2,
                 estimate_batches: int = 4, native: bool | None = None,
                 progress: Progress | None = None):
        if config.tolerance is None:
            raise ConfigError("Sensitivity needs an error budget: set tolerance=1e-2 (relative L2 of "
                              "the outputs, or of config.metric)")
        self.calibration = calibration
        self.held_out = held_out
        self.config = config
        self.margin = float(margin)
        self.max_runs = max_runs
        self.projections = int(projections)
        self.estimate_batches = int(estimate_batches)
        self.native = native
        self.progress = progress or quiet
        self.summary: dict = {}

    # ------------------------------------------------------------------ measuring
    def _error(self, gm, refs, outs) -> float:
        errors = []
        for ref, out in zip(refs, outs):
            if self.config.metric is not None:
                try:
                    e = float(self.config.metric(structured_output(gm, ref), structured_output(gm, out)))
                except Exception as exc:
                    raise ConfigError(f"metric(reference, candidate) failed: {type(exc).__name__}: "
                                      f"{exc}; it must return a float for two model outputs") from exc
            else:
                e = rel_l2(float_leaves(ref), [v.float() for v in float_leaves(out)])
            errors.append(math.inf if math.isnan(e) else e)
        return max(errors)

    def _run(self, gm, flats, dtypes) -> list:
        sim = _Simulator(gm, dtypes, self._native)
        outs = []
        restore = self.config.keep_io_types and dtypes is not None and self._native
        with torch.no_grad():
            for i, flat in enumerate(flats):
                try:
                    out = sim.run(*flat, enable_io_processing=False)
                    if restore:  # outputs keep their fp32 dtype, as insert_casts makes them
                        out = pytree.tree_map(lambda v: v.float() if isinstance(v, torch.Tensor)
                                              and v.dtype in (torch.float16, torch.bfloat16) else v, out)
                    outs.append(out)
                except Exception as exc:
                    raise InputError(f"calibration batch {i} failed: {type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''}. Calibration "
                                     "batches must have the shapes the model was captured with") from exc
        return outs

    def _assign(self, gm, candidates, kept: frozenset) -> dict[fx.Node, torch.dtype]:
        """The dtypes `assign` would decide with `kept` forced to fp32."""
        for node in candidates:
            if node in kept:
                meta.put(node, meta.SENSITIVITY, {"keep": "float32", "reason": "trial"})
            else:
                node.meta.pop(meta.SENSITIVITY, None)
        return decided_dtypes(gm, self.config)

    # ------------------------------------------------------------------ the pass
    def call(self, gm: fx.GraphModule) -> PassResult:
        start = time.perf_counter()
        data: CalibrationData = as_batches(self.calibration)
        held = as_batches(self.held_out, what="held-out batches") if self.held_out is not None else None
        self._native = self.native if self.native is not None else graph_device(gm).type == "cuda"
        low = self.config.island_dtype
        budget = float(self.config.tolerance)
        target = budget * self.margin
        flats = [flat_inputs(gm, a, k, index=i) for i, (a, k) in enumerate(data.batches)]
        saved = {n: n.meta.pop(meta.SENSITIVITY) for n in gm.graph.nodes if meta.SENSITIVITY in n.meta}
        runs = 0
        tried: dict[frozenset, float] = {}

        refs = self._run(gm, flats, None)
        runs += 1
        self.progress("sensitivity", f"run {runs}: fp32 reference on {len(flats)} batches")

        base = self._assign(gm, [], frozenset())
        candidates = [n for n in gm.graph.nodes
                      if base.get(n) == low and n.op in _COMPUTE and self._changes_value(n)
                      and not n.meta[meta.DECISION]["rule"].startswith("override")]
        n_cand = len(candidates)
        cap = self.max_runs if self.max_runs is not None else run_bound(n_cand, 2)

        def trial(kept: frozenset, what: str) -> float:
            nonlocal runs
            if kept in tried:
                return tried[kept]
            err = self._error(gm, refs, self._run(gm, flats, self._assign(gm, candidates, kept)))
            runs += 1
            tried[kept] = err
            self.progress("sensitivity", f"run {runs}: {what}: {len(kept)} of {n_cand} kept fp32, "
                          f"error {err:.2e} (aim {target:.2e}, budget {budget:.2e})")
            return err

        culprits: dict[fx.Node, float] = {}   # node -> measured error contribution
        estimates: dict[fx.Node, float] = {}  # |c_i| / |y|: first-order contribution estimate
        rest: list[fx.Node] = []              # kept without an individual measurement
        why_rest = ""
        all_low = trial(frozenset(), "all candidates low") if candidates else 0.0
        final_kept: frozenset = frozenset()
        final_err = all_low
        if candidates and all_low > target:
            estimates = self._estimate(gm, flats, base, candidates)
            runs += 1
            self.progress("sensitivity", f"run {runs}: error contributions estimated for {n_cand} "
                          f"candidates ({self.projections} projections)")
            topo = {n: i for i, n in enumerate(gm.graph.nodes)}
            order = sorted(candidates, key=lambda n: (estimates.get(n, 0.0), -topo[n]))
            culprits, rest, final_err, why_rest = _search(
                order, trial, target, all_low, lambda: runs >= cap,
                estimates if self.config.metric is None else None)
            final_kept = frozenset(culprits) | frozenset(rest)

        held_err = None
        if held is not None:
            hflats = [flat_inputs(gm, a, k, index=i, what="held-out batch")
                      for i, (a, k) in enumerate(held.batches)]
            href = self._run(gm, hflats, None)
            held_err = self._error(gm, href, self._run(gm, hflats, self._assign(gm, candidates, final_kept)))
            self.progress("sensitivity", f"held-out: error {held_err:.2e} on {len(hflats)} batches not "
                          f"used for the search (budget {budget:.2e})"
                          + ("" if held_err <= budget else " -- OVER BUDGET"))

        # restore: DECISION is assign's to write; SENSITIVITY gets the final records
        for node in gm.graph.nodes:
            node.meta.pop(meta.DECISION, None)
            node.meta.pop(meta.SENSITIVITY, None)
        for node, record in saved.items():
            meta.put(node, meta.SENSITIVITY, record)
        metric = "metric" if self.config.metric is not None else "relative L2"
        for node in candidates:
            record = {"error": estimates.get(node), "kept_fp32": node in final_kept, "measured": False}
            if node in culprits:
                record.update(measured=True, contribution=culprits[node], keep="float32",
                              reason=f"{(meta.get(node, meta.OP_CLASS) or {}).get('op', node.name)} in "
                                     f"'{meta.module_path(node) or '<top level>'}' adds "
                                     f"{culprits[node]:.2e} to the output error ({metric}) in "
                                     f"{meta.dtype_name(low)}; kept fp32 to meet the budget "
                                     f"{budget:.1e}")
            elif node in rest:
                record.update(keep="float32",
                              reason=f"{(meta.get(node, meta.OP_CLASS) or {}).get('op', node.name)} in "
                                     f"'{meta.module_path(node) or '<top level>'}': estimated "
                                     f"contribution {estimates.get(node, 0.0):.2e}; kept fp32 "
                                     + (f"untested (search run cap {cap} reached)" if why_rest == "cap"
                                        else f"as the budget has no room left for it (error "
                                             f"{final_err:.2e} of {target:.2e})"))
            meta.put(node, meta.SENSITIVITY, record)
        seconds = time.perf_counter() - start
        self.summary = {
            "runs": runs, "bound": run_bound(n_cand, max(1, len(culprits))), "cap": cap,
            "batch_forwards": runs * len(flats), "batches": len(flats), "candidates": n_cand,
            "kept": [n.name for n in candidates if n in final_kept],
            "kept_paths": {n.name: meta.module_path(n) for n in candidates if n in final_kept},
            "all_low_error": all_low, "error": final_err, "held_out_error": held_err,
            "budget": budget, "target": target, "metric": metric, "seconds": round(seconds, 3),
        }
        gm.meta.setdefault(meta.CALIBRATION, {})["sensitivity"] = self.summary
        self.progress("sensitivity", f"{runs} forward runs ({runs * len(flats)} batch forwards) over "
                      f"{n_cand} candidates in {seconds:.1f}s: {len(final_kept)} kept fp32 "
                      f"[{', '.join(n.name for n in candidates if n in final_kept)}], error "
                      f"{final_err:.2e} (budget {budget:.2e})")
        return PassResult(gm, False)

    @staticmethod
    def _changes_value(node: fx.Node) -> bool:
        """Keeping the node fp32 can change a value: it computes, or it rounds a parameter."""
        info = meta.get(node, meta.OP_CLASS) or {}
        if not info.get("exact"):
            return True
        return any(is_param(i) for i in node.all_input_nodes)

    # ------------------------------------------------------------------ the estimate
    def _estimate(self, gm, flats, dtypes, candidates) -> dict[fx.Node, float]:
        """First-order error contribution |c_i| / |y| of each candidate, c_i = J_i d_i.

        d_i is the node's local error in low precision (`_Estimator`); |c_i|^2 = E_r[(r . c_i)^2] =
        E_r[<J_i^T r, d_i>^2] over random projections r: one backward pass per projection gives it
        for every node at once.
        """
        cand = set(candidates)
        own = dict.fromkeys(candidates, 0.0)
        broken: set[fx.Node] = set()
        norm2 = 0.0
        samples = 0
        gen = torch.Generator(device="cpu").manual_seed(0)
        try:
            for flat in flats[:max(1, self.estimate_batches)]:
                flat = [v.detach().requires_grad_(True) if isinstance(v, torch.Tensor)
                        and v.is_floating_point() else v for v in flat]
                est = _Estimator(gm, dtypes, cand)
                with torch.enable_grad():
                    out = est.run(*flat, enable_io_processing=False)
                    leaves = float_leaves(out)
                    broken |= est.broken
                    norm2 += sum(float((v.detach().double() ** 2).sum()) for v in leaves)
                    leaves = [v for v in leaves if v.requires_grad]
                    nodes = list(est.local)
                    xs = [est.local[n][0] for n in nodes]
                    if not leaves or not xs:
                        continue
                    for _ in range(self.projections):
                        rs = [torch.randn(v.shape, generator=gen).to(v.device, v.dtype) for v in leaves]
                        s = sum((r * v).sum() for r, v in zip(rs, leaves))
                        grads = torch.autograd.grad(s, xs, retain_graph=True, allow_unused=True)
                        for n, g in zip(nodes, grads):
                            if g is not None:
                                own[n] += float((g.detach() * est.local[n][1]).sum()) ** 2
                        samples += 1
                del est, out, leaves, xs
        except RuntimeError:
            # graphs autograd cannot differentiate (in-place ops of symbolic_trace graphs): order by
            # the local relative rounding error alone
            return self._local_estimate(gm, flats, dtypes, candidates)
        batches = min(len(flats), max(1, self.estimate_batches))
        scale = batches / max(1, samples) / norm2 if norm2 > 0 else 0.0
        return {n: math.inf if n in broken or not math.isfinite(v) else math.sqrt(v * scale)
                for n, v in own.items()}

    def _local_estimate(self, gm, flats, dtypes, candidates) -> dict[fx.Node, float]:
        cand = set(candidates)
        total = dict.fromkeys(candidates, 0.0)
        with torch.no_grad():
            for flat in flats[:max(1, self.estimate_batches)]:
                est = _Estimator(gm, dtypes, cand, need_grad=False)
                est.run(*flat, enable_io_processing=False)
                for n, (x, d) in est.local.items():
                    total[n] = max(total[n], float(d.norm() / x.detach().norm().clamp_min(1e-30)))
                for n in est.broken:
                    total[n] = math.inf
        return total
