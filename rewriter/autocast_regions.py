"""The model's own autocast regions: found at capture, recorded on every node they contain.

Models turn autocast off where precision matters (Hugging Face rotary embeddings run
`with torch.autocast(device_type, enabled=False): freqs = inv_freq @ position_ids` in fp32) or run a
region in a dtype of their choosing. A conversion that ignored them would round exactly what the
author protected. This module finds the regions; passes/analysis/assign.py applies them (rule
"autocast-region"): in a region with autocast off every floating-point op keeps its traced dtype, in a
region with autocast on the tensor-core ops run in the region's dtype.

torch.export path: pre-dispatch export turns each region into a `wrap_with_autocast` higher-order op
around a body graph, and `run_decompositions` inlines the body without a trace of the region.
`decompose(ep)` puts a marker call at the start and at the end of every body; while
run_decompositions retraces the program, the markers annotate the nodes the body produces
(torch.fx.traceback.annotate, which torch copies into node.meta["custom"]), and the annotation is then
moved to node.meta[meta.AUTOCAST]. Nested regions: the innermost wins. A marker before each op of a
body gives its nodes the op's module path and stack trace (nn_module_stack), which the inlining
would otherwise replace by the region's.

torch.fx.symbolic_trace path: `tracing(tracer)` wraps torch.autocast's __enter__/__exit__ while the
tracer runs (on that thread only) and records the nodes created in between.

Regions a library hides: transformers' `maybe_autocast(device, enabled=False)` is a nullcontext when
autocast is off, as it is at capture; `visible()` (both paths) makes it enter the disabled autocast, which
changes no value, so the region is seen (GPT-2's upcast attention, Nemotron, Ernie, ESM, Phi-4...).

Record (meta.AUTOCAST): {"enabled": bool, "dtype": "bfloat16" | None, "device": "cuda",
"module": "model.rotary_emb" | None, "source": "modeling_llama.py:123: freqs = ..." | None}.

Before (captured):  inv_freq(fp32) -> matmul -> cos            (no trace of the region)
After (annotated):  matmul {AUTOCAST: enabled=False, module 'rotary_emb', 'modeling.py:12: freqs = ...'}
"""
from __future__ import annotations

import contextlib
import json
import os
import inspect
import sys
import threading
import traceback
import warnings
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback

from rewriter import meta

__all__ = ["decompose", "tracing", "visible", "describe", "regions_of"]

_KEY = "rewriter.autocast_region"  # the key inside node.meta["custom"] while run_decompositions retraces
_local = threading.local()
_install_lock = threading.Lock()  # guards the patches of visible() and tracing()


def describe(record: dict) -> str:
    """"torch.autocast('cuda', enabled=False) (module 'rotary_emb', modeling.py:12: freqs = ...)"."""
    device = record.get("device") or "cuda"
    what = (f"torch.autocast('{device}', enabled=False)" if not record.get("enabled") else
            f"torch.autocast('{device}', dtype=torch.{record.get('dtype')})")
    where = f"module '{record['module']}'" if record.get("module") else "the top-level forward"
    return f"{what} ({where}{', ' + record['source'] if record.get('source') else ''})"


def regions_of(gm: fx.GraphModule) -> list[dict]:
    """The distinct region records on the nodes of `gm`, in graph order."""
    seen: dict[str, dict] = {}
    for node in gm.graph.nodes:
        record = meta.get(node, meta.AUTOCAST)
        if record:
            seen.setdefault(json.dumps(record, sort_keys=True), record)
    return list(seen.values())


# ---------------------------------------------------------------- regions libraries hide


