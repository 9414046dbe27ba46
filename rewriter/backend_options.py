"""Backend options of a conversion: how the converted graph runs (rewriter/backends/torch_backend.py).

    >>> rewriter.convert(model, (x,), precision="bf16", backend="compile",
    ...                  backend_options=rewriter.BackendOptions(compile_mode="max-autotune-no-cudagraphs"))
    >>> rewriter.convert(model, (x,), precision="bf16", backend="cuda_graphs",
    ...                  backend_options={"clone_outputs": False, "max_graphs": 4})   # a dict works too

Every field defaults to None, which means "the backend's default"; a field that is set belongs to one
backend and is refused (ConfigError) for another. Part of the ground floor: imports no backend.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Mapping

from rewriter.errors import ConfigError

__all__ = ["BackendOptions", "BACKENDS", "backend_name", "closest"]

#: Backend modes, in the order the CLI lists them (`--backend eager|compile|cuda_graphs`).
BACKENDS = ("eager", "compile", "cuda_graphs")

_ALIASES = {"torch.compile": "compile", "inductor": "compile", "cudagraphs": "cuda_graphs",
            "cuda-graphs": "cuda_graphs", "cuda_graph": "cuda_graphs", "cudagraph": "cuda_graphs",
            "graphs": "cuda_graphs", "none": "eager", "": "eager"}

# Which backend each option belongs to, and what it means (shown when an option is refused).
_OPTIONS: dict[str, dict[str, str]] = {
    "eager": {},
    "compile": {
        "compile_mode": "torch.compile mode: default, reduce-overhead, max-autotune, "
                        "max-autotune-no-cudagraphs",
        "dynamic": "None (torch.compile's automatic dynamic shapes), \"batch\" (dimension 0 dynamic from the "
                   "first compile when the conversion kept it so), True or False",
        "fullgraph": "True (default): a graph break is an error",
        "compiler": "torch.compile backend, 'inductor' by default",
        "options": "dict of inductor options (not together with compile_mode)",
        "clone_outputs": "with compile_mode='reduce-overhead': clone outputs (default True)",
    },
    "cuda_graphs": {
        "clone_outputs": "True (default): fresh outputs each call; False: static buffers, "
                         "overwritten by the next call",
        "warmup": "eager runs on a side stream before capture (default 2)",
        "max_graphs": "None (unbounded) or the number of captured graphs to keep (LRU)",
        "share_pool": "True (default): the graphs of one module share a memory pool",
    },
}


def closest(name: str, valid) -> str:
    """", did you mean 'x'?" for the valid name closest to `name`, or "" when none is close."""
    found = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.5)
    return f"; did you mean {found[0]!r}?" if found else ""


def backend_name(mode: Any) -> str:
    """The canonical name of a backend ("eager", "compile", "cuda_graphs"); aliases such as
    "torch.compile", "inductor" or "cudagraphs" are accepted.

    Raises:
        ConfigError: an unknown backend, with the valid names.
    """
    text = str(getattr(mode, "value", mode)).strip().lower()
    text = _ALIASES.get(text, text)
    if text not in BACKENDS:
        raise ConfigError(f"unknown backend {mode!r}: write one of {', '.join(repr(m) for m in BACKENDS)} "
                          f"(e.g. backend='compile'){closest(text, BACKENDS)}")
    return text


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """Options of the backend that runs a converted graph; None leaves the backend's default.

    Args:
        compile_mode: (compile) torch.compile's mode: "default", "reduce-overhead", "max-autotune",
            "max-autotune-no-cudagraphs".
        dynamic: (compile) None: torch.compile's automatic dynamic shapes (the first call compiles
            for its shapes, a new batch size compiles once more with the batch dynamic); "batch":
            dimension 0 dynamic from the first compile when the conversion kept the batch dynamic
            (one compile for every batch size, at some speed: symbolic sizes in every kernel);
            True / False are passed to torch.compile.
        fullgraph: (compile) True (default): a graph break is an error, never a silent fallback.
        compiler: (compile) torch.compile's `backend`, "inductor" by default (e.g. "aot_eager").
        options: (compile) a dict of inductor options; not together with compile_mode.
        clone_outputs: (compile with compile_mode="reduce-overhead", cuda_graphs) True (default):
            outputs are fresh tensors; False: the graph's static buffers, overwritten by the next call.
        warmup: (cuda_graphs) eager runs on a side stream before capture (default 2).
        max_graphs: (cuda_graphs) None (unbounded) or how many captured graphs are kept (LRU).
        share_pool: (cuda_graphs) True (default): the graphs of one module share a memory pool.

    Example:
        >>> BackendOptions(compile_mode="max-autotune-no-cudagraphs").kwargs()
        {'compile_mode': 'max-autotune-no-cudagraphs'}
    """

    compile_mode: str | None = None
    dynamic: "bool | str | None" = None
    fullgraph: bool | None = None
    compiler: "str | Callable | None" = None
    options: "tuple[tuple[str, Any], ...] | None" = None
    clone_outputs: bool | None = None
    warmup: int | None = None
    max_graphs: int | None = None
    share_pool: bool | None = None

    def __post_init__(self):
        if self.options is not None:
            if not isinstance(self.options, (Mapping, tuple)):
                raise ConfigError("options must be a dict of inductor options, e.g. {'epilogue_fusion': True}")
            # stored as sorted (name, value) pairs: the options stay hashable and compare by value
            pairs = self.options.items() if isinstance(self.options, Mapping) else self.options
            object.__setattr__(self, "options", tuple(sorted((str(k), v) for k, v in pairs)))
        if self.compile_mode is not None and not isinstance(self.compile_mode, str):
            raise ConfigError(f"compile_mode={self.compile_mode!r} must be a string such as 'max-autotune'")
        if self.dynamic not in (None, True, False, "batch"):
            raise ConfigError(f"dynamic={self.dynamic!r} must be None, 'batch', True or False")
        for name in ("fullgraph", "clone_outputs", "share_pool"):
            value = getattr(self, name)
            if value not in (None, True, False):
                raise ConfigError(f"{name}={value!r} must be None, True or False")
        if self.warmup is not None and (not _whole(self.warmup) or self.warmup < 0):
            raise ConfigError(f"warmup={self.warmup!r} must be a whole number >= 0 (eager runs before capture)")
        if self.max_graphs is not None and (not _whole(self.max_graphs) or self.max_graphs < 1):
            raise ConfigError(f"max_graphs={self.max_graphs!r} must be None or a whole number >= 1")
        if self.compile_mode is not None and self.options:
            raise ConfigError("give either compile_mode or options to torch.compile, not both "
                              "(torch.compile refuses both)")

    @classmethod
    def of(cls, value: "BackendOptions | Mapping[str, Any] | None") -> "BackendOptions":
        """BackendOptions from a BackendOptions, a dict such as {"compile_mode": "default"}, (name, value)
        pairs, or None (all defaults).

        Raises:
            ConfigError: an unknown option name (with the closest valid one) or a value of the wrong type.
        """
        if isinstance(value, BackendOptions):
            return value
        if value is None:
            return cls()
        try:
            given = dict(value)
        except (TypeError, ValueError):
            raise ConfigError(f"backend_options={value!r} must be a dict such as "
                              "{'compile_mode': 'max-autotune-no-cudagraphs'} or a BackendOptions") from None
        names = [f.name for f in dataclasses.fields(cls)]
        for key in given:
            if key not in names:
                raise ConfigError(f"unknown backend option {key!r}{closest(key, names)} "
                                  f"(options: {', '.join(names)})")
        return cls(**{str(k): v for k, v in given.items()})

    def kwargs(self) -> dict[str, Any]:
        """The options that are set, as keyword arguments of `rewriter.optimize(gm, mode, **kwargs)`."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = dict(value) if f.name == "options" else value
        return out

    def check(self, mode: Any) -> str:
        """Validate these options for backend `mode`; returns the canonical backend name.

        Raises:
            ConfigError: an unknown backend, an option of another backend, or an unknown compile_mode.
        """
        name = backend_name(mode)
        known = _OPTIONS[name]
        for key in self.kwargs():
            if key in known:
                continue
            if not known:
                raise ConfigError(f"backend {name!r} takes no options, got {key!r}; options belong to "
                                  "backend='compile' or backend='cuda_graphs'")
            listing = "; ".join(f"{k}: {v}" for k, v in known.items())
            raise ConfigError(f"unknown option {key!r} for backend {name!r}; known options: {listing}")
        if name == "compile" and self.compile_mode is not None and self.compiler in (None, "inductor"):
            # imported here: torch._inductor is heavy, and only this check needs it
            from torch._inductor import list_mode_options

            valid = list(list_mode_options())
            if self.compile_mode not in valid:
                raise ConfigError(f"unknown compile_mode {self.compile_mode!r}: write one of "
                                  f"{', '.join(repr(v) for v in valid)}{closest(self.compile_mode, valid)}")
        return name

    def to_dict(self) -> dict[str, Any]:
        """The options that are set, JSON-ready (values that are not plain data are written as repr)."""
        plain = (str, int, float, bool, type(None))
        return {k: (v if isinstance(v, plain) else repr(v)) for k, v in self.kwargs().items()}
