"""Models, inputs and devices named on the command line: factory specs, .pt2 files, trusted pickles.

MODEL is a `.pt2` file (torch.export.save), a factory spec `package.module:callable` (called with no
arguments; needs --input-shape), or a pickled full module (`.pt`/`.pth`) with --trust-pickle.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["Loaded", "is_factory", "load_model", "example_inputs", "load_calibration", "device_from",
           "dynamic_shapes_from"]

_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclasses.dataclass
class Loaded:
    model: Any
    spec: str
    kind: str                   # "pt2" | "factory" | "pickle"
    path: Path | None


def is_factory(spec: str) -> bool:
    return bool(_FACTORY.match(spec)) and not Path(spec).exists()


def _importable_cwd() -> None:
    """Like `python -m`: modules in the working folder are importable (factories, pickled classes)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _load_factory(spec: str):
    import torch.nn as nn

    from rewriter.errors import InputError

    module_name, _, attr = spec.partition(":")
    _importable_cwd()
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise InputError(f"factory spec {spec!r}: cannot import module {module_name!r} "
                         f"({type(exc).__name__}: {exc}). Check the spelling and that the package is "
                         "installed or in the current folder") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"factory spec {spec!r}: module {module_name!r} has no attribute {attr!r}; "
                             "write package.module:function_that_returns_the_model")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        model = obj
    elif callable(obj):
        try:
            model = obj()
        except Exception as exc:
            raise InputError(f"factory spec {spec!r}: calling {attr}() with no arguments failed "
                             f"({type(exc).__name__}: {exc}); point the spec at a function that builds "
                             "the model without arguments") from exc
    else:
        raise InputError(f"factory spec {spec!r}: {attr!r} is a {type(obj).__name__}, not a function")
    if not isinstance(model, nn.Module):
        raise InputError(f"factory spec {spec!r}: {attr}() returned a {type(model).__name__}, not a "
                         "torch.nn.Module")
    return model.eval()


def load_model(spec: str, *, trust_pickle: bool) -> Loaded:
    """MODEL from the command line: a factory spec, a .pt2 program, or (trusted) a pickled module."""
    from rewriter.io import load

    if is_factory(spec):
        return Loaded(_load_factory(spec), spec, "factory", None)
    path = Path(spec)
    if trust_pickle:
        _importable_cwd()
    model = load(path, trust_pickle=trust_pickle)
    kind = "pt2" if path.suffix.lower() == ".pt2" else "pickle"
    if kind == "pickle":
        model = model.eval()
    return Loaded(model, spec, kind, path)


def example_inputs(loaded: Loaded, shapes: list, dtypes: list) -> tuple[tuple, dict]:
    """Inputs for capture: from --input-shape, else from the shapes recorded in a .pt2."""
    import torch

    from rewriter.errors import InputError
    from rewriter.programs import example_inputs as program_inputs, random_tensor

    if dtypes and len(dtypes) not in (1, max(1, len(shapes))):
        raise InputError(f"--input-dtype was given {len(dtypes)} times for {len(shapes)} input shapes: "
                         "give one dtype for all inputs, or one per --input-shape")
    torch_dtypes = [getattr(torch, d) for d in dtypes]
    if loaded.kind == "pt2" and isinstance(loaded.model, torch.fx.GraphModule):
        return program_inputs(loaded.model, shapes=shapes or None, dtypes=torch_dtypes or None,
                              where=loaded.spec)
    if not shapes:
        raise InputError(f"{loaded.spec}: give the input shape(s) with --input-shape, e.g. "
                         "--input-shape 8,3,224,224 (one per tensor input of forward)")
    generator = torch.Generator().manual_seed(0)
    chosen = torch_dtypes if len(torch_dtypes) > 1 else torch_dtypes * len(shapes) or [torch.float32] * len(shapes)
    return tuple(random_tensor(s, d, generator) for s, d in zip(shapes, chosen)), {}


