"""Errors raised by the rewriter.

Every error a user can cause is a `RewriterError` subclass whose message says what is wrong, where
(file, node, module path) and what to do about it. The CLI maps `RewriterError` to exit code 2 and
anything else to exit code 1.
"""
from __future__ import annotations

from rewriter import meta

__all__ = [
    "RewriterError",
    "ConfigError",
    "CaptureError",
    "InputError",
    "PassError",
    "BackendError",
    "describe_node",
    "first_line",
]


class RewriterError(Exception):
    """Base class of the errors a user can act on."""


class ConfigError(RewriterError, ValueError):
    """A configuration value is invalid; the message says what to write instead."""


class InputError(RewriterError, ValueError):
    """The model, its example inputs or a file given to the rewriter cannot be used."""


class CaptureError(RewriterError):
    """Neither torch.export nor torch.fx.symbolic_trace could capture the model."""


class PassError(RewriterError):
    """A pass failed; the message names the pass, the passes that ran before it and the node."""


class BackendError(RewriterError):
    """A backend cannot run the converted model as asked (torch.compile failed, CUDA graphs cannot
    capture it, no GPU); the message names the reason and the backend to use instead."""


def describe_node(node) -> str:
    """One line naming an fx node and the module it came from, for error messages."""
    path = meta.module_path(node) or "<top level>"
    try:
        text = node.format_node()
    except Exception:  # format_node can fail on half-built graphs; the name is enough then
        text = node.name
    return f"node {text!s} (module '{path}')"


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its class name when it has none), cut at
    `limit` characters with "..." after the cut: the cause quoted inside a one-paragraph error."""
    lines = [t for t in str(exc).strip().splitlines() if t.strip()]
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= limit else line[:limit] + "..."
