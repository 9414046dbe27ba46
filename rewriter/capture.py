"""Graph capture: nn.Module + example inputs -> aten-level torch.fx.GraphModule.

torch.export first (non-strict; every dimension the model allows stays dynamic, see
rewriter/capture_inputs.py, which also replaces export's input guards by InputErrors), functionalised with
`run_decompositions({})` so in-place ops become their functional forms while linear, conv and
layer_norm stay whole. When export fails, torch.fx.symbolic_trace plus shape propagation, with the
parameterised leaf modules (Linear, Conv, norms, Embedding) inlined as functional calls so both paths
give the same kind of graph (rewriter/capture_fx.py). When both fail, a CaptureError names the module
and the source line of the first real cause: the error of the most dynamic export of the model as it
is (not a later retry's). Outputs holding transformers caches (DynamicCache, EncoderDecoderCache) are
exported as they are: the cache classes are registered with torch's pytree (transformers' helper), so
the converted model returns a cache object where the original does.

torch.export runs on a copy of the model in which every eligible nn.MultiheadAttention(batch_first=True)
computes self-attention batch-first, without the sequence-first transposes and copies of its traced
path (rewriter/attention_swap.py): same parameters, same module paths, the user's model untouched. The
attention nodes it produced say so in meta.REWRITTEN ({"pass": "capture", ...}). Should export fail on
that copy, it is retried on the model as it is.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import traceback
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from rewriter import autocast_regions, capture_budget, capture_inputs
from rewriter.attention_swap import batch_first_copy, record_swaps
from rewriter.capture_budget import CaptureTimeout
from rewriter.capture_fx import symbolic_trace
from rewriter.capture_inputs import batch_dynamic_shapes, dynamic_shapes_for
from rewriter.errors import CaptureError, InputError, first_line
from rewriter.grad_regions import cut_no_grad, flag_no_grad_regions

__all__ = ["Captured", "capture", "normalize_inputs", "batch_dynamic_shapes", "dynamic_shapes_for",
           "run_reference", "CAPTURE_LOCK"]

# torch.export, fake tensors and the module patching of capture are not thread-safe (4 threads
# converting one model, or even copies, left fake tensors in the models): convert, and save's
# re-export, hold this lock, so concurrent calls run one after the other.
CAPTURE_LOCK = threading.RLock()


@dataclasses.dataclass
class Captured:
    graph_module: fx.GraphModule
    method: str                  # "torch.export" or "torch.fx.symbolic_trace"
    dynamic_batch: bool
    notes: list[str]
    example_args: tuple
    example_kwargs: dict
    # module paths of the nn.MultiheadAttention modules exported batch-first (attention_swap)
    batch_first_attention: list[str] = dataclasses.field(default_factory=list)
    # captured input shapes (capture_inputs.input_shapes): static sizes and dynamic ranges
    input_shapes: list[dict] = dataclasses.field(default_factory=list)


def normalize_inputs(example_inputs: Any, example_kwargs: dict | None) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple/list of inputs or a dict of keyword inputs."""
    kwargs = dict(example_kwargs or {})
    if example_inputs is None:
        args: tuple = ()
    elif isinstance(example_inputs, torch.Tensor):
        args = (example_inputs,)
    elif isinstance(example_inputs, dict):
        args, kwargs = (), {**dict(example_inputs), **kwargs}
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    else:
        args = (example_inputs,)
    if not args and not kwargs:
        raise InputError("convert needs example inputs: pass example_inputs=(x,) (a tuple of the "
                         "tensors the model's forward takes) or a dict of keyword inputs")
    return args, kwargs


class _ModuleStack:
    """Tracks which module is running, via hooks, so failures can name it."""

    def __init__(self, model: nn.Module):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[str] = []
        self.handles = []
        for m in model.modules():
            self.handles.append(m.register_forward_pre_hook(self._push))
            self.handles.append(m.register_forward_hook(self._pop))

    def _push(self, module, args):
        self.stack.append(self.names.get(id(module), type(module).__name__))

    def _pop(self, module, args, out):
        if self.stack:
            self.stack.pop()

    def innermost(self) -> str:
        return self.stack[-1] if self.stack and self.stack[-1] else "<top level>"

    def close(self):
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def _track_modules(model):
    tracker = _ModuleStack(model)
    try:
        yield tracker
    finally:
        tracker.close()