def load_calibration(path_text: str) -> list[tuple]:
    """--calibration FILE: a torch.save'd list of input tuples (read with weights_only: no code runs)."""
    import torch

    from rewriter.errors import InputError

    path = Path(path_text)
    if not path.is_file():
        raise InputError(f"calibration file {path_text!r} does not exist; write one with "
                         "torch.save([(x1,), (x2,)], 'calib.pt')")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"could not read calibration file {path_text!r} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); it must "
                         "be a torch.save'd list of input tuples of tensors, e.g. "
                         "torch.save([(x1,), (x2,)], 'calib.pt')") from exc
    if isinstance(data, torch.Tensor) or not isinstance(data, (list, tuple)) or not data:
        raise InputError(f"calibration file {path_text!r} holds a {type(data).__name__}; it must hold a "
                         "non-empty list of input tuples, e.g. torch.save([(x1,), (x2,)], 'calib.pt')")
    batches = []
    for i, item in enumerate(data):
        item = (item,) if isinstance(item, torch.Tensor) else item
        if not isinstance(item, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in item):
            raise InputError(f"calibration file {path_text!r}: entry {i} is a {type(item).__name__}, not a "
                             "tuple of tensors")
        batches.append(tuple(item))
    return batches


def device_from(text: "str | None"):
    """--device: the torch.device it names (default: cuda when available, else cpu)."""
    import torch

    from rewriter.errors import InputError

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise InputError(f"--device {text!r} is not a device: write cuda, cuda:0 or cpu") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {text}: no CUDA GPU is available here; use --device cpu")
    if device.type not in ("cuda", "cpu"):
        raise InputError(f"--device {text}: only cuda and cpu are supported here")
    return device


def dynamic_shapes_from(spec: dict, model, args: tuple, kwargs: dict):
    """torch.export's `dynamic_shapes` for --dynamic DIMS (parsed as {input: dims}, "*" for every tensor
    input) and the example inputs: a tuple by position, or a dict by parameter name when there are keyword
    inputs; every named dimension is `Dim.DYNAMIC`. An input or dimension that does not exist is an
    InputError naming the inputs there are."""
    import inspect

    import torch

    from rewriter.errors import InputError

    dynamic = torch.export.Dim.DYNAMIC
    names: list[str] = []
    values = list(args)
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind(*args, **kwargs)
        plain = all(signature.parameters[n].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                     inspect.Parameter.KEYWORD_ONLY,
                                                     inspect.Parameter.POSITIONAL_ONLY) for n in bound.arguments)
    except (TypeError, ValueError) as exc:
        if kwargs:
            raise InputError(f"--dynamic: cannot match the inputs to {type(model).__name__}.forward ({exc}); "
                             "name the inputs by position instead") from exc
        plain = False
    if plain:
        names, values = list(bound.arguments), list(bound.arguments.values())
    keys = [(i, names[i] if names else None) for i in range(len(values))]
    known = {k for pair in keys for k in pair if k is not None}
    unknown = [k for k in spec if k != "*" and k not in known]
    if unknown:
        listed = ", ".join(f"{i}" + (f" ({n})" if n else "") for i, n in keys)
        raise InputError(f"--dynamic names input {unknown[0]!r}, which {type(model).__name__} does not take; "
                         f"its inputs are {listed}")

    def dims_of(i: int, name, value):
        if not isinstance(value, torch.Tensor):
            return None
        wanted = set(spec.get("*", ())) | set(spec.get(i, ())) | set(spec.get(name, ()))
        explicit = set(spec.get(i, ())) | set(spec.get(name, ()))
        too_big = sorted(d for d in explicit if d >= value.dim())
        if too_big:
            raise InputError(f"--dynamic: input {name or i} has {value.dim()} dimensions "
                             f"{list(value.shape)}; dimension {too_big[0]} does not exist")
        return {d: dynamic for d in sorted(wanted) if d < value.dim()} or None

    shapes = [dims_of(i, n, v) for (i, n), v in zip(keys, values)]
    return dict(zip(names, shapes)) if kwargs else tuple(shapes)
