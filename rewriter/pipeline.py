"""convert(): capture -> the passes of PASS_TABLE, stage by stage -> backend."""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Iterable

import torch.fx as fx
import torch.nn as nn

from rewriter import meta
from rewriter.backends.torch_backend import check_available, graph_module_of, is_converted, optimize
from rewriter.capture import CAPTURE_LOCK, capture, normalize_inputs
from rewriter.config import ConvertConfig, Mode, Precision
from rewriter.errors import ConfigError
from rewriter.fp8_options import Fp8Options, resolve_options
from rewriter.passes import (Assign, BudgetLowering, CastWeights, CausalAttention, ChannelsLast, Classify, FoldBatchNorm,
                             FoldCasts, Fp8Cost, Fp8Rewrite, FuseGelu, FuseLinears, InsertCasts, PaddingMask,
                             Ranges, SaturateConstants, Sensitivity, SigmoidGelu, TrainBatchNorm,
                             TransferMeasurements)
from rewriter.passes.analysis._calibration import as_batches
from rewriter.passes.infra import Pass, PassManager
from rewriter.training import TrainEvalGraphModule, capture_train_eval

__all__ = ["convert", "reporter", "is_converted", "build_passes", "PassContext", "Step", "PASS_TABLE", "STAGES", "INFO_KEY"]