@contextlib.contextmanager
def _mode(model: nn.Module, train: bool):
    """Temporarily set train/eval on every submodule and restore each flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def _buffers_restored(model: nn.Module, enabled: bool):
    """Put every buffer back afterwards: a reference run in training mode updates batch-norm
    statistics, and convert never modifies its input."""
    saved = [(b, b.detach().clone()) for b in model.buffers()] if enabled else []
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


_SKIP_DIRS = (os.sep + "torch" + os.sep, os.sep + "rewriter" + os.sep, os.sep + "passes" + os.sep,
              os.sep + "contextlib.py", os.sep + "functools.py")


def _user_frame(exc: BaseException) -> str:
    """'file:line: source' of the innermost frame outside torch and the rewriter."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if not any(s in frame.filename for s in _SKIP_DIRS):
            return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return ""


def _describe_inputs(args, kwargs) -> str:
    def one(v):
        if isinstance(v, torch.Tensor):
            return f"Tensor{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
        return type(v).__name__
    parts = [f"arg{i}={one(a)}" for i, a in enumerate(args)] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)


def run_reference(model: nn.Module, args: tuple, kwargs: dict):
    """Run the model once on the example inputs; a failure is reported as an input problem."""
    with _track_modules(model) as tracker, torch.no_grad():
        try:
            return model(*args, **kwargs)
        except Exception as exc:
            where = tracker.innermost()
            frame = _user_frame(exc)
            raise InputError(
                f"the model {type(model).__name__} failed on the example inputs "
                f"({_describe_inputs(args, kwargs)}) in module '{where}'"
                f"{' at ' + frame if frame else ''}: {first_line(exc)}. "
                "Check that the example inputs have the shapes and dtypes the model's forward expects."
            ) from exc


@dataclasses.dataclass
class _Attempt:
    """One failed torch.export attempt: on which copy of the model, with which shapes, and why."""

    shapes: str
    exc: BaseException
    where: str
    frame: str


def _shape_plans(model, args, kwargs, *, dynamic_batch: bool, dynamic_shapes, static: bool):
    """[(name, dynamic_shapes)] to try in order: the most dynamic first, static last."""
    if static:
        return [("static", None)]
    if dynamic_shapes is not None:
        return [("dynamic_shapes as given", dynamic_shapes)]
    forward = model.forward
    plans = [(_AUTOMATIC,
              dynamic_shapes_for(forward, args, kwargs, batch=dynamic_batch, other=True))]
    if dynamic_batch:
        plans.append(("dynamic batch", dynamic_shapes_for(forward, args, kwargs, batch=True, other=False)))
    plans.append(("static", None))
    return plans


def _export(model, args, kwargs, shapes, train: bool = False):
    """torch.export, functionalised. A dynamic graph whose guards reject a batch or token length of 1
    (RAFT concatenates its two images and splits them again: a traced size-1 check there excluded
    batch 1) is exported again size-obliviously (export assumes a dynamic size is not 1 instead of
    guarding on it), and that graph is kept when it rejects fewer of them."""
    with autocast_regions.visible():  # regions transformers' maybe_autocast would hide
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
    rejected = capture_inputs.rejects_ones(ep) if shapes is not None else set()
    if rejected:
        with _size_oblivious():
            with autocast_regions.visible():
                oblivious = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
            if len(capture_inputs.rejects_ones(oblivious)) < len(rejected):
                return _decompose(oblivious, train)  # re-traces: under the same setting
    return _decompose(ep, train)


def _decompose(ep, train: bool):
    """run_decompositions({}), keeping the model's autocast regions (and in training graphs its
    torch.no_grad() regions) on their nodes."""
    if train:
        flag_no_grad_regions(ep.graph_module)
    return autocast_regions.decompose(ep)


