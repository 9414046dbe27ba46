"""Training-mode conversion: fp32 master weights, low-precision compute, and train()/eval() that work.

torch.export bakes the training flag into the graph it captures: dropout is on or gone, batch norm uses
batch statistics and updates its running statistics, or reads them. A single captured graph therefore
cannot honour `.train()` / `.eval()`. `convert(..., mode="train")` captures the model twice and returns
one module that owns one set of parameters and buffers and runs one of two graphs:

    model.train() --capture--> train graph --passes--+
    model.eval()  --capture--> eval graph  --passes--+--> TrainEvalGraphModule
                                                         forward: self.training ? train graph : eval graph
                                                         parameters: fp32, trainable, shared by both graphs

rewriter/pipeline.py runs the passes on both graphs; this module captures them and joins the results.
Both graphs run the same passes with the same configuration (overrides included). Measured decisions
(calibration) are made on the evaluation graph only, whose forward is deterministic and leaves the
batch-norm statistics alone, and are copied to the training graph (passes/analysis/transfer.py).
CastWeights does nothing in training mode, so the casts stay inside the graphs: autograd flows through
them (the gradient of a cast is cast back, so parameters get fp32 gradients) and any torch.optim
optimizer works on `converted.parameters()` unchanged.

The result is an ordinary nn.Module (an fx.GraphModule whose `graph` is the training graph) with the
original's parameter and buffer names, so `load_state_dict(model.state_dict())`, DDP and FSDP2 work on it.
Its training flag starts as the original model's.

Example:
    >>> converted = rewriter.convert(model, (x,), precision="fp16", mode="train")
    >>> scaler = rewriter.loss_scale.make_scaler(converted)      # fp16: dynamic loss scaling
    >>> opt = torch.optim.AdamW(converted.parameters(), lr=1e-3)  # fp32 master weights
    >>> for x, y in loader:
    ...     opt.zero_grad(set_to_none=True)
    ...     scaler.backward(loss_fn(converted(x), y))
    ...     scaler.step(opt, max_grad_norm=1.0)
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.graph_module import _forward_from_src

from rewriter.capture import Captured, capture
from rewriter.config import ConvertConfig
from rewriter.errors import CaptureError, RewriterError

__all__ = ["TrainEvalGraphModule", "capture_train_eval"]

_STATE = ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules")
_EVAL_PREFIX = "_eval_"


class TrainEvalGraphModule(fx.GraphModule):
    """A converted training model: one set of parameters, a training graph and an evaluation graph.

    `forward` runs `graph` (captured in training mode) while `self.training` is True and `eval_graph`
    (captured in evaluation mode) otherwise; both read the same parameter and buffer objects, so batch-norm
    statistics gathered in training are the ones evaluation uses, and an optimizer built on
    `parameters()` trains what both graphs compute with.

    Args:
        train_gm: the converted training-mode GraphModule; its parameters, buffers and submodules are
            adopted as they are (same objects, same names, same persistence).
        eval_gm: the converted evaluation-mode GraphModule of the same model; its graph is re-pointed at
            the adopted parameters and buffers.

    Example:
        >>> converted = rewriter.convert(model, (x,), precision="fp16", mode="train")
        >>> converted.train(); loss = loss_fn(converted(x), y); loss.backward()
        >>> converted.eval(); accuracy = evaluate(converted)   # dropout off, running statistics
    """

    def __init__(self, train_gm: fx.GraphModule, eval_gm: fx.GraphModule,
                 class_name: str = "TrainEvalGraphModule"):
        eval_graph = _repoint(eval_gm, train_gm)
        _init(self, train_gm, train_gm.graph, eval_graph, class_name)
        # the eval graph's record (calibration summary) too; the training graph's wins on a clash
        self.meta = {**getattr(eval_gm, "meta", {}), **getattr(train_gm, "meta", {})}

    @property
    def eval_graph(self) -> fx.Graph:
        """The graph run in evaluation mode (`graph` is the one run in training mode)."""
        return self.__dict__["_eval_graph"]

    @property
    def eval_code(self) -> str:
        """Python code generated from `eval_graph`."""
        return self.__dict__.get("_eval_code", "")

    def graphs(self) -> dict[str, fx.Graph]:
        """{"train": graph, "eval": eval_graph}, for tools that inspect or report both."""
        return {"train": self.graph, "eval": self.eval_graph}

    def recompile(self):
        """Regenerate the code of both graphs and the forward that picks one by `self.training`."""
        python_code = super().recompile()
        eval_graph = self.__dict__.get("_eval_graph")
        if eval_graph is None:  # during GraphModule.__init__, before the eval graph is attached
            return python_code
        eval_graph.owning_module = self
        code = eval_graph.python_code(root_module="self")
        # The generated code reads the pytree specs from self; the eval graph may return another
        # structure (outputs that exist only in training), so it gets its own attributes.
        src = code.src.replace("self._in_spec", "self._eval_in_spec").replace(
            "self._out_spec", "self._eval_out_spec")
        info = getattr(eval_graph._codegen, "pytree_info", None)
        if info is not None:
            self._eval_in_spec, self._eval_out_spec = info.in_spec, info.out_spec
        self.__dict__["_eval_code"] = src
        eval_fn = _forward_from_src(src, code.globals, getattr(eval_graph, "_co_fields", {}))
        cls = type(self)
        train_fn = cls.forward

        @functools.wraps(train_fn)
        def forward(self, *args, **kwargs):
            return (train_fn if self.training else eval_fn)(self, *args, **kwargs)

        cls.forward = forward
        return python_code

    def _deepcopy_init(self) -> Callable[..., None]:
        # GraphModule.__deepcopy__ rebuilds the copy from a deep copy of __dict__ through this function.
        def init(res, fake_mod, graph):
            _init(res, fake_mod, graph, fake_mod.__dict__["_eval_graph"], type(self).__name__)
        return init

    def __reduce__(self):
        raise RewriterError(
            "a converted training model cannot be pickled as a whole (it holds two graphs); save "
            "converted.state_dict() and rebuild with rewriter.convert(model, inputs, mode='train') "
            "followed by load_state_dict")


def _init(self: TrainEvalGraphModule, root: nn.Module, graph: fx.Graph, eval_graph: fx.Graph,
          class_name: str) -> None:
    """GraphModule.__init__, then adopt root's module tree as it is and attach the eval graph."""
    fx.GraphModule.__init__(self, root, graph, class_name)
    # GraphModule.__init__ copies only what the training graph references and turns plain tensor
    # constants into buffers; take the original dictionaries instead so names, unused parameters and
    # non-persistent buffers are exactly the captured model's.
    for key in _STATE:
        self.__dict__[key] = root.__dict__[key]
    for key, value in root.__dict__.items():
        if isinstance(value, torch.Tensor) and key not in self.__dict__:
            self.__dict__[key] = value  # lifted tensor constants are plain attributes
    self.__dict__["_eval_graph"] = eval_graph
    self.recompile()