@contextlib.contextmanager
def visible() -> Iterator[None]:
    """While the model is captured, library helpers that skip `torch.autocast(enabled=False)` when
    autocast is off enter it anyway, so the region is seen.

    transformers' `maybe_autocast(device, enabled=False)` returns a nullcontext unless autocast is on
    (GPT-2's upcast attention, Nemotron's layer norm, Ernie/ESM/Phi-4 rotary code...): captured in
    fp32, the region would vanish and its matmuls turn 16-bit. Entering a disabled autocast where
    autocast is already off changes no value, so the patched helper computes the same in every
    thread; it is installed by the first capture and removed by the last.

    Example:
        >>> with autocast_regions.visible():
        ...     ep = torch.export.export(model, args, strict=False)
    """
    with _install_lock:
        if _visible[0] == 0:
            _patch_maybe_autocast()
        _visible[0] += 1
    try:
        yield
    finally:
        with _install_lock:
            _visible[0] -= 1
            if _visible[0] == 0:
                for module, original in _patched:
                    module.maybe_autocast = original
                _patched.clear()


_visible = [0]                     # captures in progress
_patched: list[tuple[Any, Any]] = []  # (module, its own maybe_autocast) while patched


def _patch_maybe_autocast() -> None:
    # Every function named maybe_autocast that a transformers module holds: the helper has lived in
    # transformers.utils.generic and elsewhere across releases, and `from ... import maybe_autocast` copies it.
    originals: dict[int, Any] = {}
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] != "transformers" or module is None:
            continue
        fn = getattr(module, "maybe_autocast", None)
        if callable(fn) and not getattr(fn, "_rw_visible", False):
            originals.setdefault(id(fn), fn)
    wrapped = {key: _visible_helper(fn) for key, fn in originals.items()}
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] != "transformers" or module is None:
            continue
        fn = getattr(module, "maybe_autocast", None)
        if id(fn) in wrapped and fn is originals[id(fn)]:
            _patched.append((module, fn))
            module.maybe_autocast = wrapped[id(fn)]