@contextlib.contextmanager
def _size_oblivious():
    try:
        from torch.fx.experimental import _config
    except ImportError:  # an older torch: export's default guards
        _config = None
    if not hasattr(_config, "backed_size_oblivious"):
        yield
        return
    with _config.patch(backed_size_oblivious=True):
        yield


_AUTOMATIC = "automatic dynamic shapes"


def _export_first(target, args, kwargs, plans, train: bool = False, time_limit_s: float | None = None,
                  timed_out: list | None = None) -> tuple[Any, str | None, list[_Attempt]]:
    """Export `target` with the first shape plan that works: (program, plan name, failed attempts).
    A plan that fails for a reason other than shapes fails the same way statically, so after the
    first failure only the static plan is tried; when that works, the batch-only plan too.

    The automatic plan runs under `time_limit_s` (capture_budget.py); when it runs out, the seconds
    are appended to `timed_out` and the remaining plans are tried as if it had not been there."""
    failures: list[_Attempt] = []

    def attempt(name, shapes, limit=None):
        with _track_modules(target) as tracker:
            try:
                with capture_budget.time_limit(limit):
                    return _export(target, args, kwargs, shapes, train)
            except Exception as exc:  # CaptureTimeout is a BaseException: it passes to the caller
                cause = _root_cause(exc)
                failures.append(_Attempt(name, cause, tracker.innermost(), _user_frame(cause)))
                return None

    first_name, first_shapes = plans[0]
    limit = time_limit_s if first_name == _AUTOMATIC and len(plans) > 1 else None
    try:
        ep = attempt(first_name, first_shapes, limit)
    except CaptureTimeout as exc:
        if timed_out is not None:
            timed_out.append(exc.seconds)
        return _export_first(target, args, kwargs, plans[1:], train)
    if ep is not None or len(plans) == 1:
        return ep, (first_name if ep is not None else None), failures
    static = attempt("static", None)
    if static is None:
        return None, None, failures
    for name, shapes in plans[1:-1]:  # something between: keep what can stay dynamic
        ep = attempt(name, shapes)
        if ep is not None:
            return ep, name, failures
    return static, "static", failures


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost explicitly chained cause (`raise ... from exc`): export wraps some errors."""
    seen = set()
    while exc.__cause__ is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__
    return exc


def _register_output_types(model: nn.Module) -> str | None:
    """Register transformers' cache classes (DynamicCache, EncoderDecoderCache, ...) with torch's
    pytree so export can return them: the converted model then returns a cache object where the
    original does. Returns a note when it could not."""
    import sys

    if "transformers" not in sys.modules or not type(model).__module__.startswith("transformers"):
        return None
    try:
        from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model
    except ImportError:
        try:
            from transformers.integrations.executorch import register_dynamic_cache_export_support
        except ImportError:
            return "transformers provides no pytree registration of its caches: outputs holding one fail"
        register_dynamic_cache_export_support()
        return None
    register_cache_pytrees_for_model(model)
    return None


def _batch_is_dynamic(gm: fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() >= 1 and not isinstance(val.shape[0], int):
                return True
    return False


def _untie_parameters(gm: fx.GraphModule, model: nn.Module) -> None:
    """The exported module shares parameter storage with the user's model: give it its own copy.

    One copy per tensor object, so weights tied in the model (an embedding reused by the LM head) stay
    one parameter: training updates them together, as in the original.
    """
    originals = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers()) if t.numel()}
    copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (original kept alive, copy)

    def copy_of(t: torch.Tensor, make) -> torch.Tensor:
        if id(t) not in copies:
            copies[id(t)] = (t, make(t))
        return copies[id(t)][1]

    for mod in gm.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.numel() and p.data_ptr() in originals:
                setattr(mod, name, copy_of(p, lambda t: nn.Parameter(t.detach().clone(),
                                                                     requires_grad=t.requires_grad)))
        for name, b in list(mod.named_buffers(recurse=False)):
            if b.numel() and b.data_ptr() in originals:
                mod._buffers[name] = copy_of(b, lambda t: t.detach().clone())


def _views_to_reshapes(gm: fx.GraphModule) -> None:
    """Make every `aten.view` an `aten.reshape` so the graph does not depend on traced strides.

    Decompositions that branch on strides (`contiguous`, `reshape`) decide on the fake tensors' strides,
    and those can differ from what the eager kernels return (CPU scaled_dot_product_attention with a
    float mask: the fake output is laid out [B, S, H, D], the real one [B, H, S, D]). The `clone` of a
    `.contiguous()` is then dropped and the `view` after it fails at run time (T5). The graph is
    functional, so a reshape computes the same values as the view; it copies only when it must.
    """
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
            changed = True
    if changed:
        gm.recompile()


# ---------------------------------------------------------------- entry point


def capture(model: nn.Module, args: tuple, kwargs: dict, *, dynamic_batch: bool = True,
            dynamic_shapes: Any = None, static: bool = False, train: bool = False,
            time_limit: float | None = None) -> Captured:
    """Capture `model` as an aten-level GraphModule.

    Args:
        model: the module; it is not modified (train/eval flags are restored afterwards).
        args, kwargs: example inputs, already normalised by `normalize_inputs`.
        dynamic_batch: keep dimension 0 dynamic where the model allows it (False: static batch).
        dynamic_shapes: torch.export's `dynamic_shapes` for the inputs, used as given.
        static: capture every dimension static (for backends that want fixed shapes).
        train: capture in training mode (dropout, batch-norm statistics).
        time_limit: seconds the automatic dynamic-shape export may take (None: no limit); past it,
            only the batch stays dynamic and a note says why (capture_budget.py). Enforced with
            SIGALRM, so only when called on the main thread; on other threads there is no limit.

    Returns:
        Captured, whose `method` says which path was taken and `notes` what to know about it.
        By default every dimension the model allows stays dynamic (capture_inputs.py).

    Example:
        >>> captured = capture(bert, (), {"input_ids": ids})   # batch and sequence length dynamic
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    notes: list[str] = []
    note = _register_output_types(model)
    if note:
        notes.append(note)
    plans = _shape_plans(model, args, kwargs, dynamic_batch=dynamic_batch, dynamic_shapes=dynamic_shapes,
                         static=static)
    with _mode(model, train):
        with _buffers_restored(model, True):  # a reference run may count steps or update statistics
            run_reference(model, args, kwargs)
        # made under _mode, so the copy's modules carry the same train/eval flags
        swapped_model, swapped = batch_first_copy(model)
        ep, plan, failures, swap_failures, timed_out = None, None, [], [], []
        for target in ((swapped_model, model) if swapped else (model,)):
            if timed_out and plans[0][0] == _AUTOMATIC and len(plans) > 1:
                plans = plans[1:]  # it ran out of time once: not again on the other copy
            ep, plan, failures = _export_first(target, args, kwargs, plans, train, time_limit, timed_out)
            if ep is not None:
                break
            if target is swapped_model:
                swap_failures = failures
                if not _may_be_the_swap(failures[0].where, swapped):
                    break  # it failed elsewhere: the model as it is would fail the same way
        if timed_out:
            notes.append(_timeout_note(timed_out[0], plan))
        if ep is not None:
            if swap_failures:
                notes.append("export with batch-first nn.MultiheadAttention failed "
                             f"({first_line(swap_failures[0].exc, 120)}); exported the attention as it is")
            return _finish(ep, model, swapped_model if target is swapped_model else None,
                           plan, plans[0][0], failures, notes, args, kwargs, train)
        first = failures[0]  # the first plan on the last model tried: the first real cause
        if dynamic_shapes is not None:
            raise _shapes_error(model, first)
        try:
            # on a copy: the traced graph holds the modules it calls, and the passes after it cast,
            # fold and delete their weights and buffers; the caller's model must stay as it was
            gm = symbolic_trace(_private_copy(model, first.exc), args, kwargs)
        except Exception as exc:
            raise _capture_error(model, first, exc) from exc
    notes.append(f"torch.export failed in module '{first.where}'"
                 f"{' at ' + first.frame if first.frame else ''} ({first_line(first.exc, 160)}); "
                 "captured with torch.fx.symbolic_trace")
    return Captured(gm, "torch.fx.symbolic_trace", True, notes, args, kwargs)


