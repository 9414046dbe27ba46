"""Graph capture: nn.Module + example inputs -> aten-level torch.fx.GraphModule.

torch.export first (non-strict, batch dimension dynamic when the model allows it), functionalised with
`run_decompositions({})` so in-place ops become their functional forms while linear, conv and
layer_norm stay whole. When export fails, torch.fx.symbolic_trace plus shape propagation, with the
parameterised leaf modules (Linear, Conv, norms, Embedding) inlined as functional calls so both paths
give the same kind of graph: parameters as get_attr nodes, dtype/shape on every node, module path
in nn_module_stack. When both fail, a CaptureError names the module and the source line.

torch.export runs on a copy of the model in which every eligible nn.MultiheadAttention(batch_first=True)
computes self-attention batch-first, without the sequence-first transposes and copies of its traced
path (rewriter/attention_swap.py): same parameters, same module paths, the user's model untouched. The
attention nodes it produced say so in meta.REWRITTEN ({"pass": "capture", ...}). Should export fail on
that copy, it is retried on the model as it is.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import threading
import traceback
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from rewriter import autocast_regions
from rewriter.attention_swap import batch_first_copy, record_swaps
from rewriter.grad_regions import cut_no_grad, flag_no_grad_regions
from rewriter.errors import CaptureError, InputError

__all__ = ["Captured", "capture", "normalize_inputs", "batch_dynamic_shapes", "CAPTURE_LOCK"]

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


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = next((t for t in text if t.strip()), type(exc).__name__)
    return (line[:limit] + "...") if len(line) > limit else line


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
                f"{' at ' + frame if frame else ''}: {_first_line(exc)}. "
                "Check that the example inputs have the shapes and dtypes the model's forward expects."
            ) from exc


def batch_dynamic_shapes(forward, args: tuple, kwargs: dict, dim=None):
    """`dynamic_shapes` for torch.export marking dimension 0 of every tensor input as `dim`.

    Args:
        forward: the function that will be exported (its signature names the inputs).
        dim: a torch.export.Dim; Dim.AUTO (dynamic where the model allows it) by default.

    Returns:
        A dict keyed by parameter name, or a tuple of specs when the signature cannot be bound.
    """
    dim = torch.export.Dim.AUTO if dim is None else dim

    def spec(v):
        if isinstance(v, torch.Tensor):
            return {0: dim} if v.dim() >= 1 else None
        if isinstance(v, (list, tuple)):
            return type(v)(spec(x) for x in v)
        if isinstance(v, dict):
            return {k: spec(x) for k, x in v.items()}
        return None

    try:
        sig = inspect.signature(forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return tuple(spec(a) for a in args) if not kwargs else None
    shapes = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(spec(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: spec(v) for k, v in value.items()}
        else:
            shapes[name] = spec(value)
    return shapes


def _export(model, args, kwargs, dynamic: bool, train: bool = False):
    shapes = batch_dynamic_shapes(model.forward, args, kwargs) if dynamic else None
    with autocast_regions.visible():  # regions transformers' maybe_autocast would hide
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
    if train:
        flag_no_grad_regions(ep.graph_module)
    return autocast_regions.decompose(ep)  # run_decompositions({}), the model's autocast regions kept


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


# ---------------------------------------------------------------- symbolic_trace fallback


class _PathTracer(fx.Tracer):
    """symbolic_trace that records the module path of every node and names the failing module."""

    def __init__(self):
        super().__init__()
        self.stack: list[tuple[str, type]] = []

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.stack.append((path, type(m)))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            # the stack unwinds before trace() sees the error: remember the innermost module now
            if not hasattr(exc, "_rewriter_module"):
                exc._rewriter_module = self.innermost()  # type: ignore[attr-defined]
            raise
        finally:
            self.stack.pop()

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        stack = {p: (p, f"{t.__module__}.{t.__qualname__}") for p, t in self.stack if p}
        if kind == "call_module":
            mod = self.root.get_submodule(target)
            stack[target] = (target, f"{type(mod).__module__}.{type(mod).__qualname__}")
        if stack:
            node.meta["nn_module_stack"] = stack
        return node

    def innermost(self) -> str:
        return self.stack[-1][0] if self.stack and self.stack[-1][0] else "<top level>"


def _inline_leaf_modules(gm: fx.GraphModule) -> None:
    """Replace call_module nodes of parameterised leaf modules by functional calls on get_attr params."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or node.kwargs:
            continue
        mod = gm.get_submodule(node.target)
        call = _functional_form(mod)
        if call is None:
            continue
        fn, params, make_args = call
        with graph.inserting_before(node):
            getters = {p: (graph.get_attr(f"{node.target}.{p}") if getattr(mod, p) is not None else None)
                       for p in params}
            for g in getters.values():
                if g is not None:
                    g.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
            new = graph.call_function(fn, make_args(node.args[0], getters), {})
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()


