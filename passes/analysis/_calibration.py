"""Shared plumbing of the measuring passes (ranges, sensitivity): calibration batches and graph runs.

Not a pass. `CalibrationData` is the normalised form of what the user gave as `calibration=`: a tuple
of (args, kwargs) batches, built once so that a one-shot generator can feed both passes.
`flat_inputs` turns one batch into the values of the graph's placeholders, the way the captured
GraphModule's own forward would (torch.export graphs flatten (args, kwargs) with their in_spec),
so the passes can run the graph node by node with a `torch.fx.Interpreter`.

Example:
    >>> data = as_batches([(x1,), (x2,)])            # or a DataLoader, or dicts of keyword inputs
    >>> flat = flat_inputs(gm, *data.batches[0], index=0)
    >>> torch.fx.Interpreter(gm).run(*flat, enable_io_processing=False)
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from rewriter.errors import ConfigError, InputError

__all__ = ["CalibrationData", "as_batches", "flat_inputs", "graph_device", "float_leaves",
           "structured_output", "rel_l2", "Progress", "quiet"]

Progress = Callable[[str, str], None]


def quiet(step: str, text: str) -> None:
    """Progress callback that prints nothing."""


@dataclasses.dataclass(frozen=True)
class CalibrationData:
    """Calibration batches, each `(args, kwargs)`, materialised once."""

    batches: tuple[tuple[tuple, dict], ...]

    def __len__(self) -> int:
        return len(self.batches)


def _one_batch(item: Any, index: int) -> tuple[tuple, dict]:
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, Mapping):  # dicts and transformers' BatchEncoding (a UserDict)
        return (), dict(item)
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    raise InputError(f"calibration batch {index} is a {type(item).__name__}; each batch must be a "
                     "tensor, a tuple of the model's positional inputs or a dict of keyword inputs")


def as_batches(calibration: Any, *, what: str = "calibration") -> CalibrationData:
    """Normalise an iterable of batches (list, DataLoader, generator) into `CalibrationData`.

    Args:
        calibration: iterable whose items are a tensor, a tuple/list of positional inputs or a dict
            of keyword inputs; a `CalibrationData` is returned as it is.
        what: name used in error messages ("calibration", "held-out batches").
    """
    if isinstance(calibration, CalibrationData):
        return calibration
    if calibration is None:
        raise ConfigError(f"{what} is None: pass an iterable of example-input tuples, e.g. [(x1,), (x2,)]")
    if isinstance(calibration, (torch.Tensor, Mapping)):
        raise ConfigError(f"{what} must be an iterable of batches, not a single "
                          f"{type(calibration).__name__}: write [(x,)] for one batch")
    try:
        items = list(calibration)
    except TypeError:
        raise ConfigError(f"{what} must be an iterable of batches (a list of input tuples or a "
                          f"DataLoader), got {type(calibration).__name__}") from None
    if not items:
        raise ConfigError(f"{what} is empty: give at least one batch of example inputs")
    return CalibrationData(tuple(_one_batch(item, i) for i, item in enumerate(items)))


def graph_device(gm: fx.GraphModule) -> torch.device:
    """Device of the graph's parameters and buffers (CPU when it has none)."""
    for t in list(gm.parameters()) + list(gm.buffers()):
        return t.device
    return torch.device("cpu")


def _to_device(tree: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, tree)


def flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict, *, index: int = 0,
                what: str = "calibration batch") -> list:
    """Values of `gm`'s placeholders, in order, for one batch called like the original model.

    Extra trailing positional values that the model's forward cannot take (the labels of a
    `DataLoader` over `(x, y)` pairs) are dropped.
    """
    device = graph_device(gm)
    args, kwargs = _to_device(tuple(args), device), _to_device(dict(kwargs), device)
    sig = inspect.signature(gm.forward)
    params = list(sig.parameters.values())
    if not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                      inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        free = [p for p in positional if p.name not in kwargs]
        if len(args) > len(free):
            args = args[:len(free)]
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise InputError(f"{what} {index} does not match the model's inputs {sig}: {exc}. Give each "
                         "batch as a tuple of the positional inputs (or a dict of keyword inputs) with "
                         "the same structure as the example inputs") from None
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None or info.in_spec is None:
        bound.apply_defaults()
        values = []
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                name = str(node.target).lstrip("*")
                values.append(bound.arguments.get(name, node.args[0] if node.args else None))
        return values
    from torch.fx._pytree import tree_flatten_spec

    spec, names = info.in_spec, list(info.orig_args)
    missing = [n for n in names if n not in bound.arguments]
    if missing:
        raise InputError(f"{what} {index} lacks the inputs {missing} that the example inputs had; "
                         "calibration batches must have the same structure as the example inputs")
    has_kwargs = (spec.type is tuple and spec.num_children == 2 and spec.child(0).type is tuple
                  and spec.child(1).type is dict)
    try:
        if has_kwargs:
            count = spec.child(0).num_children
            pos = [bound.arguments[n] for n in names[:count]]
            kw = {key: bound.arguments[n] for key, n in zip(spec.child(1).context, names[count:])}
            return list(tree_flatten_spec((pos, kw), spec))
        return list(tree_flatten_spec([bound.arguments[n] for n in names], spec))
    except Exception as exc:
        raise InputError(f"{what} {index} does not have the structure of the example inputs "
                         f"({exc}); nested tuples and dicts must match") from None


def structured_output(gm: fx.GraphModule, raw: Any) -> Any:
    """What `gm(...)` returns, from what an Interpreter run with io processing off returned."""
    codegen = gm.graph._codegen
    if getattr(codegen, "pytree_info", None) is not None:
        return codegen.process_outputs(raw)
    return raw


def float_leaves(tree: Any) -> list[torch.Tensor]:
    """Floating-point tensors of an output structure, in pytree order."""
    return [v for v in pytree.tree_leaves(tree)
            if isinstance(v, torch.Tensor) and v.is_floating_point()]


def rel_l2(reference: Iterable[torch.Tensor], candidate: Iterable[torch.Tensor]) -> float:
    """Relative L2 error ||c - r|| / ||r|| over all float outputs, in float64; inf if c is not finite."""
    num = den = 0.0
    for r, c in zip(reference, candidate):
        r64, c64 = r.detach().double(), c.detach().double()
        if not bool(torch.isfinite(c64).all()):
            return math.inf
        r64 = torch.nan_to_num(r64)
        num += float(((c64 - r64) ** 2).sum())
        den += float((r64 ** 2).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)
