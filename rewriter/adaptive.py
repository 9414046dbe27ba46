"""Adaptive precision in training: each FP8 training GEMM runs FP8, BF16 or FP32 as its numbers require.

    converted = rewriter.convert(model, (x,), precision="fp8", mode="train", fp8=Fp8Options.always())
    controller = rewriter.AdaptivePrecision(converted)          # installs the switch, once
    opt = torch.optim.AdamW(converted.parameters(), lr=1e-3)
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        loss_fn(converted(x), y).backward()
        opt.step()
        controller.step()                                        # read statistics, maybe switch layers
    json.dump(controller.timeline(), f); controller.plot("precision.svg")

Installing: every `fp8_linear_train` node of the converted module (both its train and eval graphs) becomes
`adaptive_linear_train` (rewriter/runtime/adaptive_ops.py) with two extra arguments, the layer's `state`
(CPU int64 [precision, sample]) and `stats` (its running statistics in e4m3 / e5m2), held as plain
attributes `_adaptive_state_<i>` / `_adaptive_stats_<i>` of the module (not buffers: not in state_dict,
not broadcast by DDP; `stats` is moved to the layer's device). The graph is recompiled once, here;
switching a layer later writes `state[0]` and nothing else.

Policy (per layer, hysteresis):
  FP8 -> BF16   when, on this step, the fraction of x, weight or grad_out values that flush to zero after
                scaling exceeds `underflow_up`, or that overflow (above the previous step's amax, or
                non-finite) exceeds `overflow_up`, or amax grew more than `growth_up` times in one step, or
                the sampled SQNR of x / grad_out fell below `sqnr_floor_x` / `sqnr_floor_g` dB, or the
                sampled grad_x norm strays from its bf16 reference by more than `grad_norm_dev_up`;
  BF16 -> FP32  when the layer's tensors hold non-finite values while in BF16;
  one level back after `patience` consecutive steps on which every statistic is within the *down*
                thresholds (underflow < underflow_up / 4, overflow < overflow_up / 4, no jump, SQNR
                3 dB above its floor), so a layer hovering at a threshold does not flap.
Statistics are measured in the FP8 target format also while a layer runs BF16/FP32, so the controller
knows when FP8 would be healthy again. Under torch.distributed the per-layer statistics are all-reduced
(max; SQNR stored negated, so the worst rank wins) before deciding: every rank takes the same decisions
from the same numbers, and records the same reasons.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn

from rewriter import meta
from rewriter.errors import ConfigError
from rewriter.runtime.adaptive_ops import (ACCUMULATED, BF16, FP8, FP32, PRECISIONS, SLOTS, adaptive_linear_train,
                                           new_buffers)
from rewriter.runtime.fp8_train_ops import fp8_linear_train

__all__ = ["AdaptivePrecision"]

_I = {name: i for i, name in enumerate(SLOTS)}


class AdaptivePrecision:
    """Per-layer precision controller for a model converted with precision="fp8", mode="train".

    Args:
        model: the converted module (`TrainEvalGraphModule` or an fx.GraphModule) holding
            `fp8_linear_train` nodes.
        underflow_up: flush-to-zero fraction of x or weight above which a layer leaves FP8 (default 1%).
        grad_underflow_up: the same for grad_out in e5m2 (default 10%: a confident softmax output has many
            gradients below amax * 1e-10 that flush harmlessly; measured up to ~1.2% on the healthy tasks).
        overflow_up: overflow fraction above which a layer leaves FP8 (default 5%).
        growth_up: amax growth factor in one step above which a layer leaves FP8 (default 64x).
        grad_norm_dev_up: on a sampled step, the largest |FP8 grad_x norm / bf16 reference - 1| (10%).
        sqnr_floor_x, sqnr_floor_g: sampled SQNR floors (dB) of x (e4m3) and grad_out (e5m2).
        patience: consecutive healthy observed steps before a layer goes back one level.
        sample_every: steps between two sampled SQNR measurements (0: never).
        observe_every: steps between two observed steps (1: every step). On the others the GEMMs run bare
            (no statistics, no decision), which bounds the statistics' overhead to 1/observe_every of it.

    Example:
        >>> controller = AdaptivePrecision(converted, patience=50)
        >>> controller.step()                      # after optimizer.step()
        >>> controller.precisions()
        {'head': 'fp8', 'fc1': 'fp8'}
    """

    def __init__(self, model: nn.Module, *, underflow_up: float = 0.01, grad_underflow_up: float = 0.1,
                 overflow_up: float = 0.05,
                 growth_up: float = 64.0, grad_norm_dev_up: float = 0.1, sqnr_floor_x: float = 20.0, sqnr_floor_g: float = 14.0,
                 patience: int = 100, sample_every: int = 50, observe_every: int = 1):
        if not isinstance(model, fx.GraphModule):
            raise ConfigError(f"AdaptivePrecision needs the module returned by rewriter.convert(..., "
                              f"precision='fp8', mode='train'), got {type(model).__name__}")
        self.model = model
        self.thresholds = {"underflow_up": underflow_up, "grad_underflow_up": grad_underflow_up,
                           "overflow_up": overflow_up, "growth_up": growth_up,
                           "grad_norm_dev_up": grad_norm_dev_up,
                           "sqnr_floor_x": sqnr_floor_x, "sqnr_floor_g": sqnr_floor_g}
        self.patience, self.sample_every = int(patience), int(sample_every)
        self.observe_every = max(int(observe_every), 1)
        self.layers: list[str] = []
        self._states: list[torch.Tensor] = []
        self._stats: list[torch.Tensor] = []
        self._install()
        if not self.layers:
            raise ConfigError("AdaptivePrecision found no FP8 training GEMM (fp8_linear_train) in the model: "
                              "convert with precision='fp8', mode='train' (and fp8=Fp8Options.always() for "
                              "small layers the cost model keeps in bf16)")
        n = len(self.layers)
        self._steps = 0
        self._healthy = [0] * n
        self._prev_amax = [[0.0, 0.0, 0.0] for _ in range(n)]  # x, w, g
        self._events: list[dict] = []
        self._history: list[list[int]] = [[] for _ in range(n)]  # precision run on each step
        self._flops = [0.0] * 3  # GEMM FLOPs (forward + 2 backward) run in fp8 / bf16 / fp32
        self._last_flops = [0.0] * n  # of the last observed step, counted for the unobserved ones

    # ------------------------------------------------------------------ install
    def _install(self) -> None:
        graphs = self.model.graphs() if hasattr(self.model, "graphs") else {"train": self.model.graph}
        index: dict[str, int] = {}  # layer key (node name) -> layer number, shared by train and eval graphs
        for graph in graphs.values():
            for node in list(graph.nodes):
                if node.target is not fp8_linear_train:
                    continue
                if node.name not in index:
                    index[node.name] = len(self.layers)
                    self.layers.append(meta.module_path(node) or node.name)
                    device = next((t.device for t in self.model.parameters()), None)
                    state, stats = new_buffers(device)
                    self._states.append(state)
                    self._stats.append(stats)
                    setattr(self.model, f"_adaptive_state_{index[node.name]}", state)
                    setattr(self.model, f"_adaptive_stats_{index[node.name]}", stats)
                i = index[node.name]
                with graph.inserting_before(node):
                    # create_node: the eval graph's owning module is set only at recompile (get_attr warns)
                    s_node = graph.create_node("get_attr", f"_adaptive_state_{i}")
                    t_node = graph.create_node("get_attr", f"_adaptive_stats_{i}")
                node.target = adaptive_linear_train
                node.args = (*node.args[:5], s_node, t_node)
                meta.put(node, meta.REWRITTEN, [*(meta.get(node, meta.REWRITTEN) or []), {
                    "pass": "adaptive", "reason": f"fp8_linear_train -> adaptive_linear_train: layer "
                    f"{self.layers[i]} runs the precision its state says (FP8 until the controller switches "
                    "it) and records its e4m3/e5m2 statistics"}])
        self.model.recompile()

    # ------------------------------------------------------------------ step
    def step(self) -> list[dict]:
        """Read every layer's statistics of this step, decide, switch; returns this step's switch events."""
        if not int(self._states[0][2]):  # an unobserved step: count it, decide nothing
            for i, state in enumerate(self._states):
                self._history[i].append(int(state[0]))
                self._flops[int(state[0])] += self._last_flops[i]
            self._steps += 1
            self._arm()
            return []
        stats = torch.stack([s.detach() for s in self._stats]).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
        rows = stats.cpu().tolist()
        step, events = self._steps, []
        for i, row in enumerate(rows):
            current = int(self._states[i][0])
            self._history[i].append(current)
            self._last_flops[i] = 3 * row[_I["flops"]]
            self._flops[current] += self._last_flops[i]
            bad, calm = self._judge(i, row, current)
            target = current
            if bad and current == FP8:
                target = BF16
            elif current == BF16 and row[_I["nonfinite"]] > 0:
                target, bad = FP32, f"non-finite values ({row[_I['nonfinite']]:.2%}) while in bf16"
            if target != current:
                self._healthy[i] = 0
            elif current != FP8 and calm:
                self._healthy[i] += 1
                if self._healthy[i] >= self.patience:
                    target, bad = current - 1, f"statistics within the down thresholds for {self.patience} steps"
                    self._healthy[i] = 0
            elif current != FP8:
                self._healthy[i] = 0
            if target != current:
                self._states[i][0] = target
                event = {"step": step, "layer": self.layers[i], "from": PRECISIONS[current],
                         "to": PRECISIONS[target], "reason": bad,
                         "stats": {k: _num(row[_I[k]]) for k in ("x_amax", "w_amax", "g_amax", "x_underflow",
                                                                 "w_underflow", "g_underflow")}}
                events.append(event)
            self._prev_amax[i] = [row[_I["x_amax"]], row[_I["w_amax"]], row[_I["g_amax"]]]
            self._reset(i)
        self._events.extend(events)
        self._steps += 1
        self._arm()
        return events

    def _arm(self) -> None:
        """Set the sample and observe flags of every layer for the next step."""
        nxt = self._steps
        observe = nxt % self.observe_every == 0
        # the first observed step at or after each multiple of sample_every
        sample = observe and self.sample_every > 0 and nxt > 0 and nxt % self.sample_every < self.observe_every
        for state in self._states:
            state[1], state[2] = int(sample), int(observe)

    def _judge(self, i: int, row: list[float], current: int) -> tuple[str, bool]:
        """(reason to leave FP8 or "", calm: within the down thresholds) of layer i on this step."""
        t, reasons, calm = self.thresholds, [], True
        for p, name in (("x", "input"), ("w", "weight"), ("g", "grad_out")):
            under, up = row[_I[p + "_underflow"]], t["grad_underflow_up" if p == "g" else "underflow_up"]
            if under > up:
                reasons.append(f"{under:.1%} of {name} values flush to zero in "
                               f"{'e5m2' if p == 'g' else 'e4m3'} (> {up:.1%}; amax {row[_I[p + '_amax']]:.3g})")
            calm &= under < up / 4
        for k, (p, name) in enumerate((("x", "input"), ("w", "weight"), ("g", "grad_out"))):
            prev, amax = self._prev_amax[i][k], row[_I[p + "_amax"]]
            if prev > 0 and amax > t["growth_up"] * prev:
                reasons.append(f"{name} amax grew {amax / prev:.3g}x in one step (> {t['growth_up']:g}x)")
                calm = False
        for p, name in (("x", "input"), ("g", "grad_out")):
            over = row[_I[p + "_overflow"]]
            if over > t["overflow_up"]:
                reasons.append(f"{over:.1%} of {name} values above the previous step's amax (> "
                               f"{t['overflow_up']:.1%})")
            calm &= over < t["overflow_up"] / 4
            neg = row[_I[p + "_neg_sqnr"]]
            if math.isfinite(neg):
                floor = t["sqnr_floor_" + p]
                if -neg < floor:
                    reasons.append(f"sampled {name} SQNR {-neg:.1f} dB < {floor:g} dB")
                calm &= -neg >= floor + 3
        dev = row[_I["gnorm_dev"]]
        if dev > t["grad_norm_dev_up"]:
            reasons.append(f"sampled FP8 grad_x norm off the bf16 reference by {dev:.1%} (> "
                           f"{t['grad_norm_dev_up']:.0%})")
        calm &= dev < t["grad_norm_dev_up"] / 4
        if row[_I["nonfinite"]] > 0:
            reasons.append(f"non-finite values ({row[_I['nonfinite']]:.2%})")
            calm = False
        return "; ".join(reasons), calm

    def _reset(self, i: int) -> None:
        s = self._stats[i]
        with torch.no_grad():
            for k in ACCUMULATED:
                s[_I[k]] = float("-inf") if k.endswith("neg_sqnr") else 0.0
            s[_I["x_prev_amax"]], s[_I["g_prev_amax"]] = self._prev_amax[i][0], self._prev_amax[i][2]

    # ------------------------------------------------------------------ read-outs
    def precisions(self) -> dict[str, str]:
        """{layer: "fp8" | "bf16" | "fp32"} now."""
        return {name: PRECISIONS[int(s[0])] for name, s in zip(self.layers, self._states)}

    def set_precision(self, layer: str, precision: str) -> None:
        """Pin a layer's precision by hand (recorded in the timeline with reason "set by hand")."""
        if layer not in self.layers or precision not in PRECISIONS:
            raise ConfigError(f"set_precision({layer!r}, {precision!r}): layers are {self.layers}, precisions "
                              f"{list(PRECISIONS)}")
        i = self.layers.index(layer)
        old = int(self._states[i][0])
        self._states[i][0] = PRECISIONS.index(precision)
        self._events.append({"step": self._steps, "layer": layer, "from": PRECISIONS[old], "to": precision,
                             "reason": "set by hand", "stats": {}})

    def fp8_flop_fraction(self) -> float:
        """Share of the GEMM FLOPs run so far (forward and both backward GEMMs) that ran in FP8."""
        total = sum(self._flops)
        return self._flops[FP8] / total if total else 1.0

    def timeline(self) -> dict:
        """JSON-able record: layers, steps, switch events with reasons, per-layer precision segments."""
        segments = {}
        for name, hist in zip(self.layers, self._history):
            runs, start = [], 0
            for k in range(1, len(hist) + 1):
                if k == len(hist) or hist[k] != hist[start]:
                    runs.append({"start": start, "end": k, "precision": PRECISIONS[hist[start]]})
                    start = k
            segments[name] = runs
        return {"layers": list(self.layers), "steps": self._steps, "events": list(self._events),
                "segments": segments, "fp8_flop_fraction": self.fp8_flop_fraction(),
                "thresholds": dict(self.thresholds), "patience": self.patience}

    def plot(self, path: str) -> str:
        """Write the precision timeline as a picture: PNG with matplotlib when `path` ends in .png and
        matplotlib is installed, else a self-written SVG (path's suffix replaced by .svg). Returns the path."""
        from rewriter.adaptive_plot import write_picture

        return write_picture(self.timeline(), path)


def _num(v: float):
    return v if math.isfinite(v) else None
