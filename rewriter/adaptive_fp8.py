"""The FP8 kind of adaptive precision (rewriter/adaptive.py): which GEMMs are layers (`fp8_linear_train`), their
run-time op (`adaptive_linear_train`, rewriter/runtime/adaptive_ops.py), and the rule that finds a layer in
trouble (`Fp8Kind.judge`, thresholds in its docstring).

Before: y = fp8_linear_train(x, w, b, bf16, True)                         always FP8
After:  y = adaptive_linear_train(x, w, b, bf16, True, _adaptive_switch_3)  FP8 | BF16 | FP32, + statistics
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from rewriter.runtime import adaptive_ops
from rewriter.runtime.adaptive_ops import adaptive_linear_train
from rewriter.runtime.fp8_train_ops import fp8_linear_train

__all__ = ["Fp8Kind"]


class Fp8Kind:
    """FP8 training GEMMs (`fp8_linear_train`) -> `adaptive_linear_train`, statistics in e4m3 / e5m2.

    Thresholds (keyword arguments of AdaptivePrecision):
        underflow_up: flush-to-zero fraction of x or weight above which a layer leaves FP8 (default 1%).
        grad_underflow_up: the same for grad_out in e5m2 (default 10%: a confident softmax output has many
            gradients below amax * 1e-10 that flush harmlessly; measured up to ~1.2% on the healthy tasks).
        overflow_up: overflow fraction above which a layer leaves FP8 (default 5%).
        growth_up: amax growth factor in one step above which a layer leaves FP8 (default 64x).
        grad_norm_dev_up: on a sampled step, the largest |FP8 grad_x norm / bf16 reference - 1| (10%).
        sqnr_floor_x, sqnr_floor_g: sampled SQNR floors (dB) of x (e4m3) and grad_out (e5m2).

    FP8 -> BF16 when, on this step, the fraction of x, weight or grad_out values that flush to zero after
    scaling exceeds `underflow_up`, or that overflow (above the previous step's amax, or non-finite)
    exceeds `overflow_up`, or amax grew more than `growth_up` times in one step, or the sampled SQNR of
    x / grad_out fell below `sqnr_floor_x` / `sqnr_floor_g` dB, or the sampled grad_x norm strays from its
    bf16 reference by more than `grad_norm_dev_up`. Calm: underflow < up / 4, overflow < up / 4, no jump,
    SQNR 3 dB above its floor.
    """

    name = "fp8"
    precisions = adaptive_ops.PRECISIONS
    slots = adaptive_ops.SLOTS
    defaults = {"underflow_up": 0.01, "grad_underflow_up": 0.1, "overflow_up": 0.05, "growth_up": 64.0,
                "grad_norm_dev_up": 0.1, "sqnr_floor_x": 20.0, "sqnr_floor_g": 14.0}
    event_stats = ("x_amax", "w_amax", "g_amax", "x_underflow", "w_underflow", "g_underflow")
    missing = ("found no FP8 training GEMM (fp8_linear_train) in the model: convert with precision='fp8', "
               "mode='train' (and fp8=Fp8Options.always() for small layers the cost model keeps in bf16)")

    def __init__(self):
        self._i = {name: i for i, name in enumerate(self.slots)}

    def new_switch(self, device):
        return adaptive_ops.new_switch(device)

    def match(self, node: fx.Node) -> bool:
        return node.target is fp8_linear_train

    def rewrite(self, gm: fx.GraphModule, graph: fx.Graph, node: fx.Node, switch: fx.Node) -> str:
        args = list(node.args) + [node.kwargs.get("fast_accum", True)] * (len(node.args) < 5)
        node.target = adaptive_linear_train
        node.args = (*args[:5], switch)
        node.kwargs = {}
        return ("fp8_linear_train -> adaptive_linear_train: the layer runs the precision its switch says (FP8 "
                "until the controller switches it) and records its e4m3/e5m2 statistics")

    def reset_rows(self, stats: torch.Tensor) -> torch.Tensor:
        """The [layers, N_STATS] statistics the next observed step starts from, computed on the device from
        this step's (all-reduced) ones: accumulated slots cleared (0, -inf for the negated SQNR), the
        previous amax slots set to this step's amax."""
        i = self._i
        keep = torch.tensor([k not in adaptive_ops.ACCUMULATED for k in self.slots], device=stats.device)
        fill = torch.tensor([float("-inf") if k.endswith("neg_sqnr") else 0.0 for k in self.slots],
                            device=stats.device)
        new = torch.where(keep, stats, fill)
        new[:, i["x_prev_amax"]] = stats[:, i["x_amax"]]
        new[:, i["g_prev_amax"]] = stats[:, i["g_amax"]]
        return new

    def previous(self, row: list[float], prev: list[float]) -> list[float]:
        """What `judge` remembers of this step: the amax of x, weight and grad_out."""
        return [row[self._i["x_amax"]], row[self._i["w_amax"]], row[self._i["g_amax"]]]

    def judge(self, t: dict, prev: list[float], row: list[float], rows: list[list[float]], layer: int,
              currents: list[int]) -> tuple[str, bool]:
        """(reason to leave FP8 or "", calm: within the down thresholds) of one layer on this step."""
        i, reasons, calm = self._i, [], True
        for p, name in (("x", "input"), ("w", "weight"), ("g", "grad_out")):
            under, up = row[i[p + "_underflow"]], t["grad_underflow_up" if p == "g" else "underflow_up"]
            if under > up:
                reasons.append(f"{under:.1%} of {name} values flush to zero in "
                               f"{'e5m2' if p == 'g' else 'e4m3'} (> {up:.1%}; amax {row[i[p + '_amax']]:.3g})")
            calm &= under < up / 4
        for k, (p, name) in enumerate((("x", "input"), ("w", "weight"), ("g", "grad_out"))):
            amax = row[i[p + "_amax"]]
            if prev[k] > 0 and amax > t["growth_up"] * prev[k]:
                reasons.append(f"{name} amax grew {amax / prev[k]:.3g}x in one step (> {t['growth_up']:g}x)")
                calm = False
        for p, name in (("x", "input"), ("g", "grad_out")):
            over = row[i[p + "_overflow"]]
            if over > t["overflow_up"]:
                reasons.append(f"{over:.1%} of {name} values above the previous step's amax (> "
                               f"{t['overflow_up']:.1%})")
            calm &= over < t["overflow_up"] / 4
            neg = row[i[p + "_neg_sqnr"]]
            if math.isfinite(neg):
                floor = t["sqnr_floor_" + p]
                if -neg < floor:
                    reasons.append(f"sampled {name} SQNR {-neg:.1f} dB < {floor:g} dB")
                calm &= -neg >= floor + 3
        dev = row[i["gnorm_dev"]]
        if dev > t["grad_norm_dev_up"]:
            reasons.append(f"sampled FP8 grad_x norm off the bf16 reference by {dev:.1%} (> "
                           f"{t['grad_norm_dev_up']:.0%})")
        calm &= dev < t["grad_norm_dev_up"] / 4
        if row[i["nonfinite"]] > 0:
            reasons.append(f"non-finite values ({row[i['nonfinite']]:.2%})")
            calm = False
        return "; ".join(reasons), calm