def _private_copy(model: nn.Module, export_error: BaseException) -> nn.Module:
    import copy

    try:
        return copy.deepcopy(model)
    except Exception as exc:
        raise CaptureError(
            f"could not capture {type(model).__name__}: torch.export failed ({first_line(export_error)}) "
            f"and the torch.fx.symbolic_trace fallback works on a copy of the model, which copy.deepcopy "
            f"could not make ({first_line(exc)}). Make the model exportable, or deep-copyable") from exc


def _finish(ep, model, swapped_model, plan, wanted, failures, notes, args, kwargs, train: bool = False) -> Captured:
    """The exported program as the GraphModule the passes get, with its input checks and notes."""
    gm = ep.module()
    if train and cut_no_grad(gm):
        notes.append("torch.no_grad() regions of forward carry no gradient (their results are detached)")
    _untie_parameters(gm, model)
    _views_to_reshapes(gm)
    shapes = capture_inputs.install(gm, ep.range_constraints, model.forward, args, kwargs)
    if plan != wanted and failures:
        notes.append(f"export with {wanted} failed in module '{failures[0].where}' "
                     f"({first_line(failures[0].exc, 120)}); captured with {plan}")
    batch_first = record_swaps(gm, swapped_model) if swapped_model is not None else []
    if batch_first:
        notes.append("nn.MultiheadAttention run batch-first (no transposes, same weights) at "
                     + ", ".join(f"'{p}'" for p in batch_first))
    dynamic = _batch_is_dynamic(gm)
    described = capture_inputs.describe_shapes(shapes)
    if plan != "static" and described:
        notes.append(f"input shapes (sN:min..max are dynamic): {described}")
    if plan != "static" and not dynamic and any(entry.get("dims") for entry in shapes):
        notes.append("batch dimension is static (the model or an example batch of 1 fixed it); "
                     "use an example batch of 2 or more to keep it dynamic")
    return Captured(gm, "torch.export", dynamic, notes, args, kwargs, batch_first, shapes)


