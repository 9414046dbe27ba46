"""The capture time limit (rewriter/capture_budget.py): an automatic dynamic-shape export that runs past
ConvertConfig.capture_time_limit falls back to batch-only dynamic shapes with a note that says why;
off the main thread there is no limit; the limit is validated and restores any alarm it replaced."""
from __future__ import annotations

import signal
import threading
import time

import pytest
import torch
import torch.nn as nn

import rewriter
from rewriter import meta
from rewriter.capture_budget import CaptureTimeout, time_limit
from rewriter.errors import ConfigError, InputError

BF16_TOL = 2e-2  # relative L2 of a bf16 conv + linear vs fp32


def _rel_l2(ref, got) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


class _SlowWhenDynamic(nn.Module):
    """Stands in for a model whose dynamic-size capture is slow (torchvision swin_t): when the image
    height is symbolic, forward spends `delay` seconds in Python first (as torch's sympy work does)."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        if isinstance(x.shape[2], torch.SymInt):
            end = time.monotonic() + self.delay
            while time.monotonic() < end:  # busy, like sympy: the alarm interrupts Python code
                pass
        return self.head(self.conv(x).relu().mean(dim=(2, 3)))


def _dims(gm):
    return [d if isinstance(d, int) else "dyn" for d in gm.meta[meta.INPUT_SHAPES][0]["dims"]]


def test_slow_dynamic_capture_falls_back_to_dynamic_batch():
    torch.manual_seed(0)
    model = _SlowWhenDynamic(delay=60.0).eval()
    x = torch.randn(2, 3, 16, 16)
    fast = rewriter.convert(model, (x,), precision="bf16", capture_time_limit=1.0)
    notes = fast.meta[meta.INFO]["notes"]
    why = [n for n in notes if "exceeded 1 s" in n]
    assert len(why) == 1, notes
    assert "image height/width and sequence length kept static (only the batch is dynamic)" in why[0]
    assert "pass dynamic_shapes= to insist" in why[0].lower()
    assert _dims(fast) == ["dyn", 3, 16, 16]

    other = torch.randn(3, 3, 16, 16)  # another batch runs
    with torch.no_grad():
        assert _rel_l2(model(other), fast(other)) < BF16_TOL
    with pytest.raises(InputError, match=r"input 'x' dimension 2 is 20, but it is static at 16") as static:
        fast(torch.randn(2, 3, 20, 16))
    assert "capture notes" in str(static.value) and "dynamic_shapes=" in str(static.value)

    # torch's state survived the interrupted export: the next dynamic capture works in full
    quick = _SlowWhenDynamic(delay=0.0).eval()
    again = rewriter.convert(quick, (x,), precision="bf16", capture_time_limit=30.0)
    assert _dims(again) == ["dyn", 3, "dyn", "dyn"]
    assert not any("exceeded" in n for n in again.meta[meta.INFO]["notes"])


def test_no_limit_off_the_main_thread():
    torch.manual_seed(0)
    model = _SlowWhenDynamic(delay=2.0).eval()
    x = torch.randn(2, 3, 16, 16)
    result = {}

    def work():
        try:
            result["gm"] = rewriter.convert(model, (x,), precision="bf16", capture_time_limit=0.5)
        except BaseException as exc:  # reported below, not lost in the thread
            result["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(300)
    assert "error" not in result, result.get("error")
    gm = result["gm"]
    assert _dims(gm) == ["dyn", 3, "dyn", "dyn"]  # slower than the limit, and still fully dynamic
    assert not any("exceeded" in n for n in gm.meta[meta.INFO]["notes"])


def test_time_limit_raises_a_base_exception_and_restores_the_previous_alarm():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda s, f: fired.append(s))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        with pytest.raises(CaptureTimeout) as caught:
            with time_limit(0.2):
                while True:
                    pass
        assert not isinstance(caught.value, Exception)  # torch's `except Exception` cannot swallow it
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 20.0 < remaining <= 30.0  # the caller's alarm is re-armed with its remaining time
        assert signal.getsignal(signal.SIGALRM) is not None and fired == []
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("bad", [0, -5, "120", True])
def test_capture_time_limit_is_validated(bad):
    with pytest.raises(ConfigError, match="capture_time_limit"):
        rewriter.ConvertConfig(precision="bf16", capture_time_limit=bad)


def test_capture_time_limit_none_means_no_limit():
    assert rewriter.ConvertConfig(precision="bf16", capture_time_limit=None).capture_time_limit is None
    assert rewriter.ConvertConfig(precision="bf16").capture_time_limit == 120.0