def _visible_helper(original):
    try:
        signature = inspect.signature(original)
    except (TypeError, ValueError):
        return original

    def maybe_autocast(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        device_type, enabled = given.get("device_type"), given.get("enabled", True)
        if not enabled and isinstance(device_type, str) and device_type != "meta":
            return torch.autocast(device_type, dtype=given.get("dtype"), enabled=False,
                                  cache_enabled=given.get("cache_enabled"))
        return original(*args, **kwargs)

    maybe_autocast._rw_visible = True
    return maybe_autocast


# ---------------------------------------------------------------- torch.export path


def _hop():
    return getattr(getattr(torch.ops, "higher_order", None), "wrap_with_autocast", None)


def decompose(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """`ep.run_decompositions({})`, keeping the model's autocast regions on node.meta[meta.AUTOCAST].

    Args:
        ep: a freshly exported (pre-dispatch) program; its region bodies get marker calls.

    Returns:
        The decomposed program, whose nodes inside a region carry the region's record.

    Example:
        >>> ep = autocast_regions.decompose(torch.export.export(model, args, strict=False))
    """
    _local.saved = {}
    count = _mark_bodies(ep.graph_module) if _hop() is not None else 0
    if not count:
        return ep.run_decompositions({})
    try:
        decomposed = ep.run_decompositions({})
    except Exception as exc:  # a torch that will not retrace the markers: decompose without them
        _unmark(ep.graph_module)
        decomposed = ep.run_decompositions({})
        warnings.warn(f"the model's torch.autocast regions could not be marked on torch "
                      f"{torch.__version__} ({type(exc).__name__}: {str(exc)[:120]}); they are converted "
                      "like the rest of the model", stacklevel=2)
        return decomposed
    finally:
        _local.saved = {}
        while _local.__dict__.get("annotations"):  # a failed retrace leaves its regions open
            _exit_region()
    if count:
        found = _collect(decomposed.graph_module)
        if not found:
            warnings.warn(f"the model has {count} torch.autocast region(s) but torch {torch.__version__} "
                          "did not keep their annotation through run_decompositions: they are converted "
                          "like the rest of the model", stacklevel=2)
    return decomposed


def _mark_bodies(gm: fx.GraphModule) -> int:
    """Markers at the start and the end of every wrap_with_autocast body (recursively); their count."""
    hop, count = _hop(), 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is not hop:  # another region op (torch.no_grad: wrap_with_set_grad_enabled,
            for body in _bodies(gm, node):  # e.g. HF rotary embeddings): its body may hold regions
                count += _mark_bodies(body)
            continue
        device, dtype, enabled = node.args[0], node.args[1], bool(node.args[2])
        body_node = node.args[4]
        body = getattr(gm, body_node.target) if isinstance(body_node, fx.Node) else None
        if not isinstance(body, fx.GraphModule):
            continue
        first = next((n for n in body.graph.nodes if n.op == "call_function" and n.meta.get("stack_trace")),
                     None)
        record = {"enabled": enabled, "dtype": meta.dtype_name(dtype) if enabled else None,
                  "device": str(device),
                  "module": _module_of(node), "source": _source_of(first)}
        graph = body.graph
        for op in [n for n in graph.nodes if n.op == "call_function"]:
            saved = {k: op.meta[k] for k in ("nn_module_stack", "stack_trace") if op.meta.get(k)}
            if saved:
                _local.saved[len(_local.saved)] = saved
                with graph.inserting_before(op):
                    graph.call_function(_node_meta, (len(_local.saved) - 1,))
        start = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(start):
            graph.call_function(_enter_region, (json.dumps(record),))
        with graph.inserting_before(graph.output_node()):
            graph.call_function(_exit_region, ())
        body.recompile()
        count += 1 + _mark_bodies(body)
    return count


def _bodies(gm: fx.GraphModule, node: fx.Node) -> list[fx.GraphModule]:
    """The graph modules a higher-order op node calls (its get_attr arguments)."""
    found = []
    for arg in node.args:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            body = getattr(gm, arg.target, None)
            if isinstance(body, fx.GraphModule):
                found.append(body)
    return found


def _unmark(gm: fx.GraphModule) -> None:
    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            markers = [n for n in module.graph.nodes if n.target in (_enter_region, _exit_region, _node_meta)]
            for node in markers:
                module.graph.erase_node(node)
            if markers:
                module.recompile()


def _module_of(node) -> str | None:
    """Module path of the module whose forward opens the region (None: the model's own forward)."""
    if node is None or not node.meta.get("nn_module_stack"):
        return None
    return meta.module_path(node) or None


def _source_of(node) -> str | None:
    """'file.py:line: code' of the innermost frame outside torch in the node's stack trace: the first
    line of the region that computes something (`freqs = inv @ pos`, `h = self.lin2(h)`)."""
    trace = (node.meta.get("stack_trace") or "") if node is not None else ""
    lines = [t for t in trace.strip().splitlines() if t.strip()]
    for i in range(len(lines) - 1, -1, -1):
        text = lines[i].strip()
        if text.startswith('File "'):
            path, _, rest = text[len('File "'):].partition('"')
            if os.sep + "torch" + os.sep in path:
                continue
            line = rest.split("line ", 1)[-1].split(",", 1)[0].strip()
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            code = "" if code.startswith('File "') else code  # no source text (<stdin>, exec)
            return f"{os.path.basename(path)}:{line}: {code}".rstrip(": ")
    return None


def _enter_region(record: str) -> None:
    """Marker at the start of a region body: annotate the nodes the retrace creates from here on."""
    stack = _local.__dict__.setdefault("annotations", [])
    annotate = getattr(fx_traceback, "annotate", None) or _annotate  # public since torch 2.9
    context = annotate({_KEY: record})
    context.__enter__()
    stack.append(context)


def _node_meta(key: int) -> None:
    """Marker before each op of a region body: the nodes the retrace makes for the op get the op's
    module path and stack trace (the body runs as a plain call, not node by node, so torch would
    give them the region's)."""
    saved = (_local.__dict__.get("saved") or {}).get(key)
    if saved and fx_traceback.has_preserved_node_meta():
        fx_traceback.current_meta.update(saved)


@contextlib.contextmanager
def _annotate(values: dict) -> Iterator[None]:
    """torch.fx.traceback.annotate for a torch without it: the same update of current_meta["custom"]."""
    current = fx_traceback.current_meta
    had, old = "custom" in current, dict(current.get("custom") or {})
    current["custom"] = {**old, **values}
    try:
        yield
    finally:
        if had:
            current["custom"] = old
        else:
            current.pop("custom", None)


def _exit_region() -> None:
    stack = _local.__dict__.get("annotations") or []
    if stack:
        stack.pop().__exit__(None, None, None)


for _fn in (_enter_region, _exit_region, _node_meta):  # kept by dead-code elimination: they have no users
    if hasattr(fx.node, "has_side_effect"):
        fx.node.has_side_effect(_fn)
    else:  # older torch.fx: the registry the decorator fills
        fx.node._side_effectful_functions.add(_fn)


def _collect(gm: fx.GraphModule) -> int:
    """Move the annotation from node.meta["custom"] to node.meta[meta.AUTOCAST]; the nodes found."""
    found = 0
    for node in gm.graph.nodes:
        custom = node.meta.get("custom")
        if not isinstance(custom, dict) or _KEY not in custom:
            continue
        record = json.loads(custom.pop(_KEY))
        if not custom:
            del node.meta["custom"]
        meta.put(node, meta.AUTOCAST, record)
        found += 1
    return found


# ---------------------------------------------------------------- torch.fx.symbolic_trace path


@contextlib.contextmanager
def tracing(tracer: fx.Tracer) -> Iterator[None]:
    """While `tracer` traces on this thread, record every autocast region on the nodes created in it.

    torch.autocast's __enter__/__exit__ are wrapped while any thread traces (installed by the first,
    removed by the last); the wrappers act only for a thread that is tracing and pass through for
    every other.

    Args:
        tracer: the torch.fx tracer; its `innermost()` (when it has one) names the current module.

    Example:
        >>> with autocast_regions.tracing(tracer):
        ...     graph = tracer.trace(model)
    """
    tracers = _local.__dict__.setdefault("tracers", [])
    tracers.append((tracer, []))
    hidden = visible()
    hidden.__enter__()
    with _install_lock:
        if _installed[0] == 0:
            cls = torch.amp.autocast_mode.autocast
            _originals[:] = [cls.__enter__, cls.__exit__]
            cls.__enter__, cls.__exit__ = _wrapped_enter, _wrapped_exit
        _installed[0] += 1
    try:
        yield
    finally:
        tracers.pop()
        hidden.__exit__(None, None, None)
        with _install_lock:
            _installed[0] -= 1
            if _installed[0] == 0:
                cls = torch.amp.autocast_mode.autocast
                cls.__enter__, cls.__exit__ = _originals


_installed = [0]       # threads tracing now
_originals: list = []  # torch.autocast's own __enter__ and __exit__ while wrapped


def _wrapped_enter(self):
    tracers = _local.__dict__.get("tracers")
    if tracers and getattr(tracers[-1][0], "graph", None) is not None:
        tracer, open_regions = tracers[-1]
        record = {"enabled": bool(self._enabled),
                  "dtype": meta.dtype_name(self.fast_dtype) if self._enabled else None,
                  "device": str(self.device), "module": _tracer_module(tracer),
                  "source": _caller_source()}
        open_regions.append((record, set(tracer.graph.nodes)))
    return _originals[0](self)


def _wrapped_exit(self, *exc: Any):
    result = _originals[1](self, *exc)
    tracers = _local.__dict__.get("tracers")
    if tracers and tracers[-1][1]:
        tracer, open_regions = tracers[-1]
        record, before = open_regions.pop()
        for node in tracer.graph.nodes:  # the innermost region closes first and wins
            if node not in before and node.op not in ("placeholder", "output") \
                    and meta.AUTOCAST not in node.meta:
                meta.put(node, meta.AUTOCAST, dict(record))
    return result


def _tracer_module(tracer) -> str | None:
    innermost = getattr(tracer, "innermost", None)
    path = innermost() if callable(innermost) else None
    return None if path in (None, "", "<top level>") else path


_SKIP = (os.sep + "torch" + os.sep, os.sep + "contextlib.py", os.path.abspath(__file__))


def _caller_source() -> str | None:
    """'file.py:line: code' of the innermost frame outside torch and this module (the `with` line)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not any(s in frame.filename for s in _SKIP):
            return f"{os.path.basename(frame.filename)}:{frame.lineno}: {(frame.line or '').strip()}"
    return None
