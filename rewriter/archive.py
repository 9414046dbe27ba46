"""Open a `.pt2` archive without running code from it: check every part torch would unpickle, the
side record (rewriter.json) against a schema, and the weights against the checksums the record holds.

`torch.export.load` unpickles parts of an archive: pickled weights and constants (`torch.load(...,
weights_only=False)`), the example inputs (retried with `weights_only=False` when the safe loader
refuses them), TorchBind and opaque constants (`pickle.loads`), legacy archives, and it loads
AOTInductor shared libraries. `read` looks at the zip entries BEFORE torch does:

  * every pickled payload torch would load must load with torch's weights_only unpickler (tensors,
    dtypes and the few types it allows); TorchBind/opaque constants, AOTInductor libraries and
    legacy-format archives are refused;
  * the bytes that were checked are the bytes torch loads (the archive is read into memory once and
    handed to torch.export.load as a buffer), so the file cannot change between check and load;
  * zip CRCs are checked on every entry (a flipped bit is reported as damage).

All of this is skipped with `trust_pickle=True` (the user said the file is theirs). The side record is
data in every case: `check_record` admits known keys and types only; a recorded backend may carry
only allow-listed options (no inductor option that names a compiler, a path or a command).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from rewriter import meta
from rewriter.errors import InputError

__all__ = ["Archive", "read", "check_record", "weight_checksums", "check_checksums", "output_modules",
           "import_output_modules", "IMPORT_ALLOWED", "RECORD_FILE", "FORMAT"]

RECORD_FILE = "rewriter.json"
FORMAT = "rewriter.pt2/1"

# packages whose modules `load` may import so the pytree types of a program's outputs are registered
IMPORT_ALLOWED = ("transformers", "torchvision", "timm")

_TRUST_HINT = ("If you made the file or trust its source, pass --trust-pickle (load(..., trust_pickle=True)); "
               "otherwise re-export the model from its source with torch.export.save")


@dataclasses.dataclass
class Archive:
    """The archive's bytes (checked) and its side record (parsed, not yet validated)."""

    data: bytes
    record_text: str | None


def _refuse(path: Path, what: str) -> InputError:
    return InputError(f"{str(path)!r} {what}: loading it would run code from the file, so it is refused. "
                      + _TRUST_HINT)


def _weights_only_ok(blob: bytes) -> str | None:
    """None when torch's weights_only unpickler accepts `blob`, else the reason it refused."""
    if not blob:
        return None
    try:
        torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # the safe unpickler refuses anything outside its allow-list
        return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return None


def _root(names: list[str]) -> str:
    """The archive's top folder ('' when entries are at the top): torch names entries '<root>/...'."""
    for name in names:
        if name.endswith("archive_version"):
            return name[: -len("archive_version")]
    return ""