INFO_KEY = meta.INFO  # key of the conversion record in GraphModule.meta


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What decides which passes run on one graph.

    Args:
        config: the conversion configuration.
        graph: "eval" or "train": which of the captured graphs (mode="train" converts both).
        calibration: calibration batches (measured on the evaluation graph only), or None.
        held_out: batches only used to report the final error of the accuracy-budget search.
        progress: progress callback `progress(step, text)`.
        fp8: the resolved Fp8Options when precision="fp8" (`config.fp8` unless build_passes got others).
        source: for a training graph, the converted evaluation graph whose measurements it copies.
    """

    config: ConvertConfig
    graph: str = "eval"
    calibration: list | None = None
    held_out: Any = None
    progress: Callable | None = None
    fp8: Fp8Options | None = None
    source: fx.GraphModule | None = None

    @property
    def eval_mode(self) -> bool:
        return self.config.mode is Mode.EVAL

    @property
    def train_mode(self) -> bool:
        return self.config.mode is Mode.TRAIN

    @property
    def is_fp8(self) -> bool:
        return self.config.precision is Precision.FP8


@dataclasses.dataclass(frozen=True)
class Step:
    """One row of the pass table: the stage, how to build the pass, and when it runs (code and words)."""

    stage: str
    make: Callable[[PassContext], Pass]
    when: Callable[[PassContext], bool]
    condition: str


STAGES = ("canonicalize", "analysis", "fuse", "plan", "lower", "target")


def _always(ctx: PassContext) -> bool:
    return True


def _for_inductor(ctx: PassContext) -> bool:
    # inductor's tanh is slow (libdevice); eager's gelu is one kernel, the sigmoid form seven
    return ctx.config.compiled_by_inductor() or (ctx.is_fp8 and ctx.fp8.fused_quantization)


# The pipeline, in order. No pass decides by itself whether it runs: this table does.
PASS_TABLE: tuple[Step, ...] = (
    Step("canonicalize", lambda c: CausalAttention(), _always, "always"),
    Step("canonicalize", lambda c: PaddingMask(), _always, "always"),
    Step("canonicalize", lambda c: FuseGelu(), _always, "always"),
    Step("canonicalize", lambda c: FoldBatchNorm(c.config), lambda c: c.eval_mode, 'mode="eval"'),
    Step("analysis", lambda c: TransferMeasurements(c.source), lambda c: c.source is not None,
         'the training graph of mode="train" (copies the evaluation graph\'s measurements)'),
    Step("analysis", lambda c: Classify(), _always, "always"),
    Step("analysis", lambda c: Ranges(c.calibration, c.config, progress=c.progress),
         lambda c: c.calibration is not None, "with calibration"),
    Step("analysis", lambda c: Sensitivity(c.calibration, c.config, held_out=c.held_out, progress=c.progress),
         lambda c: c.calibration is not None and c.config.tolerance is not None,
         "with calibration and a tolerance"),
    Step("analysis", lambda c: BudgetLowering(c.calibration, c.config, held_out=c.held_out, progress=c.progress),
         lambda c: c.calibration is not None and c.config.tolerance is not None and c.config.budget_lowering,
         "with calibration and a tolerance, unless budget_lowering=False"),
    Step("analysis", lambda c: Assign(c.config), _always, "always"),
    Step("fuse", lambda c: FuseLinears(c.config), lambda c: c.eval_mode, 'mode="eval"'),
    Step("plan", lambda c: Fp8Cost(c.config, c.fp8), lambda c: c.is_fp8, 'precision="fp8"'),
    Step("lower", lambda c: InsertCasts(c.config), _always, "always"),
    Step("lower", lambda c: FoldCasts(), _always, "always"),
    Step("lower", lambda c: SaturateConstants(), _always, "always"),
    Step("lower", lambda c: Fp8Rewrite(c.config, c.fp8), lambda c: c.is_fp8, 'precision="fp8"'),
    Step("lower", lambda c: CastWeights(c.config), lambda c: c.eval_mode, 'mode="eval"'),
    Step("lower", lambda c: TrainBatchNorm(c.config), lambda c: c.train_mode, 'mode="train"'),
    Step("target", lambda c: ChannelsLast(c.config), lambda c: c.eval_mode, 'mode="eval"'),
    Step("target", lambda c: SigmoidGelu(), _for_inductor,
         'graphs inductor compiles (backend="compile", or FP8 with fused quantization)'),
)


def build_passes(config: ConvertConfig, *, calibration=None, reference_fn=None, held_out=None,
                 progress=None, fp8: Fp8Options | None = None, graph: str = "eval",
                 source: fx.GraphModule | None = None) -> list[Pass]:
    """The passes of PASS_TABLE that run for this configuration and graph, in table order.

    With `calibration`, Ranges (and Sensitivity when `config.tolerance` is set) measure before Assign;
    `held_out` batches, when given, are only used to report the final error; `progress(step, text)`
    receives their per-batch and per-run progress. `graph="train"` with `source` (the converted
    evaluation graph) builds the training graph's passes of a mode="train" conversion.
    """
    fp8 = resolve_options(fp8, config) if config.precision is Precision.FP8 else None  # None: config.fp8
    batches = as_batches(calibration) if calibration is not None else None  # once: a generator feeds two passes
    ctx = PassContext(config, graph, batches, held_out, progress, fp8, source)
    return [step.make(ctx) for step in PASS_TABLE if step.when(ctx)]


def convert(model: nn.Module, example_inputs: Any = None, example_kwargs: dict | None = None, *,
            calibration: Iterable | None = None, progress: bool = False, config: ConvertConfig | None = None,
            **options: Any) -> fx.GraphModule:
    """Rewrite `model` for lower precision.

    Args:
        model: the fp32 nn.Module; it is never modified.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        example_kwargs: keyword inputs besides the positional ones.
        calibration: iterable of example-input tuples for measured decisions (ranges, and with a
            `tolerance` the accuracy-budget search).
        progress: print a line per step.
        config: a ready `rewriter.ConvertConfig`, instead of keyword options (not both).
        **options: any field of `rewriter.ConvertConfig`, validated the same way, e.g.
            precision: "fp16", "bf16" or "fp8".
            overrides: {"softmax": "fp16", "re:encoder\\.layer\\.0\\..*": "fp32", "classifier": "fp32"}
                or ["KEY=PRECISION", ...]; precedence: op type < module regex < exact module path.
            tolerance: output error budget (relative L2) for measured decisions; needs calibration.
            metric: metric(reference, candidate) -> float used instead of relative L2.
            mode: "eval" (weights stored 16-bit) or "train" (fp32 master weights).
            keep_io_types: inputs and outputs keep their dtypes.
            dynamic_batch: keep dimension 0 dynamic when the model allows it.
            fp8: with precision="fp8", a `rewriter.Fp8Options` (scaling granularity, cost-model
                thresholds, target GPU).
            backend: "eager" (default), "compile" (torch.compile of the converted graph) or
                "cuda_graphs" (captured per input shape and replayed; GPU, eval only).
            backend_options: a `rewriter.BackendOptions` or a dict of its fields, e.g.
                {"compile_mode": "max-autotune-no-cudagraphs"}, {"clone_outputs": False, "max_graphs": 4}.
            dynamic_shapes: torch.export's `dynamic_shapes` for the inputs, used as given; by default every
                dimension the model allows stays dynamic (batch, sequence length, image size), and a call
                outside the captured range is an InputError naming the input and the allowed range.
            static: capture with every dimension static.

    Returns:
        A torch.fx.GraphModule called exactly like `model`. `gm.meta["rewriter"]` records how it
        was made; `rewriter.diff(model, gm)` shows what changed and why. With backend "compile" or
        "cuda_graphs": a `TorchBackendModule` (an nn.Module) whose `.graph_module` is that GraphModule,
        with `.graph` and `.meta` read through to it; `rewriter.graph_module_of(result)` returns the
        GraphModule in every case.

    Raises:
        ConfigError: an invalid option (saying what to write), `config=` together with keyword options,
            or a `tolerance` without `calibration`.

    Example:
        >>> fast = rewriter.convert(model, (x,), precision="bf16")
        >>> fast(x).dtype == model(x).dtype
        True
    """
    with CAPTURE_LOCK:  # torch.export and fake tensors are not thread-safe: one conversion at a time
        return _convert(model, example_inputs, example_kwargs, calibration=calibration, progress=progress,
                        config=config, **options)


def _convert(model, example_inputs, example_kwargs, *, calibration, progress, config, **options):
    config = ConvertConfig.from_options(config, **options)
    if config.tolerance is not None and calibration is None:
        raise ConfigError(f"tolerance needs calibration data: pass calibration=[(x1,), (x2,), ...] (batches of "
                          f"example inputs the error budget tolerance={config.tolerance!r} is measured on), "
                          "or leave tolerance out")
    if is_converted(model):
        done = model.meta.get(INFO_KEY, {}).get("config", {}).get("precision")
        if done not in (None, config.precision.value):
            raise ConfigError(f"this model was already converted to {done}; convert the original "
                              f"fp32 model to {config.precision.value} instead")
        return _apply_backend(model, config)
    if config.backend != "eager":  # fail before capturing when the backend cannot run here
        check_available(config.backend)
    say = reporter(progress)
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    warned = _input_warnings(model, config)
    if config.mode is Mode.TRAIN:  # a training and an evaluation graph on one set of fp32 parameters
        gm, captured = _convert_train(model, args, kwargs, config, calibration=calibration, say=say)
    else:
        say("capture", f"tracing {type(model).__name__}")
        captured = capture(model, args, kwargs, dynamic_batch=config.dynamic_batch,
                           dynamic_shapes=config.dynamic_shapes, static=config.static,
                           time_limit=config.capture_time_limit, train=False)
        say("capture", f"{captured.method}, {len(captured.graph_module.graph.nodes)} nodes"
            + "".join(f"; {n}" for n in captured.notes))
        gm = captured.graph_module
        passes = build_passes(config, calibration=calibration, progress=say)
        PassManager(passes, on_pass=lambda name, s, m: say(name, f"{s:.2f}s{' (modified)' if m else ''}"))(gm)
    gm.meta[INFO_KEY] = {
        "config": config.to_dict(),
        "capture": captured.method,
        "dynamic_batch": captured.dynamic_batch,
        "input_shapes": captured.input_shapes,
        "notes": [f"warning: {w}" for w in warned] + list(captured.notes),
        "model": type(model).__name__,
    }
    if warned:
        gm.meta[INFO_KEY]["warnings"] = warned
    gm.meta[meta.EXAMPLE_INPUTS] = (args, kwargs)
    if config.backend != "eager":
        say("backend", f"{config.backend} {config.backend_kwargs() or ''}".strip())
    return _apply_backend(gm, config)


def _convert_train(model: nn.Module, args: tuple, kwargs: dict, config: ConvertConfig, *, calibration,
                   say) -> tuple[TrainEvalGraphModule, Any]:
    """mode="train": both graphs captured (rewriter/training.py), the passes of PASS_TABLE on each, joined
    into one TrainEvalGraphModule on the fp32 parameters. Returns (it, the training graph's Captured)."""
    # the passes first: a configuration they refuse fails before the two captures
    eval_passes = build_passes(config, calibration=calibration, progress=say)
    captured = capture_train_eval(model, args, kwargs, config, say=say)

    def report(mode):
        return lambda name, s, m: say(f"{mode}:{name}", f"{s:.2f}s{' (modified)' if m else ''}")

    eval_gm, train_gm = captured["eval"].graph_module, captured["train"].graph_module
    PassManager(eval_passes, on_pass=report("eval"))(eval_gm)
    # Measurements are not repeated on the training graph (dropout noise, statistics updates): the
    # decisions made on the eval graph are copied over (TransferMeasurements, the pass table's row for
    # the training graph) and Assign applies them with the overrides.
    train_passes = build_passes(dataclasses.replace(config, tolerance=None, metric=None), graph="train",
                                source=eval_gm)
    PassManager(train_passes, on_pass=report("train"))(train_gm)
    gm = TrainEvalGraphModule(train_gm, eval_gm, class_name=type(model).__name__)
    gm.train(model.training)
    return gm, captured["train"]


def _input_warnings(model: nn.Module, config: ConvertConfig) -> list[str]:
    """Loud warnings about the input model, also kept in the conversion record ("warnings"): weights
    that are NaN/Inf (every error measurement is then meaningless), and a model left in train mode
    converted with mode="eval" (dropout and batch statistics are then evaluation behaviour)."""
    import warnings

    import torch

    found = []
    if isinstance(model, nn.Module):
        bad = [name for name, t in list(model.named_parameters()) + list(model.named_buffers())
               if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.detach()).all())]
        if bad:
            found.append(f"the model's weights hold NaN or Inf values ({', '.join(bad[:5])}"
                         f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}): outputs and error "
                         "measurements are not meaningful; fix or reload the weights")
        if config.mode is Mode.EVAL and any(m.training for m in model.modules()):
            found.append(f"{type(model).__name__} is in training mode but is converted with mode='eval': "
                         "dropout is off and batch norm uses its running statistics in the result. Call "
                         "model.eval() first to silence this, or pass mode='train' to keep training behaviour")
    for text in found:
        warnings.warn(f"rewriter.convert: {text}", UserWarning, stacklevel=4)
    return found


def _apply_backend(model, config: ConvertConfig):
    """The converted GraphModule run by `config.backend`: itself for eager (with the fast forward of
    backends/fast_forward.py), else a wrapper of it."""
    return optimize(graph_module_of(model), mode=config.backend, **config.backend_kwargs())


def reporter(enabled: bool):
    def say(step: str, text: str) -> None:
        if enabled:
            print(f"[rewrite] {step}: {text}", file=sys.stderr, flush=True)
    return say
