"""SaturateConstants: constants beyond a 16-bit op's range become that dtype's finite limits.

Models write masks the Hugging Face way, `scores.masked_fill(mask, torch.finfo(scores.dtype).min)`.
Captured in fp32 the constant is fp32's minimum (-3.4e38); once `scores` is fp16, masked_fill raises
`value cannot be converted to type c10::Half without overflow` (DeBERTa-v2), and for bf16 the same
with fp32's extreme values. Under autocast the model's own code would have asked for
`finfo(float16).min`, so this pass writes what autocast effectively computes:
  * a value a 16-bit op writes into its output (masked_fill, fill, full, full_like, new_full,
    index_fill, where, clamp bounds) beyond the dtype's finite range becomes the dtype's finite limit
    of the same sign; a constant 0-dim tensor in that place (`masked_fill(mask, torch.tensor(m))`) too;
  * a scalar operand of 16-bit arithmetic (mul, add, sub, rsub, div) that is exactly a wider dtype's
    limit (`(1 - mask) * torch.finfo(torch.float32).min`) becomes the 16-bit limit, as autocast's
    `finfo(x.dtype)` would; other large numbers in arithmetic are left as written.
Masked positions keep a value no unmasked score reaches, so softmax is unchanged, and an all-masked
row stays uniform instead of turning NaN as an overflowed -inf would.

Before: masked_fill(scores:fp16, mask, -3.4028e38)    -> RuntimeError at run time
After:  masked_fill(scores:fp16, mask, -65504.0)      node.meta[REWRITTEN] says why
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from rewriter import meta
from rewriter.passes.infra import Pass, PassResult
from rewriter.passes.op_tables import op_name

__all__ = ["SaturateConstants"]

# op -> positions (argument index, keyword name) of the values the op writes into its output
_FILLS = {
    "masked_fill": ((2, "value"),), "fill": ((1, "value"),), "full": ((1, "fill_value"),),
    "full_like": ((1, "fill_value"),), "new_full": ((2, "fill_value"),), "index_fill": ((3, "value"),),
    "where": ((1, "self"), (2, "other")), "clamp": ((1, "min"), (2, "max")),
    "clamp_min": ((1, "min"),), "clamp_max": ((1, "max"),),
}
# op -> positions of scalar operands rewritten only when they are exactly a wider dtype's limit
_ARITHMETIC = {name: ((0, "self"), (1, "other")) for name in ("mul", "add", "sub", "rsub", "div")}
_LIMITS = {torch.finfo(d).max for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}
_LOWP = (torch.float16, torch.bfloat16)
# ops a constant tensor goes through on its way from get_attr (lifted constants are cloned)
_PASS_THROUGH = ("clone", "lift_fresh_copy", "detach", "alias", "_to_copy")
# ops that read a constant 0-dim tensor where their sibling overload reads a number
_SCALAR_OVERLOADS = {
    torch.ops.aten.masked_fill.Tensor: torch.ops.aten.masked_fill.Scalar,
    torch.ops.aten.where.self: None,  # ScalarSelf / ScalarOther / Scalar, by which operand it is
    torch.ops.aten.index_fill.int_Tensor: torch.ops.aten.index_fill.int_Scalar,
}


class SaturateConstants(Pass):
    name = "saturate_constants"

    def call(self, gm: fx.GraphModule) -> PassResult:
        count = 0
        for node in list(gm.graph.nodes):
            if node.op not in ("call_function", "call_method"):
                continue
            op = op_name(node)
            positions = _FILLS.get(op) or _ARITHMETIC.get(op)
            dtype = meta.value_dtype(node)
            if positions is None or dtype not in _LOWP:
                continue
            for index, keyword in positions:
                count += self._saturate(gm, node, op, dtype, index, keyword, fill=op in _FILLS)
        return PassResult(gm, count > 0)

    def _saturate(self, gm, node, op, dtype, index, keyword, fill: bool) -> int:
        in_args = index < len(node.args)
        if not in_args and keyword not in node.kwargs:
            return 0
        value = node.args[index] if in_args else node.kwargs[keyword]
        constant = value
        if isinstance(value, fx.Node):
            if node.target not in _SCALAR_OVERLOADS:
                return 0
            constant = _constant_scalar(gm, value)
        if not isinstance(constant, float) or not math.isfinite(constant):
            return 0
        limit = torch.finfo(dtype).max
        if abs(constant) <= limit or (not fill and abs(constant) not in _LIMITS):
            return 0
        new = math.copysign(limit, constant)
        if in_args:
            node.update_arg(index, new)
        else:
            node.update_kwarg(keyword, new)
        if isinstance(value, fx.Node):
            _scalar_overload(node)
        what = f"{constant:.6g}" + (f" (the constant tensor {value.name})" if isinstance(value, fx.Node) else "")
        reason = (f"{op} runs in {meta.dtype_name(dtype)}, whose finite range ends at {limit:.6g}: "
                  f"{what} became {new:.6g}, the value torch.finfo({meta.dtype_name(dtype)}) gives "
                  "(as the model's code computes under autocast)")
        notes = list(meta.get(node, meta.REWRITTEN) or [])
        meta.put(node, meta.REWRITTEN, [*notes, {"pass": self.name, "reason": reason}])
        return 1


def _constant_scalar(gm: fx.GraphModule, node: fx.Node) -> float | None:
    """The value of a 0-dim floating-point constant tensor `node` reads (through clones), or None."""
    while node.op == "call_function" and op_name(node) in _PASS_THROUGH and node.args \
            and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    if node.op != "get_attr":
        return None
    try:
        tensor = _attr(gm, str(node.target))
    except AttributeError:
        return None
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 0 or not tensor.is_floating_point():
        return None
    return float(tensor)


def _attr(gm: fx.GraphModule, target: str):
    owner = gm
    for part in target.split("."):
        owner = getattr(owner, part)
    return owner


def _scalar_overload(node: fx.Node) -> None:
    """The aten overload that takes a Python number where the node took a tensor."""
    if node.target is torch.ops.aten.where.self:
        scalar_self, scalar_other = (not isinstance(a, fx.Node) for a in node.args[1:3])
        node.target = (torch.ops.aten.where.Scalar if scalar_self and scalar_other else
                       torch.ops.aten.where.ScalarSelf if scalar_self else torch.ops.aten.where.ScalarOther)
    else:
        node.target = _SCALAR_OVERLOADS[node.target]
