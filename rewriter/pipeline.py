"""convert(): capture -> analysis passes -> rewrite passes -> backend."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from passes.analysis import Assign, Classify
from passes.infra import Pass, PassManager
from passes.rewrite import CastWeights, ChannelsLast, FoldBatchNorm, FoldCasts, InsertCasts
from rewriter import meta
from rewriter.capture import capture, normalize_inputs
from rewriter.config import ConvertConfig
from rewriter.errors import ConfigError

__all__ = ["convert", "is_converted", "build_passes", "INFO_KEY"]

INFO_KEY = "rewriter"  # key of the conversion record in GraphModule.meta


def is_converted(model: Any) -> bool:
    """True for a GraphModule produced by `convert` (or loaded back from a converted .pt2)."""
    if not isinstance(model, fx.GraphModule):
        return False
    if INFO_KEY in model.meta:
        return True
    return any(meta.CREATED in n.meta or meta.DECISION in n.meta for n in model.graph.nodes)


def build_passes(config: ConvertConfig, *, calibration=None, reference_fn=None) -> list[Pass]:
    """The pass pipeline for a configuration, in order."""
    analysis: list[Pass] = [FoldBatchNorm(config), Classify()]
    analysis.append(Assign(config))
    rewrite: list[Pass] = [InsertCasts(config), FoldCasts(), CastWeights(config), ChannelsLast(config)]
    return analysis + rewrite


def convert(model: nn.Module, example_inputs: Any = None, example_kwargs: dict | None = None, *,
            precision: str = "fp16", overrides: Any = None, calibration: Iterable | None = None,
            tolerance: float | None = None, metric: Callable | None = None, mode: str = "eval",
            keep_io_types: bool = True, dynamic_batch: bool = True,
            config: ConvertConfig | None = None, progress: bool = False) -> fx.GraphModule:
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

    Returns:
        A torch.fx.GraphModule called exactly like `model`. `gm.meta["rewriter"]` records how it
        was made; `rewriter.diff(model, gm)` shows what changed and why.

    Example:
        >>> fast = rewriter.convert(model, (x,), precision="bf16")
        >>> fast(x).dtype == model(x).dtype
        True
    """
    if config is None:
        config = ConvertConfig(precision=precision, overrides=overrides, mode=mode,
                               keep_io_types=keep_io_types, dynamic_batch=dynamic_batch,
                               tolerance=tolerance, metric=metric)
    if is_converted(model):
        done = model.meta.get(INFO_KEY, {}).get("config", {}).get("precision")
        if done not in (None, config.precision.value):
            raise ConfigError(f"this model was already converted to {done}; convert the original "
                              f"fp32 model to {config.precision.value} instead")
        return model
    if tolerance is not None and calibration is None and config.tolerance is not None:
        raise ConfigError("tolerance needs calibration data: pass calibration=[(x1,), (x2,), ...]")
    say = _reporter(progress)
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    say("capture", f"tracing {type(model).__name__}")
    captured = capture(model, args, kwargs, dynamic_batch=config.dynamic_batch,
                       train=config.mode.value == "train")
    say("capture", f"{captured.method}, {len(captured.graph_module.graph.nodes)} nodes"
        + "".join(f"; {n}" for n in captured.notes))
    gm = captured.graph_module
    passes = build_passes(config, calibration=calibration)
    PassManager(passes, on_pass=lambda name, s, m: say(name, f"{s:.2f}s{' (modified)' if m else ''}"))(gm)
    gm.meta[INFO_KEY] = {
        "config": config.to_dict(),
        "capture": captured.method,
        "dynamic_batch": captured.dynamic_batch,
        "notes": captured.notes,
        "model": type(model).__name__,
    }
    gm.meta["rewriter.example_inputs"] = (args, kwargs)
    return gm


def _reporter(enabled: bool):
    import sys

    def say(step: str, text: str) -> None:
        if enabled:
            print(f"[rewrite] {step}: {text}", file=sys.stderr, flush=True)
    return say
