"""Save and load converted models: `.pt2` files that keep every annotation and the conversion record.

    >>> fast = rewriter.convert(model, (x,), precision="bf16")
    >>> rewriter.save(fast, "model-bf16.pt2")
    >>> again = rewriter.load("model-bf16.pt2")        # in any process; torch.export.load works too
    >>> print(rewriter.diff(model, again))             # reasons and decisions survived the round trip

How the annotations survive:
  * `save` re-exports the converted GraphModule with torch.export, using the example inputs `convert`
    recorded and keeping dynamic exactly the dimensions convert captured dynamic (batch, sequence
    length, image size: rewriter/reexport.py). Before exporting, every node's annotations
    are copied into `node.meta["custom"]` (`meta.to_custom`), which export carries onto the nodes it
    re-traces and `torch.export.save` serialises. Re-export renames nodes and re-traces
    `meta["val"]` (so it shows the new dtypes); the node's name and dtype before saving are kept in
    `meta.ORIGIN` so `rewriter.diff` still knows what each node was.
  * The .pt2 format keeps only `val` on placeholders (inputs, and weights, which are placeholders in
    the program) and re-creates the getitem nodes of multi-output ops on load from their producer.
    Their annotations therefore travel in the record: weights keyed by their target
    ("encoder.0.linear.weight"), inputs by name, getitems by (producer's origin, index).
  * The conversion record (`gm.meta["rewriter"]`) is stored as JSON in the archive's extra file
    `rewriter.json` (`torch.export.save(..., extra_files=...)`), a documented part of the format.
  * `load` runs `torch.export.load(...).module()`, restores the annotations with `meta.from_custom`
    and from the record, and restores the record and the example inputs (`ep.example_inputs`). It
    puts back the input checks of a converted model (capture_inputs.reinstall): a size outside the
    captured range is the InputError a freshly converted model gives, and calls bind by the original
    forward's signature.
The input GraphModule is left as it was: the temporary `custom` entries are removed after saving.
Files are written atomically (a temporary file in the same folder, then `os.replace`).

Opening a file runs no code from it unless `trust_pickle=True`: a `.pt2` is checked entry by entry
before torch.export.load sees it (rewriter/archive.py: pickled parts must pass torch's weights_only
unpickler, the side record is validated against a schema, weights against their sha256 in the record,
and the output types' modules are imported only from transformers/torchvision/timm); pickles
(`.pt`/`.pth` full modules) are loaded only with `trust_pickle=True`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn as nn

from rewriter import archive, capture_inputs, meta
from rewriter.backends import fast_forward
from rewriter.capture import CAPTURE_LOCK, normalize_inputs
from rewriter.errors import ConfigError, InputError, first_line
from rewriter.files import WRITE_ERRNOS, atomic_write, check_writable, write_error  # noqa: F401 (re-exported)
from rewriter.reexport import batch_is_dynamic, export_again

__all__ = ["save", "load", "prepare", "Prepared", "atomic_write", "check_writable", "write_error",
           "WRITE_ERRNOS", "PICKLE_SUFFIXES", "RECORD_FILE"]

RECORD_FILE = archive.RECORD_FILE        # extra file inside the .pt2 archive
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl")
_FORMAT = archive.FORMAT
_GRAPH_KEYS = (meta.CALIBRATION, meta.CALL_SIGNATURE)  # JSON-able GraphModule.meta kept in the record



# ---------------------------------------------------------------- save


def _example_inputs(gm: fx.GraphModule, example_inputs: Any) -> tuple[tuple, dict]:
    if example_inputs is not None:
        return normalize_inputs(example_inputs, None)
    recorded = gm.meta.get(meta.EXAMPLE_INPUTS)
    if recorded is None:
        raise InputError(
            "save() writes models made by rewriter.convert and re-exports them with the example inputs "
            "convert recorded, but this GraphModule has none: pass example_inputs=(x,), or save other "
            "modules with torch.export.save(torch.export.export(model, (x,)), path)")
    args, kwargs = recorded
    return tuple(args), dict(kwargs)


def _is_dynamic(gm: fx.GraphModule) -> bool:
    """Whether some input dimension is dynamic: from the captured shapes when convert recorded them
    (batch, sequence, image size), else from the record's dynamic_batch or the graph's inputs."""
    shapes = gm.meta.get(meta.INPUT_SHAPES)
    if shapes:
        return any(not isinstance(d, int) for entry in shapes for d in (entry.get("dims") or ()))
    record = gm.meta.get(meta.INFO) or {}
    if "dynamic_batch" in record:
        return bool(record["dynamic_batch"])
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and val.dim() >= 1 and not isinstance(val.shape[0], int):
            return True
    return False


def _tensor_constants(gm: fx.GraphModule) -> set[str]:
    """Targets of get_attr tensors that are neither parameters nor buffers (`torch.tensor([1, 2])` in
    a forward: export's lifted_tensor_N). Re-export lifts such a constant while tracing its first
    consumer, so the program's placeholder takes the consumer's meta["custom"]; a meta["custom"] of
    its own on the get_attr then conflicts ("Mismatch in custom metadata for key rewriter") and the
    model could not be saved. Their annotations travel in the record, like the weights'."""
    named = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    named |= {name for name, _ in gm.named_buffers(remove_duplicate=False)}
    return {str(n.target) for n in gm.graph.nodes if n.op == "get_attr" and str(n.target) not in named}


@contextlib.contextmanager
def _annotations_in_custom(gm: fx.GraphModule) -> Iterator[None]:
    """Copy annotations (and each node's origin) into meta["custom"] for export; undo afterwards."""
    saved = []
    constants = _tensor_constants(gm)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target) in constants:
            continue  # see _tensor_constants: its annotations travel in the record ("attrs")
        had_custom = "custom" in node.meta
        custom = dict(node.meta["custom"]) if had_custom and isinstance(node.meta["custom"], dict) else None
        had_origin = meta.ORIGIN in node.meta
        saved.append((node, had_custom, custom, had_origin))
        if not had_origin and meta.CREATED not in node.meta and node.op != "output":
            name, dtype = meta.origin(node)
            meta.put(node, meta.ORIGIN, {"name": name, "dtype": dtype})
        meta.to_custom(node)
    try:
        yield
    finally:
        for node, had_custom, custom, had_origin in saved:
            if had_custom:
                node.meta["custom"] = custom if custom is not None else node.meta["custom"]
            else:
                node.meta.pop("custom", None)
            if not had_origin:
                node.meta.pop(meta.ORIGIN, None)


