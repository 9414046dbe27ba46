"""Adaptive precision in training: each training GEMM runs its low precision (FP8 or fp16), BF16 or FP32 as its
numbers require.

    converted = rewriter.convert(model, (x,), precision="fp8", mode="train", fp8=Fp8Options.always())
    controller = rewriter.AdaptivePrecision(converted)          # installs the switch, once
    opt = torch.optim.AdamW(converted.parameters(), lr=1e-3)
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        loss_fn(converted(x), y).backward()
        opt.step()
        controller.step()                                        # read statistics, maybe switch layers
    json.dump(controller.timeline(), f); controller.plot("precision.svg")

The same controller watches a model converted with precision="fp16", mode="train" (its low precision is then
fp16, and the loss scaler stays): a layer whose fp16 numbers overflow (rewriter/adaptive_fp16.py says when)
moves to BF16 instead of making the loss scaler skip steps for the whole model:

    converted = rewriter.convert(model, (x,), precision="fp16", mode="train")
    controller = rewriter.AdaptivePrecision(converted)
    scaler = rewriter.loss_scale.make_scaler(converted)
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        scaler.backward(loss_fn(converted(x), y)); scaler.step(opt)
        controller.step()

What differs between the two, the *kind* (which GEMMs are layers, the run-time op, its statistics and the
rule that finds a layer in trouble), lives in `Fp8Kind` below and `Fp16Kind` (rewriter/adaptive_fp16.py);
everything else is shared: installing, the all-reduce, the hysteresis, the timeline and the picture.

Installing: every layer node of the converted module (both its train and eval graphs) becomes the kind's
run-time op (rewriter/runtime/adaptive_ops.py, adaptive_fp16_ops.py) with the layer's `state` (CPU int64
[precision, sample, observe]) and `stats` (its running statistics) as extra arguments, held as plain
attributes `_adaptive_state_<i>` / `_adaptive_stats_<i>` of the module (not buffers: not in state_dict,
not broadcast by DDP; `stats` is moved to the layer's device). The graph is recompiled once, here;
switching a layer later writes `state[0]` and nothing else.

Policy (per layer, hysteresis; levels low (FP8 | fp16) -> BF16 -> FP32):
  low -> BF16   when the kind's judge names a reason on this observed step (FP8: `Fp8Kind.judge`);
  BF16 -> FP32  when the layer's tensors hold non-finite values while in BF16;
  one level back after `patience` consecutive observed steps on which the kind calls the layer calm
                (every statistic within the *down* thresholds, tighter than the up ones), so a layer
                hovering at a threshold does not flap.
Statistics are measured in the low-precision target format also while a layer runs BF16/FP32, so the
controller knows when the low precision would be healthy again. Under torch.distributed the per-layer
statistics are all-reduced (max; SQNR stored negated, so the worst rank wins) before deciding: every rank
takes the same decisions from the same numbers, and records the same reasons.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn

from rewriter import meta
from rewriter.errors import ConfigError
from rewriter.runtime import adaptive_ops
from rewriter.runtime.adaptive_ops import adaptive_linear_train
from rewriter.runtime.fp8_train_ops import fp8_linear_train

__all__ = ["AdaptivePrecision", "Fp8Kind"]

LOW, BF16, FP32 = 0, 1, 2
_COMMON = ("patience", "sample_every", "observe_every")


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

    def new_buffers(self, device):
        return adaptive_ops.new_buffers(device)

    def match(self, node: fx.Node) -> bool:
        return node.target is fp8_linear_train

    def rewrite(self, gm: fx.GraphModule, graph: fx.Graph, node: fx.Node, state: fx.Node, stats: fx.Node) -> str:
        node.target = adaptive_linear_train
        node.args = (*node.args[:5], state, stats)
        return ("fp8_linear_train -> adaptive_linear_train: the layer runs the precision its state says (FP8 "
                "until the controller switches it) and records its e4m3/e5m2 statistics")

    def reset(self, stats: torch.Tensor, prev: list[float]) -> None:
        i = self._i
        with torch.no_grad():
            for k in adaptive_ops.ACCUMULATED:
                stats[i[k]] = float("-inf") if k.endswith("neg_sqnr") else 0.0
            stats[i["x_prev_amax"]], stats[i["g_prev_amax"]] = prev[0], prev[2]

    def previous(self, row: list[float], prev: list[float]) -> list[float]:
        """What `judge` and `reset` remember of this step: the amax of x, weight and grad_out."""
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


def _kind_of(model: fx.GraphModule):
    from rewriter.adaptive_fp16 import Fp16Kind

    graphs = model.graphs() if hasattr(model, "graphs") else {"train": model.graph}
    kinds = [Fp8Kind(), Fp16Kind()]
    for kind in kinds:
        if any(kind.match(n) for g in graphs.values() for n in g.nodes):
            return kind
    raise ConfigError("AdaptivePrecision found no training GEMM to watch: convert with mode='train' and "
                      "precision='fp8' (fp8=Fp8Options.always() for small layers the cost model keeps in bf16) "
                      "or precision='fp16'")


class AdaptivePrecision:
    """Per-layer precision controller for a model converted with mode="train" and precision "fp8" or "fp16".

    Args:
        model: the converted module (`TrainEvalGraphModule` or an fx.GraphModule) holding FP8 training GEMMs
            (`fp8_linear_train`) or fp16 linears.
        patience: consecutive calm observed steps before a layer goes back one level.
        sample_every: steps between two sampled SQNR measurements (0: never; FP8 only).
        observe_every: steps between two observed steps (1: every step). On the others the GEMMs run bare
            (no statistics, no decision), which bounds the statistics' overhead to 1/observe_every of it.
        **thresholds: the kind's thresholds, see `Fp8Kind` and `rewriter.adaptive_fp16.Fp16Kind`.

    Example:
        >>> controller = AdaptivePrecision(converted, patience=50)
        >>> controller.step()                      # after optimizer.step() (or scaler.step(opt))
        >>> controller.precisions()
        {'head': 'fp8', 'fc1': 'fp8'}
    """

    def __init__(self, model: nn.Module, *, patience: int = 100, sample_every: int = 50, observe_every: int = 1,
                 **thresholds: float):
        if not isinstance(model, fx.GraphModule):
            raise ConfigError(f"AdaptivePrecision needs the module returned by rewriter.convert(..., "
                              f"mode='train') with precision 'fp8' or 'fp16', got {type(model).__name__}")
        self.model = model
        self.kind = _kind_of(model)
        unknown = sorted(set(thresholds) - set(self.kind.defaults))
        if unknown:
            raise ConfigError(f"AdaptivePrecision: unknown option(s) {unknown} for a {self.kind.name} model; its "
                              f"thresholds are {sorted(self.kind.defaults)}, and {list(_COMMON)}")
        self.thresholds = {**self.kind.defaults, **{k: float(v) for k, v in thresholds.items()}}
        self.precisions_names = self.kind.precisions
        self.patience, self.sample_every = int(patience), int(sample_every)
        self.observe_every = max(int(observe_every), 1)
        self.layers: list[str] = []
        self._states: list[torch.Tensor] = []
        self._stats: list[torch.Tensor] = []
        self._install()
        self.kind.layers = self.layers
        n = len(self.layers)
        self._steps = 0
        self._healthy = [0] * n
        self._prev = [[0.0, 0.0, 0.0] for _ in range(n)]  # the kind's previous-step values (FP8: amax x, w, g)
        self._events: list[dict] = []
        self._history: list[list[int]] = [[] for _ in range(n)]  # precision run on each step
        self._flops = [0.0] * 3  # GEMM FLOPs (forward + 2 backward) run in low / bf16 / fp32
        self._last_flops = [0.0] * n  # of the last observed step, counted for the unobserved ones
        self._slot = {name: i for i, name in enumerate(self.kind.slots)}

    # ------------------------------------------------------------------ install
    def _install(self) -> None:
        graphs = self.model.graphs() if hasattr(self.model, "graphs") else {"train": self.model.graph}
        index: dict[str, int] = {}  # layer key (node name) -> layer number, shared by train and eval graphs
        device = next((t.device for t in self.model.parameters()), None)
        for graph in graphs.values():
            for node in list(graph.nodes):
                if not self.kind.match(node):
                    continue
                if node.name not in index:
                    index[node.name] = len(self.layers)
                    self.layers.append(meta.module_path(node) or node.name)
                    state, stats = self.kind.new_buffers(device)
                    self._states.append(state)
                    self._stats.append(stats)
                    setattr(self.model, f"_adaptive_state_{index[node.name]}", state)
                    setattr(self.model, f"_adaptive_stats_{index[node.name]}", stats)
                i = index[node.name]
                with graph.inserting_before(node):
                    # create_node: the eval graph's owning module is set only at recompile (get_attr warns)
                    s_node = graph.create_node("get_attr", f"_adaptive_state_{i}")
                    t_node = graph.create_node("get_attr", f"_adaptive_stats_{i}")
                reason = self.kind.rewrite(self.model, graph, node, s_node, t_node)
                meta.put(node, meta.REWRITTEN, [*(meta.get(node, meta.REWRITTEN) or []), {
                    "pass": "adaptive", "reason": f"layer {self.layers[i]}: {reason}"}])
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
        currents = [int(s[0]) for s in self._states]
        step, events, names = self._steps, [], self.precisions_names
        nonfinite = self._slot["nonfinite"]
        for i, row in enumerate(rows):
            current = currents[i]
            self._history[i].append(current)
            self._last_flops[i] = 3 * row[self._slot["flops"]]
            self._flops[current] += self._last_flops[i]
            bad, calm = self.kind.judge(self.thresholds, self._prev[i], row, rows, i, currents)
            target = current
            if bad and current == LOW:
                target = BF16
            elif current == BF16 and row[nonfinite] > 0:
                target, bad = FP32, f"non-finite values ({row[nonfinite]:.2%}) while in bf16"
            if target != current:
                self._healthy[i] = 0
            elif current != LOW and calm:
                self._healthy[i] += 1
                if self._healthy[i] >= self.patience:
                    target, bad = current - 1, f"statistics within the down thresholds for {self.patience} steps"
                    self._healthy[i] = 0
            elif current != LOW:
                self._healthy[i] = 0
            if target != current:
                self._states[i][0] = target
                events.append({"step": step, "layer": self.layers[i], "from": names[current],
                               "to": names[target], "reason": bad,
                               "stats": {k: _num(row[self._slot[k]]) for k in self.kind.event_stats}})
            self._prev[i] = self.kind.previous(row, self._prev[i])
            self.kind.reset(self._stats[i], self._prev[i])
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

    # ------------------------------------------------------------------ read-outs
    def precisions(self) -> dict[str, str]:
        """{layer: "fp8" | "fp16" | "bf16" | "fp32"} now."""
        return {name: self.precisions_names[int(s[0])] for name, s in zip(self.layers, self._states)}

    def set_precision(self, layer: str, precision: str) -> None:
        """Pin a layer's precision by hand (recorded in the timeline with reason "set by hand")."""
        names = self.precisions_names
        if layer not in self.layers or precision not in names:
            raise ConfigError(f"set_precision({layer!r}, {precision!r}): layers are {self.layers}, precisions "
                              f"{list(names)}")
        i = self.layers.index(layer)
        old = int(self._states[i][0])
        self._states[i][0] = names.index(precision)
        self._events.append({"step": self._steps, "layer": layer, "from": names[old], "to": precision,
                             "reason": "set by hand", "stats": {}})

    def low_flop_fraction(self) -> float:
        """Share of the GEMM FLOPs run so far (forward and both backward GEMMs) that ran in the low precision."""
        total = sum(self._flops)
        return self._flops[LOW] / total if total else 1.0

    fp8_flop_fraction = low_flop_fraction  # the FP8 controller's name for it

    def timeline(self) -> dict:
        """JSON-able record: layers, steps, switch events with reasons, per-layer precision segments."""
        segments = {}
        for name, hist in zip(self.layers, self._history):
            runs, start = [], 0
            for k in range(1, len(hist) + 1):
                if k == len(hist) or hist[k] != hist[start]:
                    runs.append({"start": start, "end": k, "precision": self.precisions_names[hist[start]]})
                    start = k
            segments[name] = runs
        share = self.low_flop_fraction()
        return {"kind": self.kind.name, "layers": list(self.layers), "steps": self._steps,
                "events": list(self._events), "segments": segments, "low_flop_fraction": share,
                f"{self.kind.name}_flop_fraction": share, "thresholds": dict(self.thresholds),
                "patience": self.patience}

    def plot(self, path: str) -> str:
        """Write the precision timeline as a picture: PNG with matplotlib when `path` ends in .png and
        matplotlib is installed, else a self-written SVG (path's suffix replaced by .svg). Returns the path."""
        from rewriter.adaptive_plot import write_picture

        return write_picture(self.timeline(), path)


def _num(v: float):
    return v if math.isfinite(v) else None
