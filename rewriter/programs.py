"""What a saved program (a GraphModule from `rewriter.load`) says about itself: the inputs it takes,
the class it was exported from, and an fp32 twin of a converted program to measure against.

    >>> gm = rewriter.load("model.pt2")
    >>> args, kwargs = example_inputs(gm)                       # random inputs of the recorded shapes
    >>> args, kwargs = example_inputs(gm, shapes=[(4, 16)])     # other shapes, checked against the program
    >>> program_name(gm)                                        # "TinyMLP"
    >>> reference = fp32_twin(rewriter.load("model-fp16.pt2"))  # the converted graph computing in fp32
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from rewriter import meta
from rewriter.errors import InputError

__all__ = ["example_inputs", "program_name", "fp32_twin", "random_tensor"]


def random_tensor(shape, dtype: torch.dtype, generator: torch.Generator, like: "torch.Tensor | None" = None):
    """A float tensor of N(0, 1) values; another dtype is `like` (when it fits) or ones (valid indices)."""
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    if like is not None and tuple(like.shape) == tuple(shape) and like.dtype == dtype:
        return like.clone()
    return torch.ones(shape, dtype=dtype)


def _hint(size) -> int:
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else 2


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _check_fits(where: str, name: str, recorded, given) -> None:
    flag = ",".join(map(str, given))
    if len(recorded) != len(given):
        raise InputError(f"--input-shape {flag} does not fit input {name!r} of {where}: it has "
                         f"{len(recorded)} dimensions {_shape_text(recorded)}, the shape gives {len(given)}")
    for i, (r, g) in enumerate(zip(recorded, given)):
        if isinstance(r, int) and r != g:
            raise InputError(f"--input-shape {flag} does not fit input {name!r} of {where}: dimension {i} is "
                             f"fixed to {r} in the program {_shape_text(recorded)}, the shape gives {g}")


def example_inputs(gm: fx.GraphModule, *, shapes: "Sequence[Sequence[int]] | None" = None,
                   dtypes: "Sequence[torch.dtype] | None" = None, where: str = "the program",
                   seed: int = 0) -> tuple[tuple, dict]:
    """Inputs a loaded program accepts, rebuilt from its placeholders (shape, dtype) and recorded examples.

    Args:
        gm: a GraphModule from `rewriter.load` (torch.export program, converted or not).
        shapes: one shape per tensor input instead of the recorded ones; each must fit the program
            (same rank, fixed dimensions equal).
        dtypes: one dtype for every tensor input, or one per tensor input.
        where: how messages name the program (e.g. its file).
        seed: seed of the random float values; non-float inputs copy the recorded example or are ones.
    Returns:
        (args, kwargs) in the program's calling convention.
    Raises:
        InputError: the shapes or dtypes do not fit, or a non-tensor input has no recorded value.
    """
    generator = torch.Generator().manual_seed(seed)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    recorded = gm.meta.get(meta.EXAMPLE_INPUTS)
    leaves = pytree.tree_leaves(recorded) if recorded is not None else []
    if len(leaves) != len(placeholders):
        leaves = [None] * len(placeholders)
    tensors = [p for p in placeholders if isinstance(p.meta.get("val"), torch.Tensor)]
    if shapes and len(shapes) != len(tensors):
        recorded_text = ", ".join(f"{p.name}: {_shape_text(p.meta['val'].shape)}" for p in tensors)
        raise InputError(f"{where} takes {len(tensors)} tensor input(s) ({recorded_text}) but "
                         f"--input-shape was given {len(shapes)} time(s); give one per input")
    if dtypes and len(dtypes) not in (1, len(tensors)):
        raise InputError(f"{where} takes {len(tensors)} tensor input(s) but {len(dtypes)} dtypes were given: "
                         "give one dtype for all inputs, or one per input")
    flat, t = [], 0
    for node, leaf in zip(placeholders, leaves):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            if leaf is None:
                raise InputError(f"{where}: input {node.name!r} is not a tensor and the program records no "
                                 "example value for it; export the model with example inputs "
                                 "(torch.export.save keeps them)")
            flat.append(leaf)
            continue
        if shapes:
            shape = tuple(shapes[t])
            _check_fits(where, node.name, val.shape, shape)
        else:
            shape = tuple(_hint(s) for s in val.shape)
        dtype = val.dtype if not dtypes else dtypes[0] if len(dtypes) == 1 else dtypes[t]
        flat.append(random_tensor(shape, dtype, generator, leaf if isinstance(leaf, torch.Tensor) else None))
        t += 1
    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        try:
            args, kwargs = pytree.tree_unflatten(flat, spec)
            return tuple(args), dict(kwargs)
        except Exception:  # a spec we cannot rebuild: positional inputs
            pass
    return tuple(flat), {}


def program_name(gm: fx.GraphModule) -> "str | None":
    """The class name the program was exported from (the root of nn_module_stack), or None."""
    for node in gm.graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            if path == "" and isinstance(cls, str):
                return cls.rpartition(".")[2]
    return None


def fp32_twin(converted: fx.GraphModule) -> fx.GraphModule:
    """A copy of a converted GraphModule that computes in fp32 with its stored (rounded) weights.

    Every cast the rewriter inserted to a float dtype casts to float32 instead, and 16-bit parameters and
    buffers are widened. It is the reference `rewrite bench` uses when the original fp32 model is not at
    hand: the difference to it shows activation rounding, not weight rounding. `converted` is not changed.

    Example:
        >>> rel_l2(fp32_twin(gm)(x), gm(x))
    """
    from rewriter.passes.graph_utils import is_cast

    twin = copy.deepcopy(converted)
    for node in twin.graph.nodes:
        if is_cast(node) and meta.CREATED in node.meta and meta.is_float_dtype(node.kwargs.get("dtype")):
            node.kwargs = {**node.kwargs, "dtype": torch.float32}
    for module in twin.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if meta.is_float_dtype(p.dtype):
                module._parameters[name] = torch.nn.Parameter(p.detach().float(), requires_grad=False)
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and meta.is_float_dtype(b.dtype):
                module._buffers[name] = b.float()
    twin.recompile()
    return twin

