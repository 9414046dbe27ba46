"""Re-exporting a converted GraphModule (for `.pt2` files and ONNX) with the dynamic shapes convert found.

`convert` captures with every dimension the model allows dynamic (rewriter/capture_inputs.py) and records
the captured shapes in gm.meta[meta.INPUT_SHAPES]: a static size, or a symbol with its range. Saving and
ONNX export run torch.export again on the converted graph; they must keep exactly those dimensions
dynamic, or a model converted for any sequence length would be saved for one.

`dynamic_shapes_of` turns the record into torch.export's `dynamic_shapes`: Dim.AUTO on every dimension
that was dynamic, nothing on the static ones. The converted graph's own input check (the `InputCheck`
module convert installed) is traced along, so export re-derives the same ranges and equalities from
it. `export_again` tries those shapes first, then batch-only, then static, and says in a note why it
fell back.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from rewriter import meta
from rewriter.capture_inputs import batch_dynamic_shapes, shapes_by_signature
from rewriter.errors import first_line

__all__ = ["dynamic_shapes_of", "export_again", "batch_is_dynamic", "any_dynamic"]


def _dims_by_tensor(shapes: list[dict], args: tuple, kwargs: dict, batch: bool,
                    batch_dim=None, other: bool = True) -> dict[int, dict] | None:
    """id(example tensor) -> {dim: Dim.AUTO} from the recorded shapes (placeholder order = leaf order)."""
    leaves = pytree.tree_leaves((args, kwargs))
    if len(leaves) != len(shapes):  # non-tensor leaves missing from one side: match the tensors only
        leaves = [x for x in leaves if isinstance(x, torch.Tensor)]
        shapes = [s for s in shapes if s.get("dims") is not None]
        if len(leaves) != len(shapes):
            return None
    auto = torch.export.Dim.AUTO
    table: dict[int, dict] = {}
    for leaf, entry in zip(leaves, shapes):
        dims = entry.get("dims")
        if not isinstance(leaf, torch.Tensor) or dims is None:
            continue
        if len(dims) != leaf.dim():
            return None
        table[id(leaf)] = {i: (batch_dim if i == 0 and batch_dim is not None else auto)
                           for i, d in enumerate(dims) if not isinstance(d, int) and (batch if i == 0 else other)}
    return table


def dynamic_shapes_of(gm: fx.GraphModule, args: tuple, kwargs: dict, *, batch: bool = True,
                      batch_dim=None, other: bool = True):
    """torch.export's `dynamic_shapes` for re-exporting `gm` with the example inputs (args, kwargs):
    Dim.AUTO on every dimension recorded dynamic in gm.meta[meta.INPUT_SHAPES] (dimension 0 only when
    `batch`; `batch_dim`, e.g. one named torch.export.Dim shared by every input, in place of AUTO there;
    the other dimensions only when `other`).
    None when nothing is dynamic or the record does not fit the inputs.

    Example:
        >>> dynamic_shapes_of(fast, (), {"input_ids": ids})      # {"input_ids": {0: AUTO, 1: AUTO}}
    """
    shapes = gm.meta.get(meta.INPUT_SHAPES)
    if not shapes:
        return None
    table = _dims_by_tensor(list(shapes), args, kwargs, batch, batch_dim, other)
    if table is None or not any(table.values()):
        return None

    def dims_of(t):
        return table.get(id(t), {})

    return shapes_by_signature(gm.forward, args, kwargs, dims_of)


def _placeholder_vals(ep) -> list:
    user = set(ep.graph_signature.user_inputs)
    return [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]


def batch_is_dynamic(ep) -> bool:
    """Whether dimension 0 of some tensor input of exported program `ep` is symbolic."""
    return any(isinstance(v, torch.Tensor) and v.dim() >= 1 and not isinstance(v.shape[0], int)
               for v in _placeholder_vals(ep))


def any_dynamic(ep) -> bool:
    """Whether some dimension of some tensor input of `ep` is symbolic."""
    return any(isinstance(v, torch.Tensor) and any(not isinstance(d, int) for d in v.shape)
               for v in _placeholder_vals(ep))


def export_again(gm: fx.GraphModule, args: tuple, kwargs: dict, *, dynamic: bool = True,
                 batch: bool = True, batch_dim=None, other: bool = True,
                 notes: list[str] | None = None) -> Any:
    """torch.export of converted `gm` keeping the dimensions convert found dynamic.

    Args:
        gm: a converted GraphModule (gm.meta[meta.INPUT_SHAPES] says what was dynamic; a graph without
            the record keeps dimension 0 dynamic).
        args, kwargs: the example inputs convert recorded.
        dynamic: False exports every dimension static.
        batch: False keeps dimension 0 static (the other recorded dimensions stay dynamic).
        other: False keeps every dimension but the batch static.
        batch_dim: the Dim for dimension 0 (default Dim.AUTO); ONNX passes one named "batch" Dim so
            every input shares one batch axis.
        notes: receives one line per fallback (recorded shapes -> batch only -> static).

    Returns:
        The ExportedProgram. The last attempt's exception propagates when every attempt fails.
    """
    notes = notes if notes is not None else []
    plans: list[tuple[str, Any]] = []
    if dynamic:
        recorded = dynamic_shapes_of(gm, args, kwargs, batch=batch, batch_dim=batch_dim, other=other)
        if recorded is not None:
            plans.append(("the captured dynamic shapes", recorded))
        elif gm.meta.get(meta.INPUT_SHAPES) is None and batch:  # not made by convert: batch only
            plans.append(("dynamic batch", batch_dynamic_shapes(gm.forward, args, kwargs, batch_dim)))
        if recorded is not None and batch:
            plans.append(("dynamic batch", batch_dynamic_shapes(gm.forward, args, kwargs, batch_dim)))
    plans.append(("static shapes", None))
    failed: list[str] = []
    for i, (name, shapes) in enumerate(plans):
        try:
            ep = torch.export.export(gm, args, kwargs, dynamic_shapes=shapes, strict=False)
        except Exception as exc:
            if i == len(plans) - 1:
                raise
            failed.append(f"export with {name} failed ({first_line(exc, 160)})")
            continue
        if failed:
            notes.append("; ".join(failed) + f"; exported with {name}")
        return ep
    raise AssertionError("unreachable: the static plan either returns or raises")
