"""Flags that choose library options: the torch backend (--backend, --compile-mode) and the options
other parts of the library take (--dynamic, --static, --target), passed through as keywords."""
from __future__ import annotations

import inspect
from typing import Callable

__all__ = ["backend_choice", "check_backend_here", "backend_label", "pass_through", "recorded_backend"]


def backend_choice(args) -> tuple["str | None", dict]:
    """(--backend, its options) from --backend and --compile-mode; --compile-mode implies compile."""
    from rewriter.errors import InputError

    backend, mode = args.backend, args.compile_mode
    if mode is not None:
        if backend is None:
            backend = "compile"
        elif backend != "compile":
            raise InputError(f"--compile-mode {mode} is an option of --backend compile, not of --backend "
                             f"{backend}: drop --compile-mode, or use --backend compile")
    return backend, ({"compile_mode": mode} if mode is not None else {})


def check_backend_here(backend: str, device=None) -> None:
    """Refuse a backend this machine (or --device) cannot run, saying why (BackendError/InputError)."""
    from rewriter.backends.torch_backend import check_available, no_gpu_reason
    from rewriter.errors import BackendError, InputError

    try:
        check_available(backend)
    except BackendError as exc:  # cuda_graphs without a CUDA GPU: the same reason, in CLI words
        why = no_gpu_reason()
        later = (" To prepare a model for a GPU machine, convert it without --backend and choose the "
                 "backend where it runs (rewrite bench MODEL --backend cuda_graphs)") if device is None else ""
        raise BackendError(f"--backend {backend} replays CUDA graphs and needs a CUDA GPU, but "
                           f"torch.cuda.is_available() is False here ({why}). On the CPU use --backend "
                           f"eager or --backend compile.{later}") from exc
    if backend == "cuda_graphs" and device is not None and device.type != "cuda":
        raise InputError(f"--backend cuda_graphs replays CUDA graphs, so it runs on a GPU only; "
                         f"--device {device} is not one: use --device cuda, or --backend compile on the CPU")


def backend_label(backend: str, options: dict) -> str:
    return backend + "".join(f" {v}" if k == "compile_mode" else f" {k}={v}" for k, v in options.items())


def recorded_backend(converted, device, notes: list) -> tuple["str | None", dict]:
    """The backend a converted model's record names (`rewrite convert --backend`), if it can run here."""
    from rewriter import meta
    from rewriter.backends.torch_backend import check_options
    from rewriter.errors import RewriterError

    config = ((getattr(converted, "meta", None) or {}).get(meta.INFO) or {}).get("config") or {}
    backend, options = config.get("backend"), dict(config.get("backend_options") or {})
    if not backend or backend == "eager":
        return None, {}
    try:
        backend = check_options(backend, options)
        check_backend_here(backend, device)
    except RewriterError as exc:
        notes.append(f"the model records backend {backend!r}, which cannot run here ({exc}); timed "
                     "without it (choose one with --backend)")
        return None, {}
    notes.append(f"backend {backend_label(backend, options)}: recorded by `rewrite convert --backend` "
                 "(pass --backend eager to time the converted GraphModule only)")
    return backend, options


def pass_through(function: Callable, what: str, options: dict[str, tuple[str, object]]) -> dict:
    """The keyword options to give `function` for the flags the user set: {keyword: (flag, value)}
    with value None for a flag not given. A flag given to a library that does not take its keyword
    yet is refused (InputError naming the flag) instead of being dropped."""
    from rewriter.errors import InputError

    given = {k: v for k, (flag, v) in options.items() if v is not None and v is not False}
    if not given:
        return {}
    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin or a wrapper without a signature: pass and let it say
        return given
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for keyword in given:
        if keyword not in params and not takes_any:
            raise InputError(f"{options[keyword][0]} needs {what}(..., {keyword}=...), which this "
                             f"installation of rewriter does not take yet; drop {options[keyword][0]} or "
                             "update rewriter")
    return given