def read(path: Path, *, trust_pickle: bool = False) -> Archive:
    """Read `path` into memory and check that loading it runs no code (unless trust_pickle)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = zf.namelist()
        entries = {name: zf.read(name) for name in names}  # checks each entry's CRC-32
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        raise InputError(f"could not read {str(path)!r} as a .pt2 archive ({exc}): the file is truncated, "
                         "damaged or not a torch.export program: copy or export it again") from exc
    root = _root(names)
    rel = {name[len(root):]: blob for name, blob in entries.items() if name.startswith(root)}
    record = rel.get(f"extra/{RECORD_FILE}")
    record_text = record.decode("utf-8", "replace") if record is not None else None
    if not trust_pickle:
        _check_no_code(path, rel)
    return Archive(data, record_text)


def _check_no_code(path: Path, rel: dict[str, bytes]) -> None:
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0") not in ("", "0"):
        raise InputError(f"cannot load {str(path)!r} safely: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set, which "
                         "turns off torch's safe unpickler. Unset it, or pass --trust-pickle if you trust the file")
    if any(name.startswith("data/aotinductor/") for name in rel):
        raise _refuse(path, "holds an AOTInductor package (a compiled shared library)")
    models = [n[len("models/"):-len(".json")] for n in rel if n.startswith("models/") and n.endswith(".json")]
    if not models:
        raise _refuse(path, "has no models/*.json program (an old archive format that torch reads with pickle)")
    for model in models:
        for kind in ("weights", "constants"):
            if f"data/{kind}/{model}.pt" in rel:
                raise _refuse(path, f"stores its {kind} in the legacy pickled format")
            config_name = f"data/{kind}/{model}_{kind}_config.json"
            text = rel.get(config_name)
            if text is None:
                continue
            try:
                config = json.loads(text).get("config") or {}
            except (ValueError, AttributeError) as exc:
                raise InputError(f"{str(path)!r}: {config_name} is not valid JSON ({exc}); the file is damaged") from exc
            for fqn, payload in config.items():
                name = str((payload or {}).get("path_name", ""))
                if kind == "constants" and not name.startswith("tensor_"):
                    raise _refuse(path, f"holds constant {fqn!r} as a pickled Python or TorchBind object")
                if (payload or {}).get("use_pickle"):
                    reason = _weights_only_ok(rel.get(f"data/{kind}/{name}", b""))
                    if reason is not None:
                        raise _refuse(path, f"holds {kind[:-1]} {fqn!r} as a pickle that is not plain tensor data "
                                      f"({reason})")
        reason = _weights_only_ok(rel.get(f"data/sample_inputs/{model}.pt", b""))
        if reason is not None:
            raise _refuse(path, f"holds example inputs that are not plain tensor data ({reason})")


# ---------------------------------------------------------------- the side record is data

_TOP = {"format": str, "record": dict, "dynamic_batch": (bool, type(None)), "torch": str, "getitems": dict,
        "attrs": dict, "inputs": dict, "graph_meta": dict, "weights_sha256": dict, "imports": list}
_RECORD = {"config": dict, "capture": str, "dynamic_batch": (bool, type(None)), "notes": list, "model": str,
           "warnings": list, "input_shapes": list}
_CONFIG = {"precision": str, "overrides": list, "mode": str, "keep_io_types": bool, "dynamic_batch": bool,
           "static": bool, "dynamic_shapes": (str, type(None)),
           "capture_time_limit": (int, float, type(None)), "tolerance": (int, float, type(None)),
           "backend": str, "backend_options": dict, "allow_bf16_fallback": bool,
           "budget_lowering": bool}
_BACKENDS = ("eager", "compile", "cuda_graphs")
_COMPILERS = ("inductor", "aot_eager", "eager", "cudagraphs")
_SCALAR = (bool, int, float, type(None))
# backend options a record may carry: name -> allowed value types; everything else is refused
_BACKEND_OPTIONS = {"compile_mode": (str, type(None)), "dynamic": (bool, str, type(None)), "fullgraph": (bool,),
                    "compiler": (str,), "options": (dict,), "clone_outputs": (bool,), "warmup": (int,),
                    "max_graphs": (int, type(None)), "share_pool": (bool,)}
# inductor options a record may carry (tuning switches only: no compiler, path, command or hook)
_INDUCTOR_OPTIONS = ("epilogue_fusion", "max_autotune", "max_autotune_gemm", "max_autotune_pointwise",
                     "coordinate_descent_tuning", "shape_padding", "freezing", "layout_optimization",
                     "aggressive_fusion", "benchmark_kernel", "triton.cudagraphs", "triton.cudagraph_trees",
                     "max_fusion_size", "split_reductions", "permute_fusion", "pattern_matcher",
                     "combo_kernels", "fallback_random", "triton.unique_kernel_names")
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _bad(path: Path, text: str) -> InputError:
    return InputError(f"{str(path)!r}: its conversion record ({RECORD_FILE}) {text}. The record is data "
                      "the rewriter writes itself; this one was edited or written by something else. "
                      "Convert the model again, or load the program with torch.export.load")


def _check_keys(path: Path, where: str, value: Any, schema: dict) -> None:
    if not isinstance(value, dict):
        raise _bad(path, f"has {where} of type {type(value).__name__}, expected an object")
    for key, item in value.items():
        if key not in schema:
            raise _bad(path, f"has unknown key {key!r} in {where} (known: {', '.join(sorted(schema))})")
        allowed = _as_tuple(schema[key])
        if not isinstance(item, allowed) or (isinstance(item, bool) and bool not in allowed):  # bool is an int
            raise _bad(path, f"has {where}.{key} of type {type(item).__name__}")


def _as_tuple(t) -> tuple:
    return t if isinstance(t, tuple) else (t,)


def _check_annotations(path: Path, where: str, table: Any) -> None:
    if not isinstance(table, dict):
        raise _bad(path, f"has {where} of type {type(table).__name__}")
    for name, ours in table.items():
        if not isinstance(ours, dict):
            raise _bad(path, f"has {where}[{name!r}] of type {type(ours).__name__}")
        for key in ours:
            if key not in meta.ALL_KEYS:
                raise _bad(path, f"has unknown annotation {key!r} in {where}[{name!r}]")


def _check_backend(path: Path, config: dict) -> None:
    backend = config.get("backend", "eager")
    if backend not in _BACKENDS:
        raise _bad(path, f"names backend {backend!r} (known: {', '.join(_BACKENDS)})")
    options = config.get("backend_options") or {}
    _check_keys(path, "config.backend_options", options, _BACKEND_OPTIONS)
    compiler = options.get("compiler", "inductor")
    if compiler not in _COMPILERS:
        raise _bad(path, f"names torch.compile backend {compiler!r} (allowed: {', '.join(_COMPILERS)})")
    mode = options.get("compile_mode")
    if mode is not None and not re.fullmatch(r"[a-z-]{1,40}", mode):
        raise _bad(path, f"names compile_mode {mode!r}")
    for key, value in (options.get("options") or {}).items():
        if key not in _INDUCTOR_OPTIONS:
            raise _bad(path, f"names inductor option {key!r}, which a record may not carry (allowed: "
                       f"{', '.join(_INDUCTOR_OPTIONS)})")
        if not isinstance(value, _SCALAR):
            raise _bad(path, f"gives inductor option {key!r} a {type(value).__name__}; only numbers and "
                       "booleans are allowed")


def _check_signature(path: Path, record: Any) -> None:
    """The call signature (capture_inputs): parameter names, kinds 0-4 and default flags, and the
    names of the captured positional and keyword inputs; nothing else."""
    if record is None:
        return
    ok = isinstance(record, dict) and set(record) == {"params", "args", "kwargs"} and isinstance(
        record["params"], list) and all(
        isinstance(p, list) and len(p) == 3 and isinstance(p[0], str) and p[0].isidentifier()
        and type(p[1]) is int and 0 <= p[1] <= 4 and isinstance(p[2], bool) for p in record["params"])
    ok = ok and all(isinstance(record[k], list) and all(isinstance(n, str) and n.isidentifier()
                                                         for n in record[k]) for k in ("args", "kwargs"))
    if not ok:
        raise _bad(path, "has a call signature that is not a list of (name, kind, has_default) "
                   "parameters with the captured input names")


def check_record(path: Path, payload: Any) -> dict:
    """Validate a parsed side record against the schema; returns it. Raises InputError (exit 2)."""
    _check_keys(path, "the record", payload, _TOP)
    if payload.get("format", FORMAT) != FORMAT:
        raise _bad(path, f"has format {payload.get('format')!r}, this version reads {FORMAT!r}")
    record = payload.get("record") or {}
    _check_keys(path, "record", record, _RECORD)
    config = record.get("config") or {}
    _check_keys(path, "record.config", config, _CONFIG)
    if not all(isinstance(o, str) for o in config.get("overrides") or []):
        raise _bad(path, "has overrides that are not 'KEY=PRECISION' strings")
    if not all(isinstance(n, str) for n in record.get("notes") or []):
        raise _bad(path, "has notes that are not strings")
    _check_backend(path, config)
    for where in ("getitems", "attrs", "inputs"):
        _check_annotations(path, where, payload.get(where) or {})
    for key in payload.get("graph_meta") or {}:
        if key not in (meta.CALIBRATION, meta.CALL_SIGNATURE):
            raise _bad(path, f"has unknown graph_meta key {key!r}")
    _check_signature(path, (payload.get("graph_meta") or {}).get(meta.CALL_SIGNATURE))
    sums = payload.get("weights_sha256") or {}
    if not all(isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in sums.values()):
        raise _bad(path, "has weights_sha256 entries that are not sha256 hex digests")
    for name in payload.get("imports") or []:
        if not isinstance(name, str) or not _MODULE_NAME.match(name):
            raise _bad(path, f"has imports entry {name!r}, which is not a module name")
    return payload


# ---------------------------------------------------------------- weight checksums


def _digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tensors(ep) -> dict[str, torch.Tensor]:
    out = {}
    for table in (ep.state_dict, getattr(ep, "constants", {}) or {}):
        for name, value in table.items():
            if type(value) in (torch.Tensor, torch.nn.Parameter):
                out[name] = value
    return out


def weight_checksums(ep) -> dict[str, str]:
    """sha256 of every plain weight, buffer and tensor constant of an ExportedProgram, by name."""
    return {name: _digest(t) for name, t in sorted(_tensors(ep).items())}


def check_checksums(path: Path, ep, expected: dict) -> None:
    """Raise InputError when a weight differs from the checksum the record holds (damaged file)."""
    actual = weight_checksums(ep)
    bad = [name for name, digest in expected.items() if actual.get(name) != digest]
    if bad:
        shown = ", ".join(repr(b) for b in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise InputError(f"{str(path)!r}: the weights {shown} do not match the checksums in its conversion "
                         "record: the file was damaged or altered after it was saved. Convert the model again "
                         "or restore the file from a good copy")


# ---------------------------------------------------------------- output types


def output_modules(ep) -> list[str]:
    """Modules that define the pytree types of a program's inputs and outputs (e.g.
    transformers.modeling_outputs for a ModelOutput): a fresh process must import them before
    torch.export.load can rebuild the output structure."""
    found: set[str] = set()

    def walk(spec):
        if spec is None:
            return
        typ = getattr(spec, "type", None)
        module = getattr(typ, "__module__", None) or ""
        if module and module.split(".")[0] not in ("builtins", "collections", "torch", "typing"):
            found.add(module)
        children = getattr(spec, "children_specs", None)
        if children is None:
            children = [spec.child(i) for i in range(getattr(spec, "num_children", 0))]
        for child in children:
            walk(child)

    for sig in (getattr(ep, "call_spec", None),):
        walk(getattr(sig, "in_spec", None))
        walk(getattr(sig, "out_spec", None))
    return sorted(found)


def import_output_modules(names: list[str]) -> list[str]:
    """Import the allow-listed modules of `names`; returns those not imported (not on the list)."""
    skipped = []
    for name in names:
        if name.split(".")[0] not in IMPORT_ALLOWED or not _MODULE_NAME.match(name):
            skipped.append(name)
            continue
        try:
            importlib.import_module(name)
        except ImportError:
            skipped.append(name)
    return skipped
