"""Ranges: measure every value on calibration data in fp32 and keep out of fp16 what does not fit.

One fp32 run of the captured graph (a torch.fx.Interpreter) over the calibration batches records per
node: max |x| (amax), the smallest nonzero |x|, the number of non-finite values and how much of the
tensor would flush to zero in the target format. Statistics are reduced across ranks with
torch.distributed all_reduce (MAX, and SUM for counts) when a process group is initialised, so every
rank takes the same decisions.

Which node is kept, and why it is that one:
  * the producer whose output overflows (amax > max of the format / margin) or flushes to zero: it must
    compute in fp32, since rounding its result is what makes the inf or the zeros;
  * a consumer that would round such a value down on its way in: a low-precision op (linear, matmul,
    conv), or an op that would not take the value's precision under autocast semantics (a follow op
    reading it as a second input, a promote op reading it as a 0-dim scalar). Follow and promote
    consumers that do read it in fp32 are left to `assign`, which gives them fp32 by autocast rules.
Values of magnitude >= 1.7e38 are masking sentinels (`torch.finfo(torch.float32).min` in attention
masks): they become -inf in fp16, which is what they stand for, so they do not count as overflow.

Before: x -> wi(fp16) -> relu -> wo(fp16: max |x| = 1.3e+05 -> inf) -> add -> rms_norm(fp32)
After:  x -> wi(fp16) -> relu -> wo(fp32, "max |x| = 1.3e+05 > fp16 max 65504") -> add(fp32) -> ...

Writes node.meta[RANGE] = {"amax", "min_nonzero", "nonfinite", "flushed", "flush_error", "sentinels",
"batches", "target"} on every floating node, plus "keep" (a dtype name) and "reason" on kept nodes,
and a summary in gm.meta[CALIBRATION]["ranges"].

Example:
    >>> Ranges(as_batches([(x1,), (x2,)]), ConvertConfig(precision="fp16"))(gm)
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.fx as fx

from rewriter.passes.analysis._calibration import (CalibrationData, Progress, as_batches, flat_inputs,
                                          quiet)
from rewriter.passes.graph_utils import float_inputs, is_tuple_getitem
from rewriter.passes.infra import AnalysisPass, PassResult
from rewriter.passes.op_tables import op_name
from rewriter import meta
from rewriter.config import ConvertConfig, Precision
from rewriter.errors import InputError

__all__ = ["Ranges"]

_SENTINEL = 0.5 * torch.finfo(torch.float32).max  # finfo(fp32).min / max used as -inf / +inf
# Per node, two vectors: max-reduced [amax, amax of data (no sentinels), -min_nonzero, flush error,
# attention-logit amax] and sum-reduced [non-finite, nonzero, flushed, sentinels, elements].
_N_SUM = 5


class _Recorder(torch.fx.Interpreter):
    """fp32 Interpreter that keeps running statistics of every floating value it produces."""

    def __init__(self, gm: fx.GraphModule, low: torch.dtype):
        super().__init__(gm, garbage_collect_values=True)
        finfo = torch.finfo(low)
        # values below half the smallest subnormal round to zero
        self.flush_below = float(finfo.smallest_normal) * float(finfo.eps) / 2
        self.maxes: dict[fx.Node, torch.Tensor] = {}
        self.sums: dict[fx.Node, torch.Tensor] = {}
        self.seen_attrs: set[fx.Node] = set()

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.op == "get_attr":
            if n in self.seen_attrs:  # constants: once is enough
                return value
            self.seen_attrs.add(n)
        if n.op in ("output",):
            return value
        tensors = [v for v in (value if isinstance(value, (tuple, list)) else (value,))
                   if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()]
        for t in tensors:
            self._observe(n, t)
        if n.op == "call_function" and op_name(n) == "scaled_dot_product_attention" and tensors:
            self._observe_logits(n)
        return value

    def _accumulate(self, n: fx.Node, maxes: torch.Tensor, sums: torch.Tensor) -> None:
        if n in self.maxes:
            self.maxes[n] = torch.maximum(self.maxes[n], maxes)
            self.sums[n] = self.sums[n] + sums
        else:
            self.maxes[n], self.sums[n] = maxes, sums

    def _observe(self, n: fx.Node, t: torch.Tensor) -> None:
        a = t.detach().abs().float()
        finite = torch.isfinite(a)
        nonfinite = (~finite).sum()
        a = torch.where(finite, a, 0.0)
        sentinel = a >= _SENTINEL
        data = torch.where(sentinel, 0.0, a)
        amax, amax_data = a.amax(), data.amax()
        nonzero = data > 0
        min_nz = torch.where(nonzero, data, math.inf).amin()
        flushed = nonzero & (data < self.flush_below)
        # relative L2 error that flushing alone causes; scaled by amax so squares cannot overflow
        scaled = data / amax_data.clamp_min(1e-38)
        energy = (scaled * scaled).sum()
        lost = (scaled * scaled * flushed).sum()
        flush_error = torch.where(energy > 0, (lost / energy.clamp_min(1e-38)).sqrt(), 0.0)
        zero = torch.zeros((), device=a.device)
        maxes = torch.stack([amax, amax_data, -min_nz, flush_error, zero])
        sums = torch.stack([nonfinite.float(), nonzero.sum().float(), flushed.sum().float(),
                            sentinel.sum().float(), torch.tensor(float(a.numel()), device=a.device)])
        self._accumulate(n, maxes, sums)

    def _observe_logits(self, n: fx.Node) -> None:
        """max |q k^T * scale|: what a low-precision attention computes before its softmax."""
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        q, k = args[0], args[1]
        if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)):
            return
        scale = kwargs.get("scale", args[6] if len(args) > 6 else None)
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        try:
            if q.dim() == 4 and k.dim() == 4 and q.shape[1] != k.shape[1] and q.shape[1] % k.shape[1] == 0:
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query attention
            logits = (q.float() @ k.float().transpose(-2, -1)).abs().amax() * scale
        except RuntimeError:
            return
        logits = torch.where(torch.isfinite(logits), logits, 0.0)
        zero = torch.zeros((), device=logits.device)
        maxes = torch.stack([zero, zero, torch.full((), -math.inf, device=logits.device), zero, logits])
        self._accumulate(n, maxes, torch.zeros(_N_SUM, device=logits.device))


def _all_reduce(maxes: torch.Tensor, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce the statistics of all ranks so that every rank decides the same (no-op without a group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return maxes, sums
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    m, s = maxes.to(device).contiguous(), sums.to(device).contiguous()
    # -inf (no nonzero value) is a valid max operand; NCCL and gloo both handle it
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    dist.all_reduce(s, op=dist.ReduceOp.SUM)
    return m.cpu(), s.cpu()


def _fmt(x: float) -> str:
    return f"{x:.1e}"


class Ranges(AnalysisPass):
    """Calibration ranges and the range-based keep decisions (see the module docstring).

    Args:
        calibration: iterable of batches (tuple of positional inputs, dict of keyword inputs, or a
            tensor), or `CalibrationData`.
        config: the conversion config; its precision's island dtype is the target format.
        margin: a value overflows when max |x| > format max / margin (head room for inputs larger
            than those calibrated; default 2).
        flush_limit: a value flushes to zero when the values below the smallest subnormal carry more
            than this relative L2 share of the tensor (default 1e-2).
        progress: `progress(step, text)` callback, e.g. convert's reporter.
    """

    name = "ranges"

    def __init__(self, calibration: Any, config: ConvertConfig, *, margin: float = 2.0,
                 flush_limit: float = 1e-2, progress: Progress | None = None):
        self.calibration = calibration
        self.config = config
        self.margin = float(margin)
        self.flush_limit = float(flush_limit)
        self.progress = progress or quiet
        self.summary: dict = {}

    def call(self, gm: fx.GraphModule) -> PassResult:
        start = time.perf_counter()
        data: CalibrationData = as_batches(self.calibration)
        low = self.config.island_dtype
        recorder = _Recorder(gm, low)
        with torch.no_grad():
            for i, (args, kwargs) in enumerate(data.batches):
                flat = flat_inputs(gm, args, kwargs, index=i)
                try:
                    recorder.run(*flat, enable_io_processing=False)
                except Exception as exc:
                    raise InputError(f"calibration batch {i} failed in the fp32 graph: "
                                     f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
                                     "Calibration batches must have the shapes the model was captured "
                                     "with (only the batch dimension may differ when it is dynamic)"
                                     ) from exc
                self.progress("ranges", f"calibration batch {i + 1}/{len(data)}")
        nodes = list(recorder.maxes)
        if nodes:
            maxes, sums = _all_reduce(torch.stack([recorder.maxes[n] for n in nodes]).cpu(),
                                      torch.stack([recorder.sums[n] for n in nodes]).cpu())
        stats = {n: (maxes[i].tolist(), sums[i].tolist()) for i, n in enumerate(nodes)}
        kept = self._decide(gm, stats, low, len(data))
        self.summary = {"batches": len(data), "seconds": round(time.perf_counter() - start, 3),
                        "nodes": len(stats), "target": meta.dtype_name(low),
                        "kept": {n.name: meta.get(n, meta.RANGE)["reason"] for n in kept}}
        gm.meta.setdefault(meta.CALIBRATION, {})["ranges"] = self.summary
        self.progress("ranges", f"{len(stats)} values measured on {len(data)} batches; "
                      f"{len(kept)} kept out of {meta.dtype_name(low)}"
                      + "".join(f"\n    {n.name} ({meta.module_path(n) or '<top level>'}): "
                                f"{meta.get(n, meta.RANGE)['reason']}" for n in kept))
        return PassResult(gm, False)

    # ------------------------------------------------------------------ decisions
    def _keep_dtype(self) -> str:
        if self.config.allow_bf16_fallback and self.config.precision is Precision.FP16:
            return "bfloat16"  # every problem found here is one of range, which bf16 has
        return "float32"

    def _decide(self, gm: fx.GraphModule, stats: dict, low: torch.dtype, batches: int) -> list[fx.Node]:
        fmax = float(torch.finfo(low).max)
        limit = fmax / self.margin
        lname = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(low, meta.dtype_name(low))
        flush_below = float(torch.finfo(low).smallest_normal) * float(torch.finfo(low).eps) / 2
        problems: dict[fx.Node, str] = {}
        for node, (mx, sm) in stats.items():
            amax, amax_data, neg_min_nz, flush_error, logits = mx
            nonfinite, nonzero, flushed, sentinels, _elements = (int(v) for v in sm)
            record = {  # amax leaves masking sentinels out: they are counted under "sentinels"
                "amax": amax_data, "min_nonzero": (-neg_min_nz if math.isfinite(neg_min_nz) else None),
                "nonfinite": nonfinite, "flushed": flushed, "flush_error": flush_error,
                "sentinels": sentinels, "batches": batches, "target": meta.dtype_name(low),
            }
            if logits > 0:
                record["logits_amax"] = logits
            meta.put(node, meta.RANGE, record)
            if amax_data > limit:
                over = (f"max |x| = {_fmt(amax_data)} > {lname} max {fmax:.0f}" if amax_data > fmax else
                        f"max |x| = {_fmt(amax_data)} > {lname} max {fmax:.0f} / {self.margin:g} "
                        "(safety margin)")
                problems[node] = over
            elif flush_error > self.flush_limit:
                problems[node] = (f"{flushed} of {nonzero} nonzero values flush to zero in {lname} "
                                  f"(smallest nonzero |x| = {_fmt(record['min_nonzero'] or 0.0)} < "
                                  f"{_fmt(flush_below)}; {flush_error:.0%} of the L2 norm lost)")
            elif logits > fmax:
                problems[node] = (f"attention logits reach |q.k| * scale = {_fmt(logits)} > {lname} "
                                  f"max {fmax:.0f}")
        keep = self._keep_dtype()
        kept: dict[fx.Node, str] = {}

        def decidable(n: fx.Node) -> bool:
            info = meta.get(n, meta.OP_CLASS)
            return (n.op in ("call_function", "call_method", "call_module") and info is not None
                    and info["class"] != "untouched")

        for node, why in problems.items():
            if decidable(node):
                kept.setdefault(node, f"{why}: computed in {keep} so its result stays finite")
            if is_tuple_getitem(node) and decidable(node.args[0]):  # the tuple's producer computes it
                kept.setdefault(node.args[0], f"its output {node.name} has {why}: computed in {keep}")
        for value, why in problems.items():
            for user in value.users:
                if user in kept or not decidable(user) or not self._rounds_input(user, value):
                    continue
                op = meta.get(user, meta.OP_CLASS)["op"]
                kept[user] = (f"reads {value.name} ('{meta.module_path(value) or '<top level>'}') whose "
                              f"{why}; {op} would round it to {lname} on the way in")
        for node, reason in kept.items():
            record = dict(meta.get(node, meta.RANGE) or {"batches": batches,
                                                           "target": meta.dtype_name(low)})
            record.update({"keep": keep, "reason": reason})
            meta.put(node, meta.RANGE, record)
        return list(kept)

    @staticmethod
    def _rounds_input(user: fx.Node, value: fx.Node) -> bool:
        """Would `user` read `value` in low precision under autocast semantics (as `assign` does)?"""
        info = meta.get(user, meta.OP_CLASS)
        cls = info["class"]
        if cls == "fp32":
            return False
        if cls == "lowp":
            return True
        ins = float_inputs(user)
        if cls == "follow":
            return not ins or ins[0] is not value
        if cls == "promote":
            val = value.meta.get("val", value.meta.get("tensor_meta"))
            zero_dim = getattr(val, "dim", lambda: 1)() == 0
            shaped = [i for i in ins if i is not value]
            return zero_dim and bool(shaped)
        return False