def _functional_form(mod):
    if isinstance(mod, nn.Linear):
        return F.linear, ("weight", "bias"), lambda x, g: (x, g["weight"], g["bias"])
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.padding_mode == "zeros" \
            and not isinstance(mod.padding, str):
        fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(mod.kernel_size)]
        return fn, ("weight", "bias"), lambda x, g: (x, g["weight"], g["bias"], mod.stride, mod.padding,
                                                     mod.dilation, mod.groups)
    if isinstance(mod, nn.LayerNorm):
        return F.layer_norm, ("weight", "bias"), lambda x, g: (x, mod.normalized_shape, g["weight"],
                                                               g["bias"], mod.eps)
    if isinstance(mod, nn.GroupNorm):
        return F.group_norm, ("weight", "bias"), lambda x, g: (x, mod.num_groups, g["weight"], g["bias"],
                                                               mod.eps)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm) and not mod.training and mod.track_running_stats:
        return F.batch_norm, ("running_mean", "running_var", "weight", "bias"), \
            lambda x, g: (x, g["running_mean"], g["running_var"], g["weight"], g["bias"], False,
                          0.0, mod.eps)
    if isinstance(mod, nn.Embedding) and mod.max_norm is None:
        return F.embedding, ("weight",), lambda x, g: (x, g["weight"], mod.padding_idx)
    return None


def _symbolic_trace(model, args, kwargs):
    from torch.fx.passes.shape_prop import ShapeProp

    tracer = _PathTracer()
    try:
        with autocast_regions.tracing(tracer):  # the model's autocast regions, on their nodes
            graph = tracer.trace(model)
    except Exception as exc:
        if not hasattr(exc, "_rewriter_module"):
            exc._rewriter_module = tracer.innermost()  # type: ignore[attr-defined]
        raise
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _inline_leaf_modules(gm)
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    flat = [bound.arguments[n.target] for n in gm.graph.nodes if n.op == "placeholder"
            if n.target in bound.arguments]
    ShapeProp(gm).propagate(*flat)
    return gm


# ---------------------------------------------------------------- entry point


