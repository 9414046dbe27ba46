"""convert(): capture -> analysis passes -> rewrite passes -> backend."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch.fx as fx
import torch.nn as nn

from passes.analysis import Assign, Classify, Ranges, Sensitivity
from passes.analysis._calibration import as_batches
from passes.analysis.fp8_cost import Fp8Cost, Fp8Options, resolve_options
from passes.infra import Pass, PassManager
from passes.rewrite import (CastWeights, CausalAttention, ChannelsLast, FoldBatchNorm, FoldCasts, FuseGelu,
                            FuseLinears, InsertCasts, PaddingMask, SigmoidGelu)
from rewriter import meta
from rewriter.capture import capture, normalize_inputs
from rewriter.config import ConvertConfig, Mode, Precision
from rewriter.errors import ConfigError

__all__ = ["convert", "is_converted", "build_passes", "INFO_KEY"]

INFO_KEY = "rewriter"  # key of the conversion record in GraphModule.meta


def is_converted(model: Any) -> bool:
    """True for a GraphModule produced by `convert` (or loaded back from a converted .pt2), also
    inside a backend wrapper (backends.torch_backend.graph_module_of)."""
    if not isinstance(model, fx.GraphModule):
        from backends.torch_backend import graph_module_of
        from rewriter.errors import InputError

        try:
            model = graph_module_of(model)
        except InputError:
            return False
    if INFO_KEY in model.meta:
        return True
    return any(meta.CREATED in n.meta or meta.DECISION in n.meta for n in model.graph.nodes)


def build_passes(config: ConvertConfig, *, calibration=None, reference_fn=None, held_out=None,
                 progress=None, fp8: Fp8Options | None = None) -> list[Pass]:
    """The pass pipeline for a configuration, in order.

    With `calibration`, Ranges (and Sensitivity when `config.tolerance` is set) measure before Assign;
    `held_out` batches, when given, are only used to report the final error; `progress(step, text)`
    receives their per-batch and per-run progress. precision="fp8" adds Fp8Cost after Assign and the
    Fp8 rewrite before CastWeights, configured by `fp8` (passes/analysis/fp8_cost.Fp8Options).
    """
    # canonicalisations first (exact rewrites of the captured graph), then batch-norm folding
    analysis: list[Pass] = [CausalAttention(), PaddingMask(), FuseGelu(), FoldBatchNorm(config), Classify()]
    if calibration is not None:
        batches = as_batches(calibration)  # once, so a generator can feed both passes
        analysis.append(Ranges(batches, config, progress=progress))
        if config.tolerance is not None:
            analysis.append(Sensitivity(batches, config, held_out=held_out, progress=progress))
    analysis.append(Assign(config))
    analysis.append(FuseLinears(config))  # after the per-linear decisions, before fp8_cost sizes GEMMs
    rewrite: list[Pass] = [InsertCasts(config), FoldCasts(), CastWeights(config), ChannelsLast(config)]
    if config.precision is Precision.FP8:
        from passes.rewrite.fp8 import Fp8Rewrite

        fp8 = resolve_options(fp8, config)
        analysis.append(Fp8Cost(config, fp8))
        at = next(i for i, p in enumerate(rewrite) if isinstance(p, CastWeights))
        rewrite.insert(at, Fp8Rewrite(config, fp8))  # weights quantized from fp32, before cast_weights
    if config.compiled_by_inductor() or (config.precision is Precision.FP8 and fp8.fused_quantization):
        rewrite.append(SigmoidGelu())  # inductor's tanh is slow; eager's gelu is one kernel
    return analysis + rewrite


def convert(model: nn.Module, example_inputs: Any = None, example_kwargs: dict | None = None, *,
            precision: str = "fp16", overrides: Any = None, calibration: Iterable | None = None,
            tolerance: float | None = None, metric: Callable | None = None, mode: str = "eval",
            keep_io_types: bool = True, dynamic_batch: bool = True,
            config: ConvertConfig | None = None, progress: bool = False,
            fp8: Fp8Options | None = None, backend: str = "eager",
            backend_options: dict | None = None) -> fx.GraphModule:
    """Rewrite `model` for lower precision.

    Args:
        model: the fp32 nn.Module; it is never modified.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        example_kwargs: keyword inputs besides the positional ones.
        precision: "fp16", "bf16" or "fp8".
        overrides: {"softmax": "fp16", "re:encoder\\.layer\\.0\\..*": "fp32", "classifier": "fp32"}
            or ["KEY=PRECISION", ...]; precedence: op type < module regex < exact module path.
        calibration: iterable of example-input tuples for measured decisions.
        tolerance: output error budget (relative L2) for measured decisions.
        metric: metric(reference, candidate) -> float used instead of relative L2.
        mode: "eval" (weights stored 16-bit) or "train" (fp32 master weights).
        keep_io_types: inputs and outputs keep their dtypes.
        dynamic_batch: keep dimension 0 dynamic when the model allows it.
        config: a ready ConvertConfig instead of the keyword arguments above.
        progress: print a line per step.
        fp8: with precision="fp8", how GEMMs are converted (scaling granularity, cost-model
            thresholds, target GPU); see passes/analysis/fp8_cost.Fp8Options.
        backend: "eager" (default), "compile" (torch.compile of the converted graph) or
            "cuda_graphs" (captured per input shape and replayed; GPU, eval only); see
            backends/torch_backend.py.
        backend_options: options of the backend, e.g. {"compile_mode": "max-autotune-no-cudagraphs"},
            {"dynamic": False}, {"clone_outputs": False, "max_graphs": 4}.

    Returns:
        A torch.fx.GraphModule called exactly like `model`. `gm.meta["rewriter"]` records how it
        was made; `rewriter.diff(model, gm)` shows what changed and why. With backend "compile" or
        "cuda_graphs": a `backends.torch_backend.TorchBackendModule` (an nn.Module) whose
        `.graph_module` is that GraphModule, with `.graph` and `.meta` read through to it;
        `backends.torch_backend.graph_module_of(result)` returns the GraphModule in every case.

    Example:
        >>> fast = rewriter.convert(model, (x,), precision="bf16")
        >>> fast(x).dtype == model(x).dtype
        True
    """
    if config is None:
        config = ConvertConfig(precision=precision, overrides=overrides, mode=mode,
                               keep_io_types=keep_io_types, dynamic_batch=dynamic_batch,
                               tolerance=tolerance, metric=metric, backend=backend,
                               backend_options=backend_options)
    if is_converted(model):
        done = model.meta.get(INFO_KEY, {}).get("config", {}).get("precision")
        if done not in (None, config.precision.value):
            raise ConfigError(f"this model was already converted to {done}; convert the original "
                              f"fp32 model to {config.precision.value} instead")
        return _apply_backend(model, config)
    if config.backend != "eager":  # fail before capturing when the backend cannot run here
        from backends.torch_backend import check_available

        check_available(config.backend)
    if tolerance is not None and calibration is None and config.tolerance is not None:
        raise ConfigError("tolerance needs calibration data: pass calibration=[(x1,), (x2,), ...]")
    say = _reporter(progress)
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    if config.mode is Mode.TRAIN:  # a training and an evaluation graph on one set of fp32 parameters
        from rewriter.training import convert_train

        gm, captured = convert_train(model, args, kwargs, config, calibration=calibration, say=say,
                                     fp8=fp8)
    else:
        say("capture", f"tracing {type(model).__name__}")
        captured = capture(model, args, kwargs, dynamic_batch=config.dynamic_batch, train=False)
        say("capture", f"{captured.method}, {len(captured.graph_module.graph.nodes)} nodes"
            + "".join(f"; {n}" for n in captured.notes))
        gm = captured.graph_module
        passes = build_passes(config, calibration=calibration, progress=say, fp8=fp8)
        PassManager(passes, on_pass=lambda name, s, m: say(name, f"{s:.2f}s{' (modified)' if m else ''}"))(gm)
    gm.meta[INFO_KEY] = {
        "config": config.to_dict(),
        "capture": captured.method,
        "dynamic_batch": captured.dynamic_batch,
        "notes": captured.notes,
        "model": type(model).__name__,
    }
    gm.meta["rewriter.example_inputs"] = (args, kwargs)
    if config.backend != "eager":
        say("backend", f"{config.backend} {config.backend_kwargs() or ''}".strip())
    return _apply_backend(gm, config)


def _apply_backend(model, config: ConvertConfig):
    """The converted GraphModule run by `config.backend`: itself for eager (with the fast forward of
    backends/fast_forward.py), else a wrapper of it."""
    from backends.torch_backend import graph_module_of, optimize

    return optimize(graph_module_of(model), mode=config.backend, **config.backend_kwargs())


def _reporter(enabled: bool):
    import sys

    def say(step: str, text: str) -> None:
        if enabled:
            print(f"[rewrite] {step}: {text}", file=sys.stderr, flush=True)
    return say
