"""Torch backend: run a converted GraphModule eagerly, through torch.compile, or replayed from CUDA graphs.

    >>> fast = rewriter.convert(model, (x,), precision="bf16")            # eager GraphModule
    >>> fast = optimize(fast, mode="compile", compile_mode="max-autotune-no-cudagraphs")
    >>> fast = optimize(fast, mode="cuda_graphs")                         # static shapes, GPU only
    >>> gm = graph_module_of(fast)                                        # the converted GraphModule

The same choice is `rewriter.convert(..., backend="compile", backend_options={...})`.

Modes:
  eager        the converted `torch.fx.GraphModule` itself (no wrapper), given the fast forward of
               backends/fast_forward.py: the same graph and kernels without the per-op Python
               overhead of the standard fx forward (which still runs under tracing). Takes no options.
  compile      `torch.compile` of the converted graph (fullgraph by default: a graph break is an error,
               never a silent partial fallback). Shapes follow torch.compile's automatic dynamic
               shapes: the first call compiles for its shapes (static sizes: the fastest kernels, as
               `torch.compile(model)` gets), and a new batch size compiles once more with the batch
               dynamic. `dynamic="batch"` marks dimension 0 of every tensor input dynamic from the first
               compile instead (when the conversion kept the batch dynamic): one compile for every batch
               size, paid for with symbolic sizes in every kernel (up to 30% on small conv nets).
               Options: `compile_mode` ("default", "reduce-overhead", "max-autotune",
               "max-autotune-no-cudagraphs"...), `dynamic` (None: automatic; "batch": as just
               described; True/False are passed to torch.compile), `fullgraph` (True), `compiler` (torch.compile's `backend`,
               "inductor"), `options` (inductor options; not together with `compile_mode`),
               `clone_outputs` (with compile_mode="reduce-overhead": outputs are cloned out of the
               CUDA-graph pool so they survive the next call; default True).
  cuda_graphs  capture the converted graph into a CUDA graph per input signature and replay it.
               The signature is the pytree structure of the inputs plus, per tensor, its shape, dtype
               and device, and per non-tensor input its value; a new signature is captured once (after
               warm-up runs on a side stream) and cached. Every call copies the inputs into the static
               input buffers of its graph and replays it. Options: `clone_outputs` (default True: each
               call returns fresh tensors; False returns the graph's static output buffers, which the
               next call of this module, whatever its shapes, overwrites), `warmup` (eager runs before
               capture, 2), `max_graphs` (None: unbounded; else least recently used graphs are dropped),
               `share_pool` (True: all graphs of this module share one memory pool).
               Inference only: runs under torch.no_grad(); inputs that require grad are refused.
               What cannot be captured is refused with a `BackendError` naming the reason: no CUDA,
               CPU tensors, data-dependent shapes (nonzero, masked_select, unique...), synchronising
               ops (.item(), .tolist(), printing), tensors created on the CPU inside the graph. Nothing
               falls back to eager silently.

Wrappers (`compile`, `cuda_graphs`) are `TorchBackendModule`s: ordinary nn.Modules whose only
submodule is the converted GraphModule, as attribute `graph_module` (so `state_dict()` keys start with
"graph_module."); `.graph`, `.meta` and `.code` read through to it. Code that needs the GraphModule
(diff, save, ONNX export) calls `graph_module_of(obj)`, which also unwraps `torch.compile` and
DataParallel/DistributedDataParallel wrappers. Wrappers are not picklable: save the GraphModule
(`rewriter.save(graph_module_of(fast), path)`) and re-apply the backend after loading.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import sys
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.fx._pytree as fx_pytree
from torch.utils import _pytree as pytree

from rewriter import meta
from rewriter.backend_options import BACKENDS, BackendOptions, backend_name
from rewriter.backends import fast_forward
from rewriter.errors import BackendError, InputError, describe_node, first_line

__all__ = [
    "MODES",
    "optimize",
    "graph_module_of",
    "is_converted",
    "check_options",
    "check_available",
    "no_gpu_reason",
    "input_signature",
    "capture_problems",
    "TorchBackendModule",
    "CompiledModule",
    "CUDAGraphModule",
]

#: Backend modes, in the order the CLI lists them (`--backend eager|compile|cuda_graphs`).
MODES = BACKENDS


def check_options(mode: Any, options: "dict[str, Any] | BackendOptions | None" = None) -> str:
    """Validate a backend mode and its options (rewriter.BackendOptions); returns the canonical mode name.

    Raises:
        ConfigError: unknown mode, unknown option, or an invalid option value.
    """
    return BackendOptions.of(options).check(mode)


def check_available(mode: Any) -> None:
    """Raise BackendError when `mode` cannot run on this machine (cuda_graphs without a CUDA GPU).

    `rewriter.convert` calls it before capturing, so a conversion is not wasted.
    """
    if backend_name(mode) == "cuda_graphs" and not torch.cuda.is_available():
        raise BackendError(f"backend 'cuda_graphs' needs a CUDA GPU: torch.cuda.is_available() is False "
                           f"({no_gpu_reason()}). On the CPU use backend='eager' or backend='compile'.")


def no_gpu_reason() -> str:
    """Why torch sees no CUDA GPU here, in one clause (for error messages)."""
    if torch.version.cuda:
        return f"this torch {torch.__version__} was built with CUDA {torch.version.cuda} but sees no GPU"
    return f"this torch {torch.__version__} is a CPU-only build"


def optimize(gm: Any, mode: str = "eager", **opts: Any) -> nn.Module:
    """Return a callable module that runs the converted GraphModule `gm` in `mode`.

    Args:
        gm: the GraphModule returned by `rewriter.convert` (a wrapper made by this function, or a
            torch.compile'd module, is unwrapped first, so optimize can be re-applied).
        mode: "eager" (returns the GraphModule itself), "compile" or "cuda_graphs".
        **opts: options of the mode; see the module docstring (e.g. compile_mode="reduce-overhead",
            clone_outputs=False, max_graphs=8).

    Returns:
        An nn.Module called exactly like the original model: `gm` for eager, else a
        `TorchBackendModule` whose `graph_module` attribute is `gm`.

    Raises:
        ConfigError: unknown mode or option.
        BackendError: mode="cuda_graphs" without a CUDA GPU.

    Example:
        >>> fast = optimize(rewriter.convert(model, (x,), precision="bf16"), mode="compile")
        >>> fast(x).shape == model(x).shape
        True
    """
    name = check_options(mode, opts)
    gm = graph_module_of(gm)
    if name == "eager":
        fast_forward.install(gm)
        return gm
    if name == "compile":
        return CompiledModule(gm, **opts)
    return CUDAGraphModule(gm, **opts)


def graph_module_of(obj: Any) -> fx.GraphModule:
    """The converted `torch.fx.GraphModule` inside `obj`.

    Unwraps, in any nesting: `TorchBackendModule` (compile / cuda_graphs wrappers of this module),
    modules returned by `torch.compile`, and `DataParallel` / `DistributedDataParallel`. A GraphModule
    is returned as it is.

    Raises:
        InputError: `obj` holds no GraphModule.
    """
    current = obj
    for _ in range(16):
        if isinstance(current, fx.GraphModule):
            return current
        if isinstance(current, TorchBackendModule):
            current = current.graph_module
            continue
        eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # imported by any torch.compile call
        if eval_frame is not None and isinstance(current, eval_frame.OptimizedModule):
            current = current._orig_mod
            continue
        if isinstance(current, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            current = current.module
            continue
        break
    raise InputError(f"expected the GraphModule returned by rewriter.convert (or a backend wrapper of it), "
                     f"got {type(obj).__name__}; convert the model first with "
                     "rewriter.convert(model, example_inputs, precision=...)")


def is_converted(model: Any) -> bool:
    """True for a GraphModule produced by `convert` (or loaded back from a converted .pt2), also
    inside a backend wrapper (`graph_module_of`)."""
    if not isinstance(model, fx.GraphModule):
        try:
            model = graph_module_of(model)
        except InputError:
            return False
    if meta.INFO in model.meta:
        return True
    return any(meta.CREATED in n.meta or meta.DECISION in n.meta for n in model.graph.nodes)


# ----------------------------------------------------------------------------- wrappers


class TorchBackendModule(nn.Module):
    """Base of the backend wrappers: holds the converted GraphModule as `self.graph_module`.

    `.graph`, `.meta` and `.code` read through to the GraphModule; `backend_mode` names the mode
    and `backend_options` the options it was made with.
    """

    backend_mode: str = "eager"

    def __init__(self, gm: fx.GraphModule, options: dict[str, Any]):
        super().__init__()
        self.graph_module = gm
        self.backend_options = dict(options)

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    @property
    def meta(self) -> dict:
        return self.graph_module.meta

    @property
    def code(self) -> str:
        return self.graph_module.code

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.backend_options.items())
        return f"backend={self.backend_mode!r}{', ' + opts if opts else ''}"

    def __reduce_ex__(self, protocol):
        raise BackendError(f"a {self.backend_mode} backend wrapper cannot be pickled: save the converted "
                           "GraphModule with rewriter.save(graph_module_of(model), path) and apply the "
                           "backend again after rewriter.load")

    def __deepcopy__(self, memo):
        import copy

        return type(self)(copy.deepcopy(self.graph_module, memo), **self.backend_options)


def _tensor_leaves(flat: list) -> list[torch.Tensor]:
    return [x for x in flat if isinstance(x, torch.Tensor)]


def _dynamic_batch(gm: fx.GraphModule) -> bool:
    info = gm.meta.get(meta.INFO) or {}
    if "dynamic_batch" in info:
        return bool(info["dynamic_batch"])
    for node in gm.graph.nodes:  # a GraphModule not made by convert: look at the placeholders
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and val.dim() >= 1 and not isinstance(val.shape[0], int):
            return True
    return False


class CompiledModule(TorchBackendModule):
    """`torch.compile` of a converted GraphModule; see the module docstring for the options."""

    backend_mode = "compile"

    def __init__(self, gm: fx.GraphModule, *, compile_mode: str | None = None, dynamic: "bool | str | None" = None,
                 fullgraph: bool = True, compiler: Any = "inductor", options: dict | None = None,
                 clone_outputs: bool = True):
        given = {k: v for k, v in dict(compile_mode=compile_mode, dynamic=dynamic, fullgraph=fullgraph,
                                       compiler=compiler, options=options, clone_outputs=clone_outputs).items()
                 if v != {"fullgraph": True, "compiler": "inductor", "clone_outputs": True}.get(k)}
        check_options("compile", given)
        super().__init__(gm, given)
        self._mark_batch = dynamic == "batch" and _dynamic_batch(gm)
        self._overwrites = compile_mode == "reduce-overhead"
        self._clone = clone_outputs and self._overwrites
        kwargs: dict[str, Any] = {"fullgraph": fullgraph, "backend": compiler}
        if isinstance(dynamic, bool):
            kwargs["dynamic"] = dynamic
        if compile_mode is not None:
            kwargs["mode"] = compile_mode
        if options:
            kwargs["options"] = dict(options)
        # Kept out of the module tree: the compiled object wraps the same GraphModule (its flat twin).
        flat, self.__dict__["_specs"] = _flat_graph(gm)
        self.__dict__["_compiled"] = torch.compile(flat, **kwargs)

    def forward(self, *args, **kwargs):
        if self._mark_batch:
            import torch._dynamo

            for t in _tensor_leaves(pytree.tree_leaves((args, kwargs))):
                if t.dim() >= 1:
                    torch._dynamo.maybe_mark_dynamic(t, 0)
        if self._overwrites:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            if self._specs is None:
                out = self._compiled(*args, **kwargs)
            else:
                in_spec, out_spec = self._specs
                args, kwargs = _pre_hooks(self.graph_module, args, kwargs)  # input checks, call binding
                flat_in = fx_pytree.tree_flatten_spec((args, kwargs), in_spec)
                guards = getattr(self.graph_module, "_guards_fn", None)
                if guards is not None:
                    guards(*flat_in)
                flat_out = self._compiled(*flat_in)
                out = pytree.tree_unflatten(list(flat_out), out_spec)
        except Exception as exc:
            if _is_dynamo_failure(exc):
                raise BackendError(
                    f"torch.compile failed on the converted {self.meta.get('rewriter', {}).get('model', '')} "
                    f"graph: {type(exc).__name__}: {first_line(exc, 400)}. Use backend='eager' or "
                    "backend='cuda_graphs', or pass compile options (e.g. compiler='aot_eager' to "
                    "find out whether the compiler or the tracer fails)") from exc
            raise
        if self._clone:
            out = pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, out)
        return out


def _flat_graph(gm: fx.GraphModule) -> tuple[fx.GraphModule, tuple | None]:
    """A twin of `gm` that takes and returns flat tensors, and the (in, out) specs to (un)flatten around it.

    torch.compile traces what forward runs, the pytree (un)flattening of the call signature included:
    an output class registered by a library (transformers' ModelOutput unflattens through an importlib
    call dynamo refuses: "Attempted to call function marked as skipped") would break the compile. The
    twin shares gm's parameters and buffers; the (un)flattening and the input checks (`_guards_fn`)
    stay in Python, outside the compile.
    """
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None or info.in_spec is None or info.out_spec is None:
        return gm, None
    graph = copy.deepcopy(gm.graph)
    graph._codegen = fx.graph.CodeGen()
    for node in [n for n in graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        graph.erase_node(node)  # the input checks run in Python before the call (an InputError, not a
        # graph break inside the compiled code)
    flat = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    flat.meta = gm.meta
    return flat, (info.in_spec, info.out_spec)


def _pre_hooks(gm: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Run gm's forward pre-hooks as calling gm would (the flat twin has none of them)."""
    for key, hook in gm._forward_pre_hooks.items():
        if key in gm._forward_pre_hooks_with_kwargs:
            result = hook(gm, args, kwargs)
            if result is not None:
                args, kwargs = result
        else:
            result = hook(gm, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    return args, kwargs


def _is_dynamo_failure(exc: BaseException) -> bool:
    exc_mod = sys.modules.get("torch._dynamo.exc")
    return exc_mod is not None and isinstance(exc, exc_mod.TorchDynamoException)


# ----------------------------------------------------------------------------- CUDA graphs


def _leaf_key(value: Any):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    try:
        hash(value)
    except TypeError:
        return ("value", type(value).__name__, repr(value))
    return ("value", type(value).__name__, value)


def input_signature(args: tuple, kwargs: dict | None = None) -> tuple:
    """Cache key of a call: the pytree structure of (args, kwargs) and, per leaf, a tensor's
    (shape, dtype, device) or a non-tensor's value. Strides are not part of it: inputs are copied into
    static buffers of the captured layout."""
    flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
    return _signature(flat, spec)


def _signature(flat: list, spec) -> tuple:
    return (str(spec),) + tuple(_leaf_key(v) for v in flat)


@dataclasses.dataclass
class _Graph:
    """One captured graph: its static input buffers (None at non-tensor leaves) and static outputs."""

    graph: Any
    static_inputs: list
    outputs: list
    out_spec: Any


# ops whose result needs the CPU to wait for the GPU (value-dependent output shapes or Python scalars)
_SYNC_OPS = {
    "aten._local_scalar_dense": ".item() / int(tensor) / float(tensor): the CPU reads a GPU value",
    "aten.item": ".item(): the CPU reads a GPU value",
    "aten.nonzero": "nonzero: the output shape depends on the values",
    "aten.nonzero_static": None,
    "aten.masked_select": "masked_select: the output shape depends on the values",
    "aten.unique": "unique: the output shape depends on the values",
    "aten._unique": "unique: the output shape depends on the values",
    "aten._unique2": "unique: the output shape depends on the values",
    "aten.unique_dim": "unique: the output shape depends on the values",
    "aten.unique_consecutive": "unique_consecutive: the output shape depends on the values",
    "aten.bincount": "bincount: the output shape depends on the values",
    "aten.repeat_interleave.Tensor": "repeat_interleave with tensor repeats: the output shape depends "
                                     "on the values",
    "aten.equal": "equal returns a Python bool: the CPU reads a GPU value",
    "aten.is_nonzero": "bool(tensor): the CPU reads a GPU value",
    "aten.allclose": "allclose returns a Python bool: the CPU reads a GPU value",
    "aten._assert_scalar": None,
}


def _op_key(target) -> str:
    name = getattr(target, "name", None)
    text = name() if callable(name) else str(target)
    return text.replace("::", ".")


def _unbacked(val) -> bool:
    shape = getattr(val, "shape", None)
    if shape is None:
        return False
    for dim in shape:
        node = getattr(dim, "node", None)
        expr = getattr(node, "expr", None)
        if expr is not None and any(str(s).startswith("u") for s in getattr(expr, "free_symbols", ())):
            return True
    return False


def capture_problems(gm: fx.GraphModule) -> tuple[list[str], list[str]]:
    """Scan a graph for what CUDA graph capture cannot record.

    Returns:
        (certain, suspects): messages naming the node and the reason. `certain` problems always break
        capture (synchronising ops, data-dependent shapes) and are refused before capturing;
        `suspects` (tensors created on the CPU inside the graph) are named when a capture fails.
    """
    certain, suspects = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        key = _op_key(node.target)
        base = key.rsplit(".", 1)[0] if key.count(".") >= 2 else key
        reason = _SYNC_OPS.get(key, _SYNC_OPS.get(base))
        if reason:
            certain.append(f"{describe_node(node)}: {reason}")
            continue
        if _unbacked(node.meta.get("val")):
            certain.append(f"{describe_node(node)}: its output shape depends on tensor values "
                           "(a data-dependent shape)")
            continue
        device = node.kwargs.get("device")
        if device is not None and torch.device(device).type == "cpu" and not key.startswith("aten._assert"):
            suspects.append(f"{describe_node(node)}: creates a tensor on the CPU (the graph was captured "
                            "with CPU inputs; convert with the model and example inputs on the GPU)")
    return certain, suspects


_CAPTURE_HINTS = (
    (("not permitted when stream is capturing", "StreamCaptureUnsupported", "capture_begin",
      "current_seed"),
     "an operation synchronised with the CPU during capture (.item(), .tolist(), bool(tensor), nonzero, "
     "masked_select, unique and other data-dependent shapes, printing a tensor, or a CPU<->GPU copy)"),
    (("StreamCaptureInvalidated", "capture was invalidated", "StreamCaptureImplicit"),
     "the capture was invalidated: an operation ran on another stream or thread, on the legacy default "
     "stream, or synchronised with the CPU"),
    (("out of memory",), "the GPU ran out of memory while capturing (each input shape keeps its own "
                         "graph: pass max_graphs=N to bound them)"),
)


def _capture_reason(exc: BaseException) -> str:
    texts, seen, current = [], set(), exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts.append(f"{type(current).__name__}: {first_line(current)}")
        current = current.__cause__ or current.__context__
    joined = " | ".join(texts)
    for needles, hint in _CAPTURE_HINTS:
        if any(n.lower() in joined.lower() for n in needles):
            return f"{hint} [{joined}]"
    return joined


class CUDAGraphModule(TorchBackendModule):
    """Capture-and-replay of a converted GraphModule, one CUDA graph per input signature.

    See the module docstring for the options and what cannot be captured. `num_graphs` tells how many
    graphs are cached, `reset()` drops them (moving the module with `.to()` / `.cuda()` does too).
    """

    backend_mode = "cuda_graphs"

    def __init__(self, gm: fx.GraphModule, *, clone_outputs: bool = True, warmup: int = 2,
                 max_graphs: int | None = None, share_pool: bool = True):
        given = {k: v for k, v in dict(clone_outputs=clone_outputs, warmup=warmup, max_graphs=max_graphs,
                                       share_pool=share_pool).items()
                 if v != {"clone_outputs": True, "warmup": 2, "max_graphs": None, "share_pool": True}[k]}
        check_options("cuda_graphs", given)
        super().__init__(gm, given)
        self.clone_outputs = clone_outputs
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.share_pool = share_pool
        self._graphs: collections.OrderedDict[tuple, _Graph] = collections.OrderedDict()
        self._pool = None
        self.captures = 0  # how many captures this module made (for tests and reports)
        self._check_environment()
        certain, self._suspects = capture_problems(gm)
        if certain:
            raise BackendError("cuda_graphs cannot capture this graph: " + "; ".join(certain[:5])
                               + (f" (and {len(certain) - 5} more)" if len(certain) > 5 else "")
                               + ". Use backend='compile' or backend='eager' for this model.")

    # -- hooks tests replace
    def _check_environment(self) -> None:
        check_available("cuda_graphs")

    def _check_inputs(self, flat: list) -> torch.device:
        tensors = _tensor_leaves(flat)
        where = [t.device for t in tensors]
        cpu = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor) and x.device.type != "cuda"]
        if cpu:
            first = flat[cpu[0]]
            raise BackendError(
                f"cuda_graphs needs every tensor input on a CUDA device; input #{cpu[0]} "
                f"(shape {tuple(first.shape)}, {first.dtype}) is on {first.device}. Move the inputs "
                "and the model to the GPU (model.cuda(), x.cuda()).")
        if any(t.requires_grad for t in tensors) and torch.is_grad_enabled():
            raise BackendError("cuda_graphs is inference only: an input requires grad. Call under "
                               "torch.no_grad(), or use backend='compile' for training")
        params = [t for t in list(self.graph_module.parameters()) + list(self.graph_module.buffers())]
        devices = {t.device for t in params} | set(where)
        off = sorted({str(d) for d in devices if d.type != "cuda"})
        if off:
            raise BackendError(f"cuda_graphs needs the model on a CUDA device; some of its parameters or "
                               f"buffers are on {', '.join(off)}: call .cuda() on the model")
        cuda = sorted({str(d) for d in devices})
        if len(cuda) > 1:
            raise BackendError(f"cuda_graphs captures one device; inputs and parameters are on "
                               f"{', '.join(cuda)}")
        return next(iter(devices)) if devices else torch.device("cuda", torch.cuda.current_device())

    def _capture(self, flat: list, spec) -> _Graph:
        device = self._check_inputs(flat)
        with torch.inference_mode(False), torch.no_grad():  # buffers a later call may copy into
            static = [torch.empty_like(x).copy_(x) if isinstance(x, torch.Tensor) else x for x in flat]
        args, kwargs = pytree.tree_unflatten(static, spec)
        gm = self.graph_module
        with torch.cuda.device(device), torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    gm(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            if self.share_pool and self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._pool if self.share_pool else None):
                    out = gm(*args, **kwargs)
            except Exception as exc:
                suspects = ("; suspects: " + "; ".join(self._suspects[:3])) if self._suspects else ""
                raise BackendError(f"cuda_graphs could not capture the graph for inputs "
                                   f"{_describe(flat)}: {_capture_reason(exc)}{suspects}. Use "
                                   "backend='compile' or backend='eager' for this model.") from exc
        outputs, out_spec = pytree.tree_flatten(out)
        self.captures += 1
        return _Graph(graph, [s if isinstance(s, torch.Tensor) else None for s in static], outputs, out_spec)

    def _replay(self, entry: _Graph, flat: list):
        for buf, x in zip(entry.static_inputs, flat):
            if buf is not None and x.data_ptr() != buf.data_ptr():
                buf.copy_(x)
        entry.graph.replay()
        outs = entry.outputs
        if self.clone_outputs:
            outs = [o.clone() if isinstance(o, torch.Tensor) else o for o in outs]
        return pytree.tree_unflatten(list(outs), entry.out_spec)

    # -- public
    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def reset(self) -> None:
        """Drop every captured graph (they are captured again on the next calls)."""
        self._graphs.clear()
        self._pool = None

    def _apply(self, fn, *args, **kwargs):
        self.reset()  # the graphs read the old parameter memory: never replay them after a move
        return super()._apply(fn, *args, **kwargs)

    def forward(self, *args, **kwargs):
        flat, spec = pytree.tree_flatten((args, kwargs))
        key = _signature(flat, spec)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(flat, spec)
            self._graphs[key] = entry
            if self.max_graphs is not None:
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        with torch.no_grad():
            return self._replay(entry, flat)


def _describe(flat: list) -> str:
    parts = []
    for x in flat:
        if isinstance(x, torch.Tensor):
            parts.append(f"Tensor{tuple(x.shape)} {str(x.dtype).replace('torch.', '')} {x.device}")
        else:
            parts.append(repr(x)[:40])
    return "(" + ", ".join(parts) + ")"