def _export(gm: fx.GraphModule, args: tuple, kwargs: dict, notes: list[str]):
    """Re-export with the dimensions convert found dynamic (rewriter/reexport.py); (program, whether
    its batch dimension is dynamic)."""
    ep = export_again(gm, args, kwargs, dynamic=_is_dynamic(gm), notes=notes)
    return ep, batch_is_dynamic(ep)


def _is_getitem(node) -> bool:
    return (node.op == "call_function" and getattr(node.target, "__name__", "") == "getitem"
            and isinstance(node.args[0], fx.Node) and isinstance(node.args[1], int))


def _getitem_key(producer_origin: str, index: int) -> str:
    return f"{producer_origin}[{index}]"


def _annotations(node) -> dict:
    return {key: node.meta[key] for key in meta.ALL_KEYS if key in node.meta}


def _placeholder_annotations(gm: fx.GraphModule) -> tuple[dict, dict]:
    """Annotations of weights (by target) and inputs (by name). The .pt2 format keeps only `val` on
    placeholders, and weights are placeholders in the program, so these travel in the record."""
    attrs: dict[str, dict] = {}
    inputs: dict[str, dict] = {}
    for node in gm.graph.nodes:
        ours = _annotations(node)
        if not ours:
            continue
        if node.op == "get_attr":
            attrs.setdefault(str(node.target), ours)
        elif node.op == "placeholder":
            inputs[node.name] = ours
    return attrs, inputs