def _timeout_note(seconds: float, plan: str | None) -> str:
    kept = {"dynamic batch": "only the batch is dynamic", "static": "every dimension is static"}.get(
        plan or "", f"captured with {plan}")
    return (f"image height/width and sequence length kept static ({kept}): capture with every dimension "
            f"dynamic exceeded {seconds:g} s (capture_time_limit; torch.export's symbolic shape "
            "reasoning on this model is slow). Pass dynamic_shapes= to insist on dynamic sizes, or "
            "capture_time_limit=None to wait for it")


def _may_be_the_swap(where: str, swapped: list[str]) -> bool:
    """Whether an export failure in module `where` may come from a batch-first attention module:
    unless it is known to lie outside all of them, export is retried on the model as it is."""
    if where == "<top level>":
        return True
    return any(where == p or where.startswith(p + ".") for p in swapped)


def _shapes_error(model, first: _Attempt) -> CaptureError:
    return CaptureError(
        f"could not capture {type(model).__name__} with the dynamic_shapes given: torch.export failed "
        f"in module '{first.where}'{' at ' + first.frame if first.frame else ''}: "
        f"{first_line(first.exc, 600)}. What to do: follow torch.export's suggestion above, or leave "
        "dynamic_shapes out to let export find the dynamic dimensions itself (static=True fixes all).")


def _capture_error(model, first: _Attempt, trace_exc) -> CaptureError:
    t_where = getattr(trace_exc, "_rewriter_module", "<top level>")
    t_frame = _user_frame(trace_exc)
    return CaptureError(
        f"could not capture {type(model).__name__}. torch.export failed in module '{first.where}'"
        f"{' at ' + first.frame if first.frame else ''}: {type(first.exc).__name__}: "
        f"{first_line(first.exc)}. torch.fx.symbolic_trace failed in module '{t_where}'"
        f"{' at ' + t_frame if t_frame else ''}: {first_line(trace_exc)}. "
        "What to do: replace Python control flow that depends on tensor values with torch.where or "
        "torch.cond, move non-tensor side effects (printing, numpy, .item()) out of forward, or convert "
        "the traceable submodules separately."
    )