def _resolve(module: nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _state_tensor(module: nn.Module, target: str) -> torch.Tensor | None:
    """The parameter or buffer registered at `target`, None for plain attributes and missing ones."""
    path, _, name = target.rpartition(".")
    owner = _resolve(module, path) if path else module
    if not isinstance(owner, nn.Module):
        return None
    return owner._parameters.get(name) if name in owner._parameters else owner._buffers.get(name)


def _repoint(eval_gm: fx.GraphModule, main: fx.GraphModule) -> fx.Graph:
    """Make the eval graph read `main`'s parameters and buffers; copy what only the eval graph needs.

    Parameters and buffers are matched by name (both graphs come from the same model). Submodules that
    hold state (batch norm in a symbolic_trace graph) are shared the same way. Everything else the eval
    graph references (lifted constants, the export guard function) is copied into `main` under a name
    starting with "_eval_", as a non-persistent buffer or a stateless submodule, so the state_dict keeps
    the original's keys.
    """
    graph = eval_gm.graph
    holder = None
    for node in graph.nodes:
        if node.op == "get_attr":
            mine, theirs = _state_tensor(main, node.target), _resolve(eval_gm, node.target)
            if isinstance(theirs, torch.Tensor) and isinstance(mine, torch.Tensor) \
                    and mine.shape == theirs.shape and mine.dtype == theirs.dtype:
                continue
            if _state_tensor(eval_gm, node.target) is not None and mine is None:
                raise CaptureError(
                    f"the evaluation graph reads {node.target!r}, which the training graph does not "
                    "have; convert with mode='eval' for inference, or make the model register the "
                    "same parameters and buffers in both modes")
            if holder is None:
                holder = nn.Module()
                name = _EVAL_PREFIX + "constants"
                while hasattr(main, name):
                    name += "_"
                main.add_module(name, holder)
                holder_name = name
            field = f"c{len(holder._buffers)}"
            value = theirs.detach() if isinstance(theirs, torch.Tensor) else theirs
            if isinstance(value, torch.Tensor):
                holder.register_buffer(field, value, persistent=False)
            else:
                setattr(holder, field, value)
            node.target = f"{holder_name}.{field}"
        elif node.op == "call_module":
            theirs = eval_gm.get_submodule(node.target)
            mine = _resolve(main, node.target)
            stateful = any(True for _ in theirs.parameters()) or any(True for _ in theirs.buffers())
            if stateful:
                if type(mine) is not type(theirs):
                    raise CaptureError(f"the evaluation graph calls module {node.target!r}, which the "
                                       "training graph does not have")
                continue
            name = _EVAL_PREFIX + node.target.replace(".", "_").lstrip("_")
            while hasattr(main, name):
                name += "_"
            main.add_module(name, theirs)
            node.target = name
    return graph


def capture_train_eval(model: nn.Module, args: tuple, kwargs: dict, config: ConvertConfig, *,
                       say: Callable[[str, str], None]) -> dict[str, Captured]:
    """Capture `model` in evaluation and in training mode ({"eval": ..., "train": ...}).

    The passes run on both graphs in rewriter/pipeline.py; `TrainEvalGraphModule(train_gm, eval_gm)` then
    joins the converted graphs on one set of parameters.

    Args:
        model: the fp32 model; not modified (its flags and batch-norm statistics are restored).
        args, kwargs: normalised example inputs.
        config: the conversion configuration (mode "train").
        say: progress callback `say(step, text)`.
    """
    captured: dict[str, Captured] = {}
    for mode in ("eval", "train"):
        say("capture", f"{mode} graph of {type(model).__name__}")
        try:
            captured[mode] = capture(model, args, kwargs, dynamic_batch=config.dynamic_batch,
                                     dynamic_shapes=config.dynamic_shapes, static=config.static,
                                     time_limit=config.capture_time_limit,
                                     train=mode == "train")
        except RewriterError as exc:
            raise type(exc)(f"{exc} (while capturing the {mode}-mode graph for mode='train')") from exc
        c = captured[mode]
        say("capture", f"{mode}: {c.method}, {len(c.graph_module.graph.nodes)} nodes"
            + "".join(f"; {n}" for n in c.notes))
    return captured
