"""The fp16 kind of adaptive precision: per-layer loss-scale trouble moves that layer to bf16 (then fp32)
instead of making the loss scaler skip steps for the whole model.

In fp16 training one dynamic loss scale serves every layer (rewriter/loss_scale.py): an inf/NaN in any
gradient skips the optimizer step and halves the scale. When one layer's numbers do not fit fp16, the whole
model pays: its steps are skipped, or the scale falls until the other layers' gradients sink below fp16's
smallest normal. `AdaptivePrecision` (rewriter/adaptive.py) on a model converted with precision="fp16",
mode="train" uses this kind: every fp16 linear with a stored weight (`linear`, GPT-2's `addmm`, `mm` /
`matmul` with a [K, N] weight) becomes `adaptive_linear_fp16` (rewriter/runtime/adaptive_fp16_ops.py), which
absorbs the fp16 casts of its operands so that a layer moved to bf16 reads them in bf16 (the fp32 master
weight, an fp32 activation) and computes its gradients in bf16.

Before: x(fp32) -> cast(fp16) -> linear(., cast(w_fp32 -> fp16), cast(b -> fp16)) -> y(fp16)
After:  x(fp32) -> adaptive_linear_fp16(x, w_fp32, b, True, fp16, switch) -> y(fp16)

Policy (the judge; thresholds are keyword arguments of AdaptivePrecision):
  fp16 -> bf16 when, on an observed step,
    * finite input or weight values exceed `near_max` (0.5) x fp16's max (65504): one more doubling and the
      cast overflows in the forward, whatever the loss scale (the gradients then hold inf/NaN and the
      scaler would skip every step); switching before the overflow costs no skipped step;
    * or the layer's own scaled gradients (grad_w, grad_x, grad_bias, its grad_out finite) overflow while
      another fp16 layer loses more than `underflow_up` (5%) of its weight-gradient values below fp16's
      smallest normal: a loss scale small enough for this layer is too small for the others;
    * or its own gradients overflowed on `grad_strikes` (16) observed steps in a row: the scaler backed
      off 2^16-fold and this layer still overflows.
    A single overflow is the scaler's normal probing (it halves the scale and retries): no switch.
  calm (the way back, after `patience` calm steps): input, weight and weight-gradient amax below
    65504 / `headroom` (4) and no overflow, so the layer would fit fp16 again with room to spare.
What a layer cannot fix is not blamed on it: inputs that arrive non-finite and grad_out that arrives
non-finite come from another layer (the op leaves its gradient slots alone then); an fp16 *output* beyond
65504 stays inf, since the graph after the layer computes in fp16.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from rewriter import meta
from rewriter.passes.graph_utils import is_cast
from rewriter.passes.plan.fp8_cost import gemm_operands, stored_weight
from rewriter.runtime import adaptive_fp16_ops as ops

__all__ = ["Fp16Kind"]

LOW = 0


class Fp16Kind:
    """fp16 training linears -> `adaptive_linear_fp16`, statistics against fp16's range (see the module)."""

    name = "fp16"
    precisions = ops.PRECISIONS
    slots = ops.SLOTS
    defaults = {"near_max": 0.5, "underflow_up": 0.05, "grad_strikes": 16.0, "headroom": 4.0}
    event_stats = ("x_amax", "w_amax", "g_amax", "gw_amax", "x_overflow", "w_overflow", "grad_overflow",
                   "gw_subnormal")

    def __init__(self):
        self.layers: list[str] = []  # the controller's layer names, for the reasons
        self._i = {name: i for i, name in enumerate(self.slots)}

    def new_switch(self, device):
        return ops.new_switch(device)

    def match(self, node: fx.Node) -> bool:
        """An fp16 GEMM whose weight is a stored parameter (through its cast)."""
        if node.op != "call_function" or (meta.get(node, meta.DECISION) or {}).get("dtype") != "float16":
            return False
        operands = gemm_operands(node)
        return operands is not None and stored_weight(operands[1]) is not None

    def rewrite(self, gm: fx.GraphModule, graph: fx.Graph, node: fx.Node, switch: fx.Node) -> str:
        x, w_value, bias, nk = gemm_operands(node)
        weight = stored_weight(w_value)
        sources = [_source(v) for v in (x, weight, bias)]
        node.target = ops.adaptive_linear_fp16
        node.args = (*sources[:3], bool(nk), torch.float16, switch)
        node.kwargs = {}
        for value in (x, w_value, bias):  # the absorbed casts, when nothing else reads them
            if isinstance(value, fx.Node) and is_cast(value) and not value.users:
                graph.erase_node(value)
        op = (meta.get(node, meta.OP_CLASS) or {}).get("op", "linear")
        return (f"fp16 {op} -> adaptive_linear_fp16: the layer casts x, its fp32 master weight and bias to the "
                "precision its switch says (fp16 until the controller switches it) and records whether its "
                "operands and scaled gradients fit fp16")

    def reset_rows(self, stats: torch.Tensor) -> torch.Tensor:
        """The [layers, N_STATS] statistics the next observed step starts from: all zero."""
        return torch.zeros_like(stats)

    def previous(self, row: list[float], prev: list[float]) -> list[float]:
        """[observed steps in a row on which the layer's own gradients overflowed, 0, 0]."""
        return [prev[0] + 1 if row[self._i["grad_overflow"]] > 0 else 0.0, 0.0, 0.0]

    def judge(self, t: dict, prev: list[float], row: list[float], rows: list[list[float]], layer: int,
              currents: list[int]) -> tuple[str, bool]:
        """(reason to leave fp16 or "", calm: fp16 would fit with `headroom` to spare) of one layer."""
        i, reasons = self._i, []
        for p, name in (("x", "input"), ("w", "weight")):
            amax = row[i[p + "_amax"]]
            if row[i[p + "_overflow"]] > 0:
                reasons.append(f"{row[i[p + '_overflow']]:.2%} of {name} values beyond fp16's max {ops.FP16_MAX:g} "
                               f"(amax {amax:.3g}): the forward overflows whatever the loss scale")
            elif amax > t["near_max"] * ops.FP16_MAX:
                reasons.append(f"{name} amax {amax:.3g} is above {t['near_max']:g} x fp16's max {ops.FP16_MAX:g}: "
                               "one more doubling overflows the forward, whatever the loss scale")
        over = row[i["grad_overflow"]]
        if over > 0:
            starved = [(self._name(j), r[i["gw_subnormal"]]) for j, r in enumerate(rows)
                       if j != layer and currents[j] == LOW and r[i["gw_subnormal"]] > t["underflow_up"]]
            strikes = prev[0] + 1
            if starved:
                name, frac = max(starved, key=lambda s: s[1])
                reasons.append(f"its scaled gradients overflow fp16 ({over:.2%} of values beyond "
                               f"{ops.FP16_MAX:g}; weight-gradient amax {row[i['gw_amax']]:.3g}) while {name} "
                               f"loses {frac:.1%} of its weight-gradient values below fp16's smallest normal "
                               f"(> {t['underflow_up']:.0%}): a loss scale small enough for this layer starves "
                               "the others")
            elif strikes >= t["grad_strikes"]:
                reasons.append(f"its scaled gradients overflowed fp16 on {strikes:g} observed steps in a row: the "
                               "loss scaler backed off and this layer still overflows")
        room = ops.FP16_MAX / t["headroom"]
        calm = (over == 0 and row[i["x_overflow"]] == 0 and row[i["w_overflow"]] == 0 and row[i["nonfinite"]] == 0
                and max(row[i["x_amax"]], row[i["w_amax"]], row[i["gw_amax"]]) < room)
        return "; ".join(reasons), calm

    def _name(self, j: int) -> str:
        return self.layers[j] if j < len(self.layers) else f"layer {j}"


def _source(value):
    """What a GEMM operand was cast from (the fp32 master weight, an fp32 activation), else the operand."""
    return value.args[0] if isinstance(value, fx.Node) and is_cast(value) else value