def _getitem_annotations(gm: fx.GraphModule) -> dict:
    """Annotations of the getitem nodes that take apart multi-output ops (split, max_pool with
    indices). The .pt2 format stores such outputs as a list and re-creates the getitem nodes on
    load with the producer's meta, so they travel in the record, keyed by (producer, index)."""
    table = {}
    for node in gm.graph.nodes:
        if _is_getitem(node):
            ours = _annotations(node)
            if ours:
                table[_getitem_key(meta.origin(node.args[0])[0], node.args[1])] = ours
    return table


@dataclasses.dataclass
class Prepared:
    """A converted model exported and ready to write: `write(path)` puts it in a .pt2 file."""

    program: Any                 # torch.export.ExportedProgram
    extra_files: dict[str, str]  # the conversion record, stored beside the program in the archive

    def write(self, path: "str | os.PathLike") -> None:
        """Write to `path` as it is (callers make it atomic, see `save`).

        The archive is built in memory first and written with Python's file API: torch's C++ archive
        writer aborts the process when the disk fills up, while a Python write raises OSError(ENOSPC),
        which `atomic_write` turns into a message naming the file.
        """
        buffer = io.BytesIO()
        torch.export.save(self.program, buffer, extra_files=dict(self.extra_files))
        view = buffer.getbuffer()
        try:
            with open(path, "wb") as fh:
                for start in range(0, len(view), 1 << 24):
                    fh.write(view[start:start + (1 << 24)])
        finally:
            view.release()


def prepare(gm: fx.GraphModule, *, example_inputs: Any = None, where: str = "a .pt2 file") -> Prepared:
    """Re-export a converted GraphModule with its annotations, without touching the disk.

    The slow, fallible part of `save`; the CLI calls it before creating any output file.
    """
    if not isinstance(gm, fx.GraphModule):
        raise InputError(f"save expects the GraphModule returned by rewriter.convert, got "
                         f"{type(gm).__name__}; convert the model first")
    args, kwargs = _example_inputs(gm, example_inputs)
    record = dict(gm.meta.get(meta.INFO) or {})
    with CAPTURE_LOCK, _annotations_in_custom(gm):
        try:
            export_notes: list[str] = []
            ep, dynamic = _export(gm, args, kwargs, export_notes)
            getitems = _getitem_annotations(gm)
            attrs, inputs = _placeholder_annotations(gm)
        except Exception as exc:
            capture_method = record.get("capture", "unknown")
            raise InputError(
                f"could not re-export the converted model to save it as {where}: "
                f"{first_line(exc)}. The model was captured with {capture_method}; models that "
                "torch.export cannot trace cannot be saved as .pt2. Keep using the GraphModule in "
                "Python, or export it to ONNX instead") from exc
    graph_meta = {key: gm.meta[key] for key in _GRAPH_KEYS if gm.meta.get(key) is not None}
    if export_notes:
        record["notes"] = list(record.get("notes") or []) + [f"saved: {n}" for n in export_notes]
    payload = {"format": _FORMAT, "record": record, "dynamic_batch": dynamic,
               "torch": torch.__version__, "getitems": getitems, "attrs": attrs, "inputs": inputs,
               "graph_meta": graph_meta, "weights_sha256": archive.weight_checksums(ep),
               "imports": archive.output_modules(ep)}
    return Prepared(ep, {RECORD_FILE: json.dumps(payload, default=str)})


def save(gm: fx.GraphModule, path: "str | os.PathLike", *, force: bool = False,
         example_inputs: Any = None) -> Path:
    """Save a converted model as a `.pt2` program that keeps its annotations and conversion record.

    Args:
        gm: a GraphModule returned by `rewriter.convert` (or `rewriter.load`).
        path: destination, ending in `.pt2`.
        force: replace an existing file (otherwise an InputError leaves it untouched).
        example_inputs: inputs to re-export with, instead of those `convert` recorded.

    Returns:
        The path written. The file is complete or absent, never partial.

    Example:
        >>> rewriter.save(rewriter.convert(model, (x,), precision="fp16"), "model-fp16.pt2")
        >>> torch.export.load("model-fp16.pt2").module()(x)      # runs without the rewriter
    """
    if meta.is_generative(gm):
        raise ConfigError(
            "save: a GenerativeLM (rewriter.convert(..., generate=True)) is two graphs sharing weights over a "
            "KV cache updated in place, plus the Hugging Face config and generation config; a .pt2 archive holds "
            "one program, so it is not saved. Save the Hugging Face model instead (model.save_pretrained(folder)) "
            "and convert when loading: rewriter.convert(AutoModelForCausalLM.from_pretrained(folder), "
            "{'input_ids': ids}, precision=..., generate=True), which takes seconds")
    path = Path(path)
    if path.suffix.lower() != ".pt2":
        raise InputError(f"save writes torch.export programs: name the file '*.pt2' (got {str(path)!r}); "
                         "for ONNX use rewriter.export_onnx")
    check_writable(path, force=force)
    prepared = prepare(gm, example_inputs=example_inputs, where=repr(str(path)))
    with atomic_write(path, force=force) as tmp:
        prepared.write(tmp)
    return path