def capture(model: nn.Module, args: tuple, kwargs: dict, *, dynamic_batch: bool = True,
            train: bool = False) -> Captured:
    """Capture `model` as an aten-level GraphModule.

    Args:
        model: the module; it is not modified (train/eval flags are restored afterwards).
        args, kwargs: example inputs, already normalised by `normalize_inputs`.
        dynamic_batch: try to keep dimension 0 dynamic.
        train: capture in training mode (dropout, batch-norm statistics).

    Returns:
        Captured, whose `method` says which path was taken and `notes` what to know about it.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    notes: list[str] = []
    with _mode(model, train):
        with _buffers_restored(model, True):  # a reference run may count steps or update statistics
            run_reference(model, args, kwargs)
        # made under _mode, so the copy's modules carry the same train/eval flags
        swapped_model, swapped = batch_first_copy(model)
        export_error = swap_error = None
        for target in ((swapped_model, model) if swapped else (model,)):
            attempt_notes: list[str] = []
            with _track_modules(target) as tracker:
                try:
                    try:
                        ep = _export(target, args, kwargs, dynamic_batch, train)
                    except Exception as exc:
                        if not dynamic_batch:
                            raise
                        attempt_notes.append(f"dynamic batch export failed ({_first_line(exc, 120)}); "
                                             "captured with static shapes")
                        ep = _export(target, args, kwargs, False, train)
                except Exception as exc:
                    export_error = (exc, tracker.innermost(), _user_frame(exc))
            if export_error is None:
                notes.extend(attempt_notes)
                if swap_error is not None:
                    notes.append("export with batch-first nn.MultiheadAttention failed "
                                 f"({_first_line(swap_error, 120)}); exported the attention as it is")
                break
            if swapped and target is swapped_model:
                if not _may_be_the_swap(export_error[1], swapped):
                    break  # it failed elsewhere: the model as it is would fail the same way
                swap_error, export_error = export_error[0], None
        if export_error is None:
            gm = ep.module()
            if train and cut_no_grad(gm):
                notes.append("torch.no_grad() regions of forward carry no gradient (their results are "
                             "detached)")
            _untie_parameters(gm, model)
            _views_to_reshapes(gm)
            batch_first = record_swaps(gm, swapped_model) if target is swapped_model and swapped else []
            if batch_first:
                notes.append("nn.MultiheadAttention run batch-first (no transposes, same weights) at "
                             + ", ".join(f"'{p}'" for p in batch_first))
            dynamic = _batch_is_dynamic(gm)
            if dynamic_batch and not dynamic:
                notes.append("batch dimension is static (the model or an example batch of 1 fixed it); "
                             "use an example batch of 2 or more to keep it dynamic")
            return Captured(gm, "torch.export", dynamic, notes, args, kwargs, batch_first)
        try:
            # on a copy: the traced graph holds the modules it calls, and the passes after it cast,
            # fold and delete their weights and buffers; the caller's model must stay as it was
            gm = _symbolic_trace(_private_copy(model, export_error), args, kwargs)
        except CaptureError:
            raise
        except Exception as exc:
            raise _capture_error(model, export_error, exc) from exc
    exc, where, _frame = export_error
    notes.append(f"torch.export failed in module '{where}' ({_first_line(exc, 160)}); "
                 "captured with torch.fx.symbolic_trace")
    return Captured(gm, "torch.fx.symbolic_trace", True, notes, args, kwargs)


def _private_copy(model: nn.Module, export_error) -> nn.Module:
    import copy

    try:
        return copy.deepcopy(model)
    except Exception as exc:
        raise CaptureError(
            f"could not capture {type(model).__name__}: torch.export failed ({_first_line(export_error[0])}) "
            f"and the torch.fx.symbolic_trace fallback works on a copy of the model, which copy.deepcopy "
            f"could not make ({_first_line(exc)}). Make the model exportable, or deep-copyable") from exc


def _may_be_the_swap(where: str, swapped: list[str]) -> bool:
    """Whether an export failure in module `where` may come from a batch-first attention module:
    unless it is known to lie outside all of them, export is retried on the model as it is."""
    if where == "<top level>":
        return True
    return any(where == p or where.startswith(p + ".") for p in swapped)


def _capture_error(model, export_error, trace_exc) -> CaptureError:
    exc, where, frame = export_error
    t_where = getattr(trace_exc, "_rewriter_module", "<top level>")
    t_frame = _user_frame(trace_exc)
    return CaptureError(
        f"could not capture {type(model).__name__}. torch.export failed in module '{where}'"
        f"{' at ' + frame if frame else ''}: {_first_line(exc)}. torch.fx.symbolic_trace failed in "
        f"module '{t_where}'{' at ' + t_frame if t_frame else ''}: {_first_line(trace_exc)}. "
        "What to do: replace Python control flow that depends on tensor values with torch.where or "
        "torch.cond, move non-tensor side effects (printing, numpy, .item()) out of forward, or convert "
        "the traceable submodules separately."
    )
