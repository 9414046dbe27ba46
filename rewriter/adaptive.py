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
rule that finds a layer in trouble), lives in `Fp8Kind` (rewriter/adaptive_fp8.py) and `Fp16Kind`
(rewriter/adaptive_fp16.py); everything else is shared: installing, the all-reduce, the hysteresis, the
timeline and the picture.

Installing: every layer node of the converted module (both its train and eval graphs) becomes the kind's
run-time op (rewriter/runtime/adaptive_ops.py, adaptive_fp16_ops.py) with the layer's `LayerSwitch`
(rewriter/runtime/adaptive_switch.py) as extra argument: a submodule `_adaptive_switch_<i>` holding plain int
flags (precision, sample, observe), the statistics and the gradient probe (plain attributes: not in
state_dict, not seen by DDP or the optimizer; on the layer's device). The fx graph is recompiled once, here;
switching a layer later writes `switch.precision` and nothing else.

Under torch.compile (compile the converted module after creating the controller) the ops are traced: dynamo
specialises on the switches' ints, each distinct combination (a *configuration* of per-layer precisions, times
the step kinds bare / observed / sampled) is one graph variant, compiled the first time it runs and cached;
steady-state steps make no graph break and no recompilation. Cost model, per step: unobserved = static FP8
(same graph); observed = static FP8 + per GEMM operand the amax (the quantization's own reduction) and a few
counts over sampled rows (adaptive_ops._reduce), fused by inductor, + after the step a handful of kernels
whatever the number of layers (gather, reset) and, on CUDA, an asynchronous copy of the statistics read at
the next step (`defer_read`: no device sync); sampled (by default every observed step) + the SQNR and
the grad_x norm against a bf16 reference, both on a row sample of a few hundred thousand values (two
GEMMs of a few hundred rows per layer). Compilations: 2 per configuration in training (bare and observed;
1 with `observe_every` 1; 3 with a `sample_every` that leaves observed steps unsampled), paid once each.
To bound them, switches are applied at most once every `min_steps_between_switches` steps (decisions
made meanwhile wait and go together), and at most `max_configurations` distinct configurations are ever made: a switch that would make one more is refused,
and the refusal is recorded in the timeline (`refused`, with the reason) rather than silently falling back to
eager. Dynamo's recompile limit is raised (process-wide) to fit `max_configurations` variants. Going back to
a configuration seen before (a layer returning to FP8) reuses its compiled graphs.

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
from rewriter.adaptive_fp8 import Fp8Kind

__all__ = ["AdaptivePrecision", "Fp8Kind"]

LOW, BF16, FP32 = 0, 1, 2
_COMMON = ("patience", "sample_every", "observe_every", "max_configurations", "min_steps_between_switches",
           "defer_read")
_VARIANTS_PER_CONFIGURATION = 4  # bare, observed, sampled (training) + a no_grad forward


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
            (`fp8_linear_train`) or fp16 linears. Wrap it in torch.compile after creating the controller.
        patience: consecutive calm observed steps before a layer goes back one level.
        sample_every: None (default): every observed step also measures the SQNR and the grad_x norm check
            (FP8 only; on a row sample, cheap), so a configuration costs two graph variants (bare, observed);
            an int k: only the first observed step at or after each multiple of k (a third variant); 0: never.
        observe_every: steps between two observed steps (1: every step). On the others the GEMMs run bare
            (no statistics, no decision), which bounds the statistics' overhead to 1/observe_every of it.
        max_configurations: distinct per-layer precision configurations ever made (each one costs up to 3
            compilations under torch.compile); a switch that would make one more is refused and recorded.
        min_steps_between_switches: steps between two applied switches; decisions made meanwhile wait and are
            applied together (one configuration, one compilation, for all of them).
        defer_read: decide on an observed step's statistics at the next step() instead of waiting for the
            device (default: on CUDA); the switches then take effect one step later.
        **thresholds: the kind's thresholds, see `Fp8Kind` and `rewriter.adaptive_fp16.Fp16Kind`.

    Example:
        >>> controller = AdaptivePrecision(converted, patience=50)
        >>> compiled = torch.compile(converted)    # optional: switches recompile once per configuration
        >>> controller.step()                      # after optimizer.step() (or scaler.step(opt))
        >>> controller.precisions()
        {'head': 'fp8', 'fc1': 'fp8'}
    """

    def __init__(self, model: nn.Module, *, patience: int = 100, sample_every: int | None = None,
                 observe_every: int = 1,
                 max_configurations: int = 8, min_steps_between_switches: int = 1, defer_read: bool | None = None,
                 **thresholds: float):
        if not isinstance(model, fx.GraphModule):
            raise ConfigError(f"AdaptivePrecision needs the module returned by rewriter.convert(..., "
                              f"mode='train') with precision 'fp8' or 'fp16', got {type(model).__name__}")
        if int(max_configurations) < 1 or int(min_steps_between_switches) < 1:
            raise ConfigError(f"AdaptivePrecision: max_configurations={max_configurations} and "
                              f"min_steps_between_switches={min_steps_between_switches} must be >= 1 (write e.g. "
                              "max_configurations=8, min_steps_between_switches=1)")
        self.model = model
        self.kind = _kind_of(model)
        unknown = sorted(set(thresholds) - set(self.kind.defaults))
        if unknown:
            raise ConfigError(f"AdaptivePrecision: unknown option(s) {unknown} for a {self.kind.name} model; its "
                              f"thresholds are {sorted(self.kind.defaults)}, and {list(_COMMON)}")
        self.thresholds = {**self.kind.defaults, **{k: float(v) for k, v in thresholds.items()}}
        self.precisions_names = self.kind.precisions
        self.patience = int(patience)
        self.sample_every = None if sample_every is None else int(sample_every)
        self.observe_every = max(int(observe_every), 1)
        self.max_configurations = int(max_configurations)
        self.min_steps_between_switches = int(min_steps_between_switches)
        self.layers: list[str] = []
        self._switches: list = []
        self._install()
        self.kind.layers = self.layers
        n = len(self.layers)
        self._steps = 0
        self._healthy = [0] * n
        self._prev = [[0.0, 0.0, 0.0] for _ in range(n)]  # the kind's previous-step values (FP8: amax x, w, g)
        self._events: list[dict] = []
        self._refused: list[dict] = []
        self._pending: dict[int, tuple[int, str, dict, int]] = {}  # layer -> (target, reason, stats, step)
        self._last_switch: int | None = None
        self._configs: list[tuple[int, ...]] = [self._config()]
        self._graphs0 = _dynamo_graphs()
        _raise_recompile_limit(_VARIANTS_PER_CONFIGURATION * self.max_configurations + 4)
        self._history: list[list[int]] = [[] for _ in range(n)]  # precision run on each step
        self._flops = [0.0] * 3  # GEMM FLOPs (forward + 2 backward) run in low / bf16 / fp32
        self._last_flops = [0.0] * n  # of the last observed step, counted for the unobserved ones
        self._slot = {name: i for i, name in enumerate(self.kind.slots)}
        on_cuda = self._switches[0].stats.device.type == "cuda"
        self.defer_read = on_cuda if defer_read is None else bool(defer_read)
        self._inflight: tuple | None = None
        self._pinned: list[torch.Tensor] = []  # the host buffers of deferred reads (_read)
        self._arm()  # step 0's flags (sampled too by default: no graph variant for step 0 alone)

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
                    switch = self.kind.new_switch(device)
                    self._switches.append(switch)
                    self.model.add_module(f"_adaptive_switch_{index[node.name]}", switch)
                i = index[node.name]
                with graph.inserting_before(node):
                    # create_node: the eval graph's owning module is set only at recompile (get_attr warns)
                    s_node = graph.create_node("get_attr", f"_adaptive_switch_{i}")
                reason = self.kind.rewrite(self.model, graph, node, s_node)
                meta.put(node, meta.REWRITTEN, [*(meta.get(node, meta.REWRITTEN) or []), {
                    "pass": "adaptive", "reason": f"layer {self.layers[i]}: {reason}"}])
        self.model.recompile()

    def _config(self) -> tuple[int, ...]:
        return tuple(sw.precision for sw in self._switches)

    # ------------------------------------------------------------------ step
    def step(self) -> list[dict]:
        """Read every layer's statistics of this step, decide, switch; returns the switch events made now.

        With `defer_read` (the default on CUDA) the statistics of an observed step are copied to the host
        without waiting and decided on at the next call: no device sync on the training loop's critical path,
        and a switch takes effect one step later (each event says `applied_from_step`)."""
        step, currents = self._steps, list(self._config())
        for i, current in enumerate(currents):
            self._history[i].append(current)
        read = self._read(step, currents) if self._switches[0].observe else None
        if read is None:  # an unobserved step: count its FLOPs as the last observed step's
            for i, current in enumerate(currents):
                self._flops[current] += self._last_flops[i]
        events = []
        if not self.defer_read:
            events = self._decide(*read) if read is not None else []
        else:
            events = self._decide(*self._inflight) if self._inflight is not None else []
            self._inflight = read
        self._steps += 1
        self._arm()
        return events

    def _read(self, step: int, currents: list[int]) -> tuple:
        """Gather (and all-reduce) this step's statistics, start the next step's on the device, start the copy
        to the host. A handful of kernels whatever the number of layers."""
        stats = torch.stack([sw.stats.detach() for sw in self._switches]).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
        with torch.no_grad():
            torch._foreach_copy_([sw.stats for sw in self._switches], list(self.kind.reset_rows(stats).unbind(0)))
        if not self.defer_read or stats.device.type != "cuda":
            return step, currents, stats.cpu(), None
        # Two pinned buffers taken in turn: the copy into one may still be in flight while the other is
        # decided on, and no step allocates pinned memory (a host-side cost on every observed step).
        if len(self._pinned) != 2 or self._pinned[0].shape != stats.shape:
            self._pinned = [torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True) for _ in range(2)]
        waiting = self._inflight[2] if self._inflight is not None else None  # not yet decided on: keep it
        host = self._pinned[1] if waiting is self._pinned[0] else self._pinned[0]
        host.copy_(stats, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return step, currents, host, done

    def _drain(self) -> None:
        """Decide on deferred statistics now (what the next step() would do), so read-outs are complete."""
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            self._decide(*inflight)

    def _decide(self, step: int, currents: list[int], host: torch.Tensor, done) -> list[dict]:
        """Judge every layer on the statistics of observed step `step` and apply what may be applied."""
        if done is not None:
            done.synchronize()
        rows = host.tolist()
        nonfinite = self._slot["nonfinite"]
        for i, row in enumerate(rows):
            current = currents[i]
            self._last_flops[i] = 3 * row[self._slot["flops"]]
            self._flops[current] += self._last_flops[i]
            if current != self._switches[i].precision:  # switched since (deferred read): judge the new one
                self._prev[i] = self.kind.previous(row, self._prev[i])
                continue
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
            if target != current and self._pending.get(i, (None,))[0] != target:  # the first reason stays
                stats_now = {k: _num(row[self._slot[k]]) for k in self.kind.event_stats}
                self._pending[i] = (target, bad, stats_now, step)
            elif target == current and not calm and self._pending.get(i, (current,))[0] < current:
                del self._pending[i]  # a waiting way back, and the layer is in trouble again: it stays
            self._prev[i] = self.kind.previous(row, self._prev[i])
        return self._apply_pending(step)

    def _apply_pending(self, step: int) -> list[dict]:
        """Apply the decisions waiting in `_pending` as one new configuration, unless the last switch was less
        than `min_steps_between_switches` ago (they wait) or the configuration would be one too many (refused)."""
        if not self._pending or (self._last_switch is not None
                                 and step - self._last_switch < self.min_steps_between_switches):
            return []
        pending, self._pending = self._pending, {}
        config = list(self._config())
        for i, (target, *_rest) in pending.items():
            config[i] = target
        new = tuple(config) not in self._configs
        names = self.precisions_names
        if new and len(self._configs) >= self.max_configurations:
            why = (f"would make configuration {len(self._configs) + 1} > max_configurations="
                   f"{self.max_configurations} (each costs a compilation under torch.compile); raise "
                   "max_configurations to allow it")
            for i, (target, reason, stats_now, seen) in pending.items():
                self._refused.append({"step": step, "layer": self.layers[i], "from": names[self._switches[i].precision],
                                      "to": names[target], "reason": reason, "refused": why})
            return []
        if new:
            self._configs.append(tuple(config))
        events = []
        for i, (target, reason, stats_now, seen) in pending.items():
            if seen != step:
                reason = f"{reason} (decided at step {seen}, held by min_steps_between_switches)"
            events.append({"step": step, "applied_from_step": self._steps + 1, "layer": self.layers[i],
                           "from": names[self._switches[i].precision], "to": names[target], "reason": reason,
                           "stats": stats_now,
                           "configuration": self._configs.index(tuple(config)), "new_configuration": new})
            self._switches[i].precision = target
        self._last_switch = step
        self._events.extend(events)
        return events

    def _arm(self) -> None:
        """Set the sample and observe flags of every layer for the next step."""
        nxt = self._steps
        observe = nxt % self.observe_every == 0
        if self.sample_every is None:  # every observed step (its own graph variant would cost a compilation)
            sample = observe
        else:  # the first observed step at or after each multiple of sample_every
            sample = observe and self.sample_every > 0 and nxt > 0 and nxt % self.sample_every < self.observe_every
        for sw in self._switches:
            sw.sample, sw.observe = int(sample), int(observe)

    # ------------------------------------------------------------------ read-outs
    def precisions(self) -> dict[str, str]:
        """{layer: "fp8" | "fp16" | "bf16" | "fp32"} now."""
        return {name: self.precisions_names[sw.precision] for name, sw in zip(self.layers, self._switches)}

    def set_precision(self, layer: str, precision: str) -> None:
        """Pin a layer's precision by hand (recorded in the timeline with reason "set by hand")."""
        names = self.precisions_names
        if layer not in self.layers or precision not in names:
            raise ConfigError(f"set_precision({layer!r}, {precision!r}): layers are {self.layers}, precisions "
                              f"{list(names)}")
        i = self.layers.index(layer)
        old = self._switches[i].precision
        config = list(self._config())
        config[i] = names.index(precision)
        new = tuple(config) not in self._configs
        if new and len(self._configs) >= self.max_configurations:
            raise ConfigError(f"set_precision({layer!r}, {precision!r}) would make precision configuration "
                              f"{len(self._configs) + 1}, above max_configurations={self.max_configurations} (each "
                              "costs a compilation under torch.compile): create the controller with a larger "
                              "max_configurations")
        if new:
            self._configs.append(tuple(config))
        self._switches[i].precision = names.index(precision)
        self._events.append({"step": self._steps, "applied_from_step": self._steps, "layer": layer,
                             "from": names[old], "to": precision,
                             "reason": "set by hand", "stats": {},
                             "configuration": self._configs.index(tuple(config)), "new_configuration": new})

    def low_flop_fraction(self) -> float:
        """Share of the GEMM FLOPs run so far (forward and both backward GEMMs) that ran in the low precision."""
        self._drain()
        total = sum(self._flops)
        return self._flops[LOW] / total if total else 1.0

    fp8_flop_fraction = low_flop_fraction  # the FP8 controller's name for it

    def timeline(self) -> dict:
        """JSON-able record: layers, steps, switch events with reasons, per-layer precision segments, the
        precision configurations made (each one graph variant set under torch.compile) and refused switches."""
        self._drain()
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
                "patience": self.patience, "configurations": len(self._configs),
                "max_configurations": self.max_configurations, "refused": list(self._refused),
                "dynamo_graphs": _dynamo_graphs() - self._graphs0}

    def plot(self, path: str) -> str:
        """Write the precision timeline as a picture: PNG with matplotlib when `path` ends in .png and
        matplotlib is installed, else a self-written SVG (path's suffix replaced by .svg). Returns the path."""
        from rewriter.adaptive_plot import write_picture

        return write_picture(self.timeline(), path)


def _dynamo_graphs() -> int:
    """Graphs dynamo compiled so far in this process (all models: the timeline records the difference)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _raise_recompile_limit(needed: int) -> None:
    """Let dynamo keep `needed` variants of one frame (torch >= 2.6 names it recompile_limit, older
    cache_size_limit); never lowers a limit the user set higher."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), needed))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * needed)
    elif hasattr(config, "accumulated_cache_size_limit"):
        config.accumulated_cache_size_limit = max(config.accumulated_cache_size_limit, 4 * needed)


def _num(v: float):
    return v if math.isfinite(v) else None