# ---------------------------------------------------------------- load


def _restore_placeholder_annotations(gm: fx.GraphModule, payload: dict) -> None:
    attrs, inputs = payload.get("attrs") or {}, payload.get("inputs") or {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            ours = attrs.get(str(node.target))
        elif node.op == "placeholder":
            ours = inputs.get(node.name)
        else:
            continue
        for key, value in (ours or {}).items():
            if key in meta.ALL_KEYS:
                meta.put(node, key, value)


def _allow_eval(gm: fx.GraphModule, path: Path) -> None:
    """ep.module() refuses train() and eval() altogether. Its graph is fixed, so eval()/train(False)
    can only be a no-op on the flags, which lets code that calls model.eval() (and capture) run it;
    train(True) stays refused because it could not turn dropout or batch statistics back on."""
    import types

    def train(self, mode: bool = True):
        if mode:
            raise InputError(f"the model loaded from {str(path)!r} is an exported program: its graph is "
                             "fixed, so train() cannot turn dropout or batch-norm statistics back on. "
                             "Export the model in training mode, or convert the original nn.Module")
        for module in self.modules():
            module.training = False
        return self

    gm.train = types.MethodType(train, gm)
    gm.eval = types.MethodType(lambda self: train(self, False), gm)


def _fix_inherited(gm: fx.GraphModule, getitems: dict) -> None:
    """Nodes that export or the deserialiser made under another node's meta carry that node's
    annotations (same ORIGIN name): give getitems theirs back from the record, strip the others."""
    seen: set[str] = set()
    for node in gm.graph.nodes:
        name = (node.meta.get(meta.ORIGIN) or {}).get("name")
        if _is_getitem(node):
            src = (node.args[0].meta.get(meta.ORIGIN) or {}).get("name")
            if src is not None and name == src:
                for key in meta.ALL_KEYS:
                    node.meta.pop(key, None)
                for key, value in (getitems.get(_getitem_key(src, node.args[1])) or {}).items():
                    meta.put(node, key, value)
                name = (node.meta.get(meta.ORIGIN) or {}).get("name")
        if name is None:
            continue
        if name in seen:
            for key in meta.ALL_KEYS:
                node.meta.pop(key, None)
        seen.add(name)


def _parse_record(path: Path, text: "str | None") -> dict:
    if not text:
        return {}
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{str(path)!r}: its conversion record ({RECORD_FILE}) is not valid JSON "
                         f"({exc}); the file is damaged, convert the model again") from exc
    return archive.check_record(path, payload)


