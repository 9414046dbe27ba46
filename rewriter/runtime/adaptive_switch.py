"""The per-layer switch of adaptive precision: `LayerSwitch`, read by the adaptive GEMM ops at run time.

One `LayerSwitch` per adaptive layer is a submodule of the converted model (`_adaptive_switch_<i>`, read by a
`get_attr` node and passed to the layer's op). It holds

  precision, sample, observe   plain Python ints (module attributes). The op (adaptive_ops.py,
                               adaptive_fp16_ops.py) branches on them in Python, so under torch.compile
                               dynamo specialises on their values (ints on an nn.Module are guarded as
                               constants, `allow_unspec_int_on_nn_module` is off) and the compiled graph
                               holds only the chosen path: an FP8 layer compiles like static FP8 plus its
                               statistics, an unobserved step compiles to exactly the static graph. Every
                               distinct combination of the model's switches is one graph variant, compiled
                               the first time it runs and cached by dynamo (the controller bounds them).
  stats                        fp32 [N_STATS] statistics (a plain attribute: not in state_dict, not seen
                               by DDP or optimizers). The forward statistics are written into it in place
                               by the op (dynamo / AOTAutograd functionalize the mutation of this graph
                               input into one copy at the end of the graph).
  probe                        fp32 [N_STATS] zeros with requires_grad=True (not a Parameter). Writing a
                               tensor from inside an autograd.Function's backward does not compile, so
                               the op threads `probe` through an identity Function whose backward returns
                               the gradient statistics (grad_out amax, underflow, SQNR, ...) as probe's
                               gradient, -inf in the slots it does not measure. A post-accumulate-grad
                               hook max-merges probe.grad into `stats` and clears it after every
                               backward, so several micro-batches accumulate by max (as the forward
                               slots do), not by the autograd engine's sum.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["LayerSwitch", "merge_max", "stat_vector"]


def merge_max(stats: torch.Tensor, values: torch.Tensor) -> None:
    """stats <- max(stats, values), in place (one functional op + copy_, compile-friendly)."""
    stats.copy_(torch.maximum(stats, values.to(stats.dtype)))


def stat_vector(slots: tuple[str, ...], values: dict, like: torch.Tensor) -> torch.Tensor:
    """[len(slots)] fp32 vector: `values[slot]` (0-dim tensors) where given, -inf (neutral for max) elsewhere."""
    neutral = like.new_full((), float("-inf"), dtype=torch.float32)
    return torch.stack([values[k].float() if k in values else neutral for k in slots])


class LayerSwitch(nn.Module):
    """Precision / sample / observe flags and statistics of one adaptive layer (see the module docstring).

    Args:
        n_stats: number of statistics slots of the kind's op.
        device: where `stats` and `probe` live (the layer's device).
        precision: initial precision code (0 = the low precision).

    Example:
        >>> sw = LayerSwitch(15)
        >>> sw.precision, sw.sample, sw.observe
        (0, 0, 1)
    """

    def __init__(self, n_stats: int, device=None, precision: int = 0):
        super().__init__()
        self.precision, self.sample, self.observe = int(precision), 0, 1
        self.stats = torch.zeros(n_stats, dtype=torch.float32, device=device)
        self.probe = torch.zeros(n_stats, dtype=torch.float32, device=device, requires_grad=True)
        self._hook_probe()

    def _hook_probe(self) -> None:
        if not getattr(self.probe, "_post_accumulate_grad_hooks", None):
            self.probe.register_post_accumulate_grad_hook(self._merge_probe)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._hook_probe()  # a deep copy or an unpickled module: tensor hooks are not copied

    def _merge_probe(self, probe: torch.Tensor) -> None:
        with torch.no_grad():
            merge_max(self.stats, probe.grad)
        probe.grad = None

    def flags(self) -> tuple[int, int, int]:
        """(precision, sample, observe)."""
        return self.precision, self.sample, self.observe

    def extra_repr(self) -> str:
        return f"precision={self.precision}, sample={self.sample}, observe={self.observe}"
