"""A time limit for the automatic dynamic-shape capture.

torch.export with every dimension dynamic reasons about sizes symbolically (sympy). On most models that
costs seconds; on a few it costs many minutes: torchvision's swin_t pads every stage's feature map to a
multiple of its window, `(7 - W % 7) % 7`, and reshapes it into windows, so with dynamic height and
width each view of stage k floor-divides products of nested Mod/FloorDiv expressions of stages 1..k
(~500 s on a 2-core CPU, >150 s on an H200 host; static: 5 s, batch only: 9 s). capture runs that plan
under `time_limit` and, when it runs out, falls back to the batch-only plan with a note.

How: SIGALRM (`signal.setitimer`) raises `CaptureTimeout` in the main thread. It derives from
BaseException, not Exception, on purpose: torch.export catches `Exception` in many places (retries,
error wrapping, fallbacks) and would swallow or rewrap an Exception raised from the handler, while a
BaseException unwinds through them, running their `finally` blocks (fake modes, patched modules,
shape environments are restored on the way out). Signals reach only the main thread of a POSIX
process: elsewhere (threads, Windows) `time_limit` does nothing and capture has no limit.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Iterator

__all__ = ["CaptureTimeout", "time_limit", "can_limit"]


class CaptureTimeout(BaseException):
    """The capture ran past its time limit (BaseException: see the module docstring)."""

    def __init__(self, seconds: float):
        super().__init__(f"capture exceeded {seconds:g} s")
        self.seconds = seconds


def can_limit() -> bool:
    """Whether a time limit can be enforced here: the main thread of a process that has SIGALRM."""
    return hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[bool]:
    """Raise CaptureTimeout in the block after `seconds` (None: no limit). Yields whether a limit is
    in force. An alarm the caller had set is put back (its remaining time, less the time spent here)."""
    if seconds is None or not can_limit():
        yield False
        return

    def on_alarm(signum, frame):
        raise CaptureTimeout(seconds)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, float(seconds))
    start = time.monotonic()
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:  # someone else's alarm was pending: re-arm what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))
