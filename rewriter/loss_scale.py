"""Loss scaling for fp16 training, on top of `torch.amp.GradScaler`.

fp16 gradients below 2^-24 flush to zero and above 65504 overflow. Multiplying the loss by a scale S
before backward shifts every gradient by S into fp16's range; the fp32 master gradients are divided by
S again before the optimizer step. GradScaler does the dynamic part (start 2^16, skip the step and
multiply S by 0.5 when a gradient is inf/NaN, multiply by 2 after `growth_interval` clean steps). This
module adds only what GradScaler lacks for a converted model:

  * `make_scaler(converted)` decides whether scaling is needed at all: only when some node computes in
    fp16. bf16 has fp32's exponent range, so its scaler is disabled and says why (`.reason`, one log line).
  * `step()` does unscale -> optional gradient clipping on the *unscaled* gradients -> step or skip ->
    update, in the order the PyTorch AMP recipe requires, and reports what happened. It never waits
    for the GPU: the scale and the skip flag stay on the device until read (`StepInfo` fields,
    `.scale`, `.history`, `.skipped`), and are fetched in one transfer at least every 64 steps. With
    a fused optimizer (AdamW(fused=True)) unscaling happens inside the optimizer kernel.
  * `history` records the scale over time (each change, with the step it happened at) and the skipped
    steps, for logs and plots.

Example:
    >>> scaler = make_scaler(converted)                # fp16: dynamic scaling; bf16: a no-op
    >>> for x, y in loader:
    ...     opt.zero_grad(set_to_none=True)
    ...     scaler.backward(loss_fn(converted(x), y))  # (loss * scale).backward()
    ...     info = scaler.step(opt, max_grad_norm=1.0) # unscale, clip, step unless inf/NaN, update
    >>> scaler.history                                  # [(0, 65536.0), (113, 32768.0), ...]
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
import torch.nn as nn

from rewriter import meta
from rewriter.backends.torch_backend import graph_module_of  # unwraps compile/DDP/torch.compile wrappers
from rewriter.config import Precision
from rewriter.errors import ConfigError, InputError, RewriterError

__all__ = ["LossScaler", "StepInfo", "make_scaler", "needs_loss_scaling"]

log = logging.getLogger("rewriter.loss_scale")

_RESOLVE_EVERY = 64  # pending device-side step records are brought to the host at least this often
_KEEP = 1024  # resolved per-step records kept for StepInfo


class StepInfo:
    """What one `LossScaler.step` did. Reading a field waits for the GPU (the values live on the device
    until then, so a training loop that does not read them never synchronises).

    Attributes:
        step: index of this step (0-based, counting skipped steps).
        scale: loss scale used for this step's backward (1.0 when scaling is off).
        skipped: True when a gradient was inf/NaN and the optimizer step was not taken.
        grad_norm: total norm of the unscaled gradients before clipping (None without clipping).
    """

    __slots__ = ("step", "_owner")

    def __init__(self, step: int, owner: "LossScaler"):
        self.step = step
        self._owner = owner

    def _record(self) -> dict:
        return self._owner._record(self.step)

    @property
    def scale(self) -> float:
        return self._record()["scale"]

    @property
    def skipped(self) -> bool:
        return self._record()["skipped"]

    @property
    def grad_norm(self) -> float | None:
        return self._record()["grad_norm"]

    def __repr__(self) -> str:
        return f"StepInfo(step={self.step}, scale={self.scale:g}, skipped={self.skipped}, grad_norm={self.grad_norm})"


class LossScaler:
    """Dynamic loss scaling (enabled) or a pass-through with the same API (disabled).

    Args:
        enabled: scale the loss; False gives a pass-through that still clips and steps.
        device: device of the gradients ("cuda", "cpu", ...).
        init_scale: first scale (2^16).
        growth_factor: multiply the scale by this after `growth_interval` clean steps (2.0).
        backoff_factor: multiply the scale by this on an inf/NaN gradient, and skip the step (0.5).
        growth_interval: clean steps before the scale grows (2000).
        reason: why scaling is on or off, shown by `repr` and logged for a disabled scaler.

    The underlying GradScaler is `.grad_scaler` for anything not wrapped here.
    """

    def __init__(self, enabled: bool = True, *, device: str | torch.device = "cuda",
                 init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, reason: str = ""):
        if not init_scale > 0:
            raise ConfigError(f"init_scale={init_scale!r} must be positive, e.g. 2**16")
        if not growth_factor > 1:
            raise ConfigError(f"growth_factor={growth_factor!r} must be above 1, e.g. 2.0")
        if not 0 < backoff_factor < 1:
            raise ConfigError(f"backoff_factor={backoff_factor!r} must lie in (0, 1), e.g. 0.5")
        if not (isinstance(growth_interval, int) and growth_interval >= 1):
            raise ConfigError(f"growth_interval={growth_interval!r} must be a positive integer, e.g. 2000")
        device = torch.device(device)
        self.enabled = bool(enabled)
        self.reason = reason or ("fp16 gradients need loss scaling" if enabled else "loss scaling off")
        self.grad_scaler = torch.amp.GradScaler(device.type, init_scale=init_scale,
                                                growth_factor=growth_factor, backoff_factor=backoff_factor,
                                                growth_interval=growth_interval, enabled=self.enabled)
        self.steps = 0
        self._scale = float(init_scale) if self.enabled else 1.0  # host copy as of the last resolve
        self._history: list[tuple[int, float]] = [(0, float(init_scale) if self.enabled else 1.0)]
        self._skipped: list[int] = []
        # steps whose results still live on the device: (step, scale after the step's update, norm);
        # the scale a step used is the one after the step before (or init_scale)
        self._pending: list[tuple[int, Any, Any]] = []
        self._records: dict[int, dict] = {}  # resolved steps, the last `_KEEP` of them
        if not self.enabled:
            log.info("loss scaling disabled: %s", self.reason)

    def __repr__(self) -> str:
        state = f"scale={self.scale:g}, skipped={len(self.skipped)}" if self.enabled else "disabled"
        return f"LossScaler({state}; {self.reason})"

    @property
    def scale(self) -> float:
        """The current loss scale (1.0 when disabled)."""
        self._resolve()
        return self._scale

    @property
    def history(self) -> list[tuple[int, float]]:
        """[(step, scale)] at the start and at every change of the scale."""
        self._resolve()
        return self._history

    @property
    def skipped(self) -> list[int]:
        """Indices of the steps skipped on inf/NaN gradients."""
        self._resolve()
        return self._skipped

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss * scale` (the loss itself when disabled)."""
        return self.grad_scaler.scale(loss)

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """`(loss * scale).backward(**kwargs)`."""
        self.scale_loss(loss).backward(**kwargs)

    def step(self, *optimizers: torch.optim.Optimizer, max_grad_norm: float | None = None,
             parameters: Iterable[torch.Tensor] | None = None) -> StepInfo:
        """Unscale, optionally clip, then step every optimizer unless a gradient is inf/NaN; update.

        Args:
            optimizers: the optimizers whose parameters got gradients from `backward`.
            max_grad_norm: clip the total norm of the unscaled gradients to this value.
            parameters: what to clip (default: every parameter of the optimizers).

        Returns:
            StepInfo with the scale used, whether the step was skipped and the gradient norm.
        """
        if not optimizers:
            raise InputError("LossScaler.step needs the optimizer(s): scaler.step(optimizer)")
        norm = None
        if max_grad_norm is not None:
            for opt in optimizers:
                self.grad_scaler.unscale_(opt)  # clipping needs unscaled gradients; a no-op when disabled
            params = list(parameters) if parameters is not None else [
                p for opt in optimizers for group in opt.param_groups for p in group["params"]]
            norm = nn.utils.clip_grad_norm_(params, max_grad_norm)
        for opt in optimizers:
            # Unscales, and skips the step when a gradient is inf/NaN. Fused optimizers (AdamW(fused=True))
            # do both inside their kernel from device tensors, so no step waits for the GPU here.
            self.grad_scaler.step(opt)
        self.grad_scaler.update()
        after = self.grad_scaler._get_scale_async().clone() if self.enabled else None
        self._pending.append((self.steps, after, norm))
        info = StepInfo(self.steps, self)
        self.steps += 1
        if len(self._pending) >= _RESOLVE_EVERY:
            self._resolve()
        return info

    def _resolve(self) -> None:
        """Bring the pending steps' scales and norms to the host (one synchronisation for all)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        tensors = [t for entry in pending for t in entry[1:] if isinstance(t, torch.Tensor)]
        values = iter(torch.stack([t.reshape(()).float() for t in tensors]).tolist() if tensors else [])
        for step, after, norm in pending:
            used_f = self._scale
            after_f = next(values) if isinstance(after, torch.Tensor) else 1.0
            norm_f = next(values) if isinstance(norm, torch.Tensor) else None
            # backoff_factor < 1 is enforced, so the scale drops exactly when inf/NaN was found
            skipped = self.enabled and after_f < used_f
            if skipped:
                self._skipped.append(step)
            if after_f != self._history[-1][1]:
                self._history.append((step + 1, after_f))
            self._scale = after_f
            self._records[step] = {"scale": used_f, "skipped": skipped, "grad_norm": norm_f}
        for old in [k for k in self._records if k < self.steps - _KEEP]:
            del self._records[old]

    def _record(self, step: int) -> dict:
        self._resolve()
        if step not in self._records:
            raise InputError(f"step {step}'s record is gone: a LossScaler keeps the last {_KEEP} steps; "
                             "read StepInfo fields soon after the step, or use .history and .skipped")
        return self._records[step]

    def state_dict(self) -> dict:
        """Everything needed to resume: GradScaler's state plus the history."""
        self._resolve()
        return {"grad_scaler": self.grad_scaler.state_dict(), "steps": self.steps,
                "history": list(self.history), "skipped": list(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.grad_scaler.load_state_dict(state["grad_scaler"])
        self._scale = float(self.grad_scaler.get_scale()) if self.enabled else 1.0
        self.steps = state["steps"]
        self._pending, self._records = [], {}
        self._history = [tuple(h) for h in state["history"]]
        self._skipped = list(state["skipped"])


def needs_loss_scaling(model_or_precision: Any) -> tuple[bool, str]:
    """(whether fp16 gradients flow through the model, why), for a converted model or a precision."""
    if isinstance(model_or_precision, (str, Precision)):
        precision = Precision.parse(model_or_precision)
        if precision is Precision.FP16:
            return True, "fp16 gradients underflow below 2^-24 and overflow above 65504"
        return False, (f"{precision.value} computes in {meta.dtype_name(precision.island_dtype)}, whose "
                       "exponent range is fp32's: gradients neither underflow nor overflow, no scaling"
                       + ("; " + _FP8_GRADS if precision is Precision.FP8 else ""))
    try:
        gm = graph_module_of(model_or_precision)
    except RewriterError:
        gm = None
    if gm is None:
        return False, "not a converted model: fp32 gradients need no scaling"
    # a training conversion's `graph` is its training graph, the one gradients flow through
    fp16 = [n for n in gm.graph.nodes if (meta.get(n, meta.DECISION) or {}).get("dtype") == "float16"]
    if fp16:
        return True, f"{len(fp16)} nodes compute in fp16: gradients need loss scaling"
    records = [meta.get(n, meta.FP8) or {} for n in gm.graph.nodes]
    fp8 = sum(1 for r in records if r.get("use") and r.get("training"))
    return False, ("no node computes in fp16 (bf16 has fp32's exponent range): gradients neither "
                   "underflow nor overflow, no scaling" + (f"; {fp8} {_FP8_GRADS}" if fp8 else ""))


_FP8_GRADS = ("FP8 training GEMMs scale their float8_e5m2 gradients per tensor on every call (amax / 57344), "
              "so they need no loss scale either")


def make_scaler(model_or_precision: Any, *, device: str | torch.device | None = None,
                **kwargs: Any) -> LossScaler:
    """A LossScaler that scales when the model computes in fp16 and is a pass-through otherwise.

    Args:
        model_or_precision: a model from `rewriter.convert` (its graph decides) or "fp16"/"bf16"/...
        device: where the gradients live; default: the model's parameters, else cuda when available.
        **kwargs: init_scale, growth_factor, backoff_factor, growth_interval (see LossScaler).

    Returns:
        A LossScaler; `.enabled` and `.reason` say what it does and why.

    Example:
        >>> make_scaler("bf16")
        LossScaler(disabled; bf16 computes in bfloat16, whose exponent range is fp32's: ...)
    """
    enabled, reason = needs_loss_scaling(model_or_precision)
    if device is None:
        params = model_or_precision.parameters() if isinstance(model_or_precision, nn.Module) else iter(())
        first = next(iter(params), None)
        device = first.device if first is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return LossScaler(enabled, device=device, reason=reason, **kwargs)
