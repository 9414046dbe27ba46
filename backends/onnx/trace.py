"""From the converted GraphModule to ONNX IR: re-export with torch.export, translate with torch.onnx, and
map every ONNX node back to the node of the converted graph it came from (its decision and reason)."""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx

from rewriter import meta
from rewriter.backends.onnx.common import quiet
from rewriter.errors import BackendError, InputError, describe_node

__all__ = ["check_converted", "example_inputs_of", "precision_of", "reexport", "output_names", "origin_of",
           "to_onnx", "origin_map", "feeds_of"]

_FX_NODE_KEY = "pkg.torch.onnx.fx_node"


def check_converted(gm) -> None:
    converted = isinstance(gm, fx.GraphModule) and (meta.INFO in gm.meta or any(
        meta.CREATED in n.meta or meta.DECISION in n.meta for n in gm.graph.nodes))
    if not converted:
        raise InputError(
            f"export_onnx expects the GraphModule returned by rewriter.convert, got "
            f"{type(gm).__name__}; convert first: fast = rewriter.convert(model, (x,), precision='fp16'), "
            "then rewriter.export_onnx(fast, 'model.onnx')")


def example_inputs_of(gm, example_inputs) -> tuple[tuple, dict]:
    from rewriter.capture import normalize_inputs

    if example_inputs is not None:
        if isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(
                example_inputs[1], dict) and isinstance(example_inputs[0], tuple):
            return example_inputs
        return normalize_inputs(example_inputs, None)
    recorded = gm.meta.get(meta.EXAMPLE_INPUTS)
    if recorded is None:
        raise InputError("the converted model carries no example inputs (was it loaded from a file?): "
                         "pass example_inputs=(x,) to export_onnx")
    return recorded


def precision_of(gm) -> str:
    return str(gm.meta.get(meta.INFO, {}).get("config", {}).get("precision", "fp16"))


def reexport(gm, args, kwargs, dynamic_batch: bool, notes: list[str], dynamic_sizes: bool = True):
    """torch.export of the converted GraphModule with the dimensions convert found dynamic (batch,
    sequence, image size: rewriter/reexport.py); dimension 0 static when not `dynamic_batch`, the others
    when not `dynamic_sizes`.
    Falls back to batch-only, then static shapes, with a note."""
    from rewriter.reexport import export_again

    try:
        with quiet():
            return export_again(gm, args, kwargs, batch=dynamic_batch, batch_dim=torch.export.Dim("batch"),
                                other=dynamic_sizes, notes=notes)
    except Exception as exc:
        raise BackendError(
            f"torch.export could not re-trace the converted model for ONNX: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. Check that example_inputs "
            "are the inputs the model was converted with.") from exc


def output_names(gm, n_outputs: int) -> list[str] | None:
    """Names of the flattened outputs from the model's output structure ('last_hidden_state', ...)."""
    import torch.utils._pytree as pytree

    spec = getattr(getattr(gm.graph, "_codegen", None), "pytree_info", None)
    spec = getattr(spec, "out_spec", None)
    if spec is None:
        return None
    try:
        leaves = pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(spec.num_leaves)), spec))[0]
    except Exception:  # an output type pytree cannot rebuild: keep the exporter's names
        return None
    if len(leaves) != n_outputs:
        return None
    if n_outputs == 1 and not leaves[0][0]:
        return ["output"]
    names = []
    for path, _ in leaves:
        text = re.sub(r"[^0-9A-Za-z_.]+", "_", pytree.keystr(path)).strip("_.")
        text = text if text and not text[0].isdigit() else f"output_{text or len(names)}"
        names.append(text)
    return names if len(set(names)) == len(names) else None


def origin_of(ep_node, gm, by_name: dict) -> fx.Node | None:
    """The node of the converted GraphModule an exported node descends from (node.meta["from_node"])."""
    gid = id(gm.graph)

    def root(sources):
        for src in sources or ():
            found = root(getattr(src, "from_node", None))
            if found is not None:
                return found
            if getattr(src, "graph_id", gid) == gid and src.name in by_name:
                return by_name[src.name]
        return None

    return root(ep_node.meta.get("from_node"))


def _provenance(ep, gm) -> dict[str, fx.Node]:
    """Name of each node of an exported program -> node of the converted GraphModule it came from."""
    by_name = {n.name: n for n in gm.graph.nodes}
    mapping = {}
    for node in ep.graph.nodes:
        origin = origin_of(node, gm, by_name)
        if origin is not None:
            mapping[node.name] = origin
    return mapping


def to_onnx(ep, gm, opset: int, output_names, translations: dict | None = None):
    """torch.onnx.export of an ExportedProgram (with `translations` for our custom ops); an op without
    ONNX export is refused by name."""
    from torch.onnx import OnnxExporterError

    try:
        with quiet():
            return torch.onnx.export(ep, (), dynamo=True, optimize=False, opset_version=opset,
                                     output_names=output_names, verbose=False, report=False,
                                     custom_translation_table=translations)
    except OnnxExporterError as exc:
        text = str(exc)
        found = re.search(r"Error when translating node %(\S+)", text)
        why = re.search(r"No ONNX function found for ([^\n]+?)\.(?: Failure|\n|$)", text)
        gm_node = None
        if found:
            ep_node = next((n for n in ep.graph.nodes if n.name == found.group(1)), None)
            if ep_node is not None:
                gm_node = origin_of(ep_node, gm, {n.name: n for n in gm.graph.nodes}) or ep_node
        where = describe_node(gm_node) if gm_node is not None else "a node of the model"
        reason = f"no ONNX export for {why.group(1)}" if why else text.strip().splitlines()[0][:200]
        raise BackendError(
            f"ONNX export refused at {where}: {reason}. Fallback: none (refused). Register an ONNX "
            "translation with torch.onnx.export(custom_translation_table=...) or replace the op "
            "with supported torch ops, then export again.") from exc


def origin_map(model, onnx_ep, gm) -> dict[Any, fx.Node]:
    """ONNX node -> node of the converted GraphModule, through the exporter's fx node metadata."""
    by_ep = _provenance(onnx_ep, gm)
    origin = {}
    for node in model.graph:
        text = node.metadata_props.get(_FX_NODE_KEY, "")
        found = re.match(r"%(\S+)\s*:", text)
        if found and found.group(1) in by_ep:
            origin[node] = by_ep[found.group(1)]
    return origin



def feeds_of(model, args, kwargs, dynamic: bool) -> dict:
    """Example inputs as an ONNX Runtime feed (batch of 1 when the batch is dynamic, to stay cheap)."""
    import torch.utils._pytree as pytree

    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    names = [v.name for v in model.graph.inputs]
    if len(tensors) != len(names):
        return {}
    feed = {}
    for name, t in zip(names, tensors):
        t = t[:1] if dynamic and t.dim() >= 1 else t
        feed[name] = t.detach().cpu().numpy()
    return feed