def _load_program(path: Path, trust_pickle: bool = False) -> fx.GraphModule:
    checked = archive.read(path, trust_pickle=trust_pickle)  # refuses code before torch sees the file
    text = checked.record_text or ""
    payload = _parse_record(path, text)
    skipped = archive.import_output_modules(list(payload.get("imports") or []))
    try:
        # the very bytes that were checked: the file cannot change between the check and the load
        ep = torch.export.load(io.BytesIO(checked.data))
    except Exception as exc:
        hint = (f" Its outputs use types from {', '.join(skipped)}, which the rewriter imports only from "
                f"{', '.join(archive.IMPORT_ALLOWED)}: import them first (import {skipped[0]}) and load again."
                if skipped else "")
        raise InputError(
            f"could not read {str(path)!r} as a torch.export program (.pt2): {first_line(exc)}.{hint} "
            "The file may be truncated or not written by torch.export.save; export the model again "
            "with torch.export.save(torch.export.export(model, (x,)), 'model.pt2')") from exc
    if payload.get("weights_sha256"):
        archive.check_checksums(path, ep, payload["weights_sha256"])
    try:
        gm = ep.module()
    except Exception as exc:
        raise InputError(f"{str(path)!r} holds a program that cannot be turned into a module: "
                         f"{first_line(exc)}; export the model again with this version of torch "
                         f"({torch.__version__})") from exc
    _allow_eval(gm, path)
    for node in gm.graph.nodes:
        meta.from_custom(node)
    _fix_inherited(gm, payload.get("getitems") or {})
    _restore_placeholder_annotations(gm, payload)
    if text:
        record = dict(payload.get("record") or {})
        record["dynamic_batch"] = payload.get("dynamic_batch", record.get("dynamic_batch"))
        gm.meta[meta.INFO] = record
        for key, value in (payload.get("graph_meta") or {}).items():
            if key in _GRAPH_KEYS:
                gm.meta[key] = value
    if text:  # the converted model's input checks: InputErrors naming input, dimension and range
        capture_inputs.reinstall(gm, ep.range_constraints, gm.meta.get(meta.CALL_SIGNATURE))
    if ep.example_inputs is not None:  # the inputs the program was exported with
        args, kwargs = ep.example_inputs
        gm.meta[meta.EXAMPLE_INPUTS] = (tuple(args), dict(kwargs))
    if text:  # a converted model runs eagerly as convert() returned it: with the fast forward
        fast_forward.install(gm)
    return gm


def _load_pickle(path: Path, trust_pickle: bool) -> nn.Module:
    if not trust_pickle:
        raise InputError(
            f"{str(path)!r} is a pickle: loading it runs whatever code the file contains, so it is refused "
            "by default. If you made the file or trust its source, pass --trust-pickle "
            "(load(..., trust_pickle=True)). Better: save the model as a program once, with "
            "torch.export.save(torch.export.export(model, (x,)), 'model.pt2'), and use the .pt2")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InputError(f"could not unpickle {str(path)!r}: {first_line(exc)}. The file may be "
                         "damaged, or need classes that are not importable here") from exc
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        raise InputError(f"{str(path)!r} holds a state_dict (a dict of tensors), not a model: build the "
                         "model in Python and pass a factory spec 'package.module:make_model', or save "
                         "the whole model with torch.export.save")
    raise InputError(f"{str(path)!r} holds a {type(obj).__name__}, not a torch.nn.Module")


def load(path: "str | os.PathLike", *, trust_pickle: bool = False) -> nn.Module:
    """Load a model: a `.pt2` program (annotations and record restored) or, if trusted, a pickle.

    Args:
        path: a `.pt2` file written by `rewriter.save` or `torch.export.save`, or a pickled full
            module (`.pt`, `.pth`, `.pkl`).
        trust_pickle: allow unpickling, which runs code from the file: a pickled module, or a .pt2
            whose parts are pickled Python objects (without it such a .pt2 is refused).

    Returns:
        For `.pt2`: a torch.fx.GraphModule called like the original model; for a converted model its
        nodes carry the rewriter's annotations and `gm.meta["rewriter"]` the conversion record, and
        it runs with the eager fast forward (backends/fast_forward.py). For a pickle: the module it holds.

    Example:
        >>> gm = rewriter.load("model-fp16.pt2")
        >>> gm.meta["rewriter"]["config"]["precision"]
        'fp16'
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"model file {str(path)!r} does not exist; check the path (a factory spec "
                         "looks like 'package.module:function')")
    if path.is_dir():
        raise InputError(f"{str(path)!r} is a directory; give a .pt2 file")
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        return _load_program(path, trust_pickle)
    if suffix in PICKLE_SUFFIXES:
        return _load_pickle(path, trust_pickle)
    raise InputError(f"{str(path)!r}: unknown model file type {suffix or '(no suffix)'!r}; give a .pt2 file "
                     "(torch.export.save), a factory spec 'package.module:function', or a pickled "
                     "module (.pt/.pth) with --trust-pickle")
