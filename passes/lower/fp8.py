"""Fp8: rewrite the GEMMs `fp8_cost` chose into `rewriter::fp8_linear` with float8_e4m3fn weights.

Before: x(bf16) -> linear(x, cast(w_fp32 -> bf16), b) -> y(bf16)                      4 bytes per weight
After:  x(bf16) -> fp8_linear(x, w_fp8, w_scale, b, x_scale|None, bf16) -> y(bf16)      1 byte per weight

Also `addmm(b, x, w[K, N])` (GPT-2's Conv1D), `mm(x, w[K, N])` and `matmul(x, w[K, N])` with a stored
weight: the weight is transposed once to [N, K] so every FP8 GEMM is one op. The node keeps its name
and annotations; its target and arguments change, and node.meta[REWRITTEN] says how.

  * the weight is quantized once, from its fp32 original (not from the bf16 copy), per tensor or per
    output channel (`Fp8Options.granularity`); `w_fp8` and `w_scale` are buffers beside the original,
    which is dropped when nothing else reads it, so FP8 layers hold 1 byte per weight plus the scales;
  * a static activation scale (calibration amax, see fp8_cost) is a 0-dim buffer holding the
    dequantization scale amax * margin / 448; without one the op scales dynamically on every call;
  * the bias stays as it was (bf16: `torch._scaled_mm` adds a bf16 bias in its epilogue).

On a machine without FP8 GEMMs the converted model runs the op's emulation path; the conversion says
so in node.meta[FP8]["emulated"], in the diff reason and in gm.meta[FP8]["emulated"], and the first
emulated call warns once (rewriter/runtime/fp8_ops.py).

In training mode (config.mode "train") nothing is stored in FP8: the weights are the fp32 master
parameters the optimizer updates, so each chosen GEMM becomes `fp8_linear_train`
(rewriter/runtime/fp8_train_ops.py), which quantizes x and the weight on every call (e4m3, dynamic
per-tensor scales) and runs the backward GEMMs with float8_e5m2 gradients:

Before: x(bf16) -> linear(x, cast(w_fp32 -> bf16), b) -> y(bf16)
After:  x(bf16) -> fp8_linear_train(x, w_fp32, b, bf16) -> y(bf16)   w_fp32: the parameter itself
        addmm(b, x, w[K, N]) -> fp8_linear_train(x, aten.t(w), b, bf16)   (autograd flows through t)

The weight's bf16 cast is erased when nothing else reads it; the parameter keeps its name and identity.

A decode GEMM planned with {"kernel": "weight_only"} (plan/fp8_decode) becomes the weight-only op:

Before: x(bf16) -> linear(x, cast(w_fp32 -> bf16), b) -> y(bf16)
After:  x(bf16) -> fp8_weight_linear(x, w_fp8, w_scale[N], b, bf16) -> y(bf16)   w quantized per output channel

Runs after insert_casts/fold_casts (it reads the bf16 decisions and the casts of the weights) and
before cast_weights (which then stores the remaining weights, biases included, in bf16). A second run
finds nothing left to rewrite and reports modified=False.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from rewriter.fp8_options import Fp8Options
from rewriter.passes.plan.fp8_cost import gemm_operands, stored_weight
from rewriter.passes.graph_utils import attr_owner, free_attr_name
from rewriter.passes.infra import Pass, PassResult
from rewriter.runtime.fp8_ops import E4M3_MAX, FP8_DTYPE, emulation_reason, fp8_linear_op, quantize_weight
from rewriter.runtime.fp8_train_ops import fp8_linear_train
from rewriter.runtime.fp8_weight_ops import fp8_weight_linear_op
from rewriter import meta
from rewriter.config import ConvertConfig, Mode

__all__ = ["Fp8Rewrite"]


def _fake(shape, dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def _planned(graph: fx.Graph, rewritten):
    """(node, record, gemm operands, stored weight) of every GEMM Fp8Cost chose that is not yet
    `rewritten` (the op it becomes); a chosen GEMM no longer in a supported form is marked kept."""
    for node in list(graph.nodes):
        record = meta.get(node, meta.FP8)
        if not record or not record.get("use") or node.target in rewritten:
            continue
        operands = gemm_operands(node)
        weight = stored_weight(operands[1]) if operands else None
        if operands is None or weight is None:
            meta.put(node, meta.FP8, {**record, "use": False, "rule": "op",
                                      "reason": "kept bf16: the GEMM changed shape after the FP8 plan (not rewritten)"})
            continue
        yield node, record, operands, weight


class Fp8Rewrite(Pass):
    """Rewrite GEMMs annotated {"use": True} by `Fp8Cost` into `rewriter::fp8_linear`.

    Args:
        config: the conversion config (training mode: `fp8_linear_train` on the fp32 parameters).
        options: the same Fp8Options the cost pass used (granularity, margin, fast_accum).

    Example:
        >>> PassManager([..., Fp8Cost(config, opts), InsertCasts(config), FoldCasts(),
        ...              Fp8Rewrite(config, opts), CastWeights(config)])(gm)
    """

    name = "fp8"

    def __init__(self, config: ConvertConfig, options: Fp8Options | None = None):
        self.config = config
        self.options = options if options is not None else config.fp8_options()

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.config.mode is Mode.TRAIN:
            return self._rewrite_train(gm)
        graph = gm.graph
        emulated: str | None = None  # decided for the device the weights are on (the model's)
        kinds: list[str] = []  # per rewritten GEMM: weight-only GEMMs are never emulated
        quantized: dict[tuple[str, bool, bool], tuple[str, str, torch.Tensor, torch.Tensor]] = {}
        getters: dict[str, fx.Node] = {}
        done, dropped = [], []
        for node, record, operands, weight in _planned(graph, (fp8_linear_op, fp8_weight_linear_op)):
            x, w_value, bias, nk = operands
            target = str(weight.target)
            weight_only = record.get("kernel") == "weight_only"  # a decode GEMM (plan/fp8_decode)
            per_channel = weight_only or self.options.granularity == "row"
            key = (target, nk, per_channel)
            if key not in quantized:
                quantized[key] = self._quantize(gm, weight, nk, per_channel)
            w_target, s_target, w_fp8, w_scale = quantized[key]
            if not weight_only and "scaled_mm" not in kinds:  # the first _scaled_mm GEMM decides
                emulated = emulation_reason(w_fp8.device)
            kinds.append("weight-only" if weight_only else "scaled_mm")
            with graph.inserting_before(node):
                w_node = self._getter(graph, getters, w_target, w_fp8, node)
                s_node = self._getter(graph, getters, s_target, w_scale, node)
                x_scale_node = None
                if record.get("scaling") == "static" and not weight_only:
                    x_scale_node = self._static_scale(gm, graph, weight, record, node, w_fp8.device)
            out_dtype = meta.dtype_from_name((meta.get(node, meta.DECISION) or {}).get("dtype")) \
                or torch.bfloat16
            op = (meta.get(node, meta.OP_CLASS) or {}).get("op", node.name)
            node.kwargs = {}
            if weight_only:
                node.target = fp8_weight_linear_op
                node.args = (x, w_node, s_node, bias, out_dtype)
                self._annotate_weight_only(node, op, record, w_target, w_fp8, w_scale)
            else:
                node.target = fp8_linear_op
                node.args = (x, w_node, s_node, bias, x_scale_node, out_dtype, bool(self.options.fast_accum))
                self._annotate(node, op, record, w_target, w_fp8, w_scale, emulated, per_channel)
            done.append(node.name)
            for value in (w_value, weight):  # the bf16 cast and the fp32 original, when now unused
                if isinstance(value, fx.Node) and value in graph.nodes and not value.users:
                    graph.erase_node(value)
            dropped.extend(self._drop_unused(gm, target))
        if done:
            self._summarize(gm, done, dropped, emulated)
        return PassResult(gm, bool(done))

    # ------------------------------------------------------------------ training mode
    def _rewrite_train(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        transposed: dict[str, fx.Node] = {}  # weight target -> its aten.t node (tied [K, N] weights)
        done, emulated = [], None
        for node, record, operands, weight in _planned(graph, (fp8_linear_train,)):
            x, w_value, bias, nk = operands
            target = str(weight.target)
            param = getattr(*attr_owner(gm, target))
            if not done:
                emulated = emulation_reason(param.device)
            w_arg = weight
            if not nk:
                if target not in transposed:
                    with graph.inserting_after(weight):
                        transposed[target] = self._transpose(graph, weight, param, node)
                w_arg = transposed[target]
            out_dtype = meta.dtype_from_name((meta.get(node, meta.DECISION) or {}).get("dtype")) \
                or torch.bfloat16
            op = (meta.get(node, meta.OP_CLASS) or {}).get("op", node.name)
            node.target = fp8_linear_train
            node.args = (x, w_arg, bias, out_dtype, bool(self.options.fast_accum))
            node.kwargs = {}
            self._annotate_train(node, op, record, target, param, emulated)
            done.append(node.name)
            if w_value is not weight and not w_value.users:  # the bf16 cast of the weight
                graph.erase_node(w_value)
        if done:
            gm.meta.setdefault(meta.FP8, {}).update({
                "converted": [n.name for n in graph.nodes if n.target is fp8_linear_train],
                "training": True, "weight_bytes_fp8": 0, "scale_bytes": 0,
                "stored": "nothing in FP8: weights stay fp32 master parameters, quantized to float8_e4m3fn "
                          "on every call; gradients of the GEMM outputs in float8_e5m2",
                "emulated": emulated is not None, "emulation": emulated,
            })
        return PassResult(gm, bool(done))

    def _transpose(self, graph: fx.Graph, weight: fx.Node, param: torch.Tensor, user: fx.Node) -> fx.Node:
        node = graph.call_function(torch.ops.aten.t.default, (weight,))
        node.meta["val"] = _fake(tuple(reversed(param.shape)), param.dtype)
        if "nn_module_stack" in user.meta:
            node.meta["nn_module_stack"] = dict(user.meta["nn_module_stack"])
        meta.put(node, meta.DTYPE, meta.dtype_name(param.dtype))
        meta.put(node, meta.CREATED, {"pass": self.name, "reason": (
            f"{weight.target} [K, N] read as [N, K] by FP8 training GEMM {user.name} (a view: the gradient "
            "flows back to the fp32 parameter)")})
        return node

    def _annotate_train(self, node, op, record, target, param, emulated):
        where = f"; emulated on this machine ({emulated})" if emulated else "; runs torch._scaled_mm"
        reason = (f"{op} -> fp8_linear_train: x and {target} (fp32 master weight, not stored in FP8) quantized "
                  "to float8_e4m3fn on every call with dynamic per-tensor scales, grad_out to float8_e5m2; "
                  f"forward, grad_x and grad_w are FP8 GEMMs, {meta.dtype_name(node.args[3])} output{where}")
        new = dict(record)
        new.update({"use": True, "mode": "dynamic", "scale": None, "training": True,
                    "grad_dtype": "float8_e5m2", "weight_dtype": meta.dtype_name(param.dtype),
                    "emulated": emulated is not None, "granularity": "tensor", "from_op": op})
        self._record(node, new, emulated, reason, "fp8_linear_train",
                     f"FP8 training GEMM made by rewrite/fp8 from {op}")

    def _record(self, node, fp8_record: dict, emulated, reason: str, op_name: str, op_reason: str) -> None:
        """The annotations of a rewritten GEMM: its FP8 record, the rewrite note and its new op class."""
        if emulated:
            fp8_record["emulation"] = emulated
        meta.put(node, meta.FP8, fp8_record)
        meta.put(node, meta.REWRITTEN, [*(meta.get(node, meta.REWRITTEN) or []),
                                        {"pass": self.name, "reason": reason}])
        info = dict(meta.get(node, meta.OP_CLASS) or {})
        info.update({"op": op_name, "class": "lowp", "exact": False, "reason": op_reason})
        meta.put(node, meta.OP_CLASS, info)

    # ------------------------------------------------------------------ pieces
    def _quantize(self, gm, weight: fx.Node, nk: bool, per_channel: bool):
        module, name = attr_owner(gm, weight.target)
        tensor = getattr(module, name)
        w = tensor.detach() if nk else tensor.detach().t()
        w_fp8, w_scale = quantize_weight(w, per_channel)
        suffix = "" if nk else "_t"
        w_name = free_attr_name(module, f"{name}{suffix}_fp8")
        module.register_buffer(w_name, w_fp8.to(tensor.device))
        s_name = free_attr_name(module, f"{w_name}_scale")
        module.register_buffer(s_name, w_scale.to(tensor.device))
        prefix = str(weight.target).rpartition(".")[0]
        join = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
        return join(w_name), join(s_name), w_fp8, w_scale

    def _getter(self, graph: fx.Graph, getters: dict, target: str, tensor: torch.Tensor, user: fx.Node):
        if target in getters and getters[target] in graph.nodes:
            return getters[target]  # made before an earlier GEMM: nodes are visited in graph order
        node = graph.get_attr(target)
        node.meta["val"] = _fake(tensor.shape, tensor.dtype)
        if "nn_module_stack" in user.meta:
            node.meta["nn_module_stack"] = dict(user.meta["nn_module_stack"])
        meta.put(node, meta.DTYPE, meta.dtype_name(tensor.dtype))
        what = ("float8_e4m3fn weight (1 byte per element)" if tensor.dtype == FP8_DTYPE
                else f"weight dequantization scale ({'per output channel' if tensor.dim() else 'per tensor'})")
        meta.put(node, meta.CREATED, {"pass": self.name, "reason": f"{what} for FP8 GEMM {user.name}"})
        getters[target] = node
        return node

    def _static_scale(self, gm, graph: fx.Graph, weight: fx.Node, record: dict, user: fx.Node,
                      device: torch.device) -> fx.Node:
        amax, margin = float(record["amax"]), float(record.get("margin", self.options.margin))
        module, wname = attr_owner(gm, weight.target)
        # on the weight's device: torch._scaled_mm (and inductor's fake-tensor checks) want every
        # scale beside its GEMM's operands
        dequant = torch.tensor(amax * margin / E4M3_MAX, dtype=torch.float32, device=device)
        name = free_attr_name(module, f"{wname}_fp8_x_scale")
        module.register_buffer(name, dequant)
        prefix = str(weight.target).rpartition(".")[0]
        target = f"{prefix}.{name}" if prefix else name
        node = graph.get_attr(target)
        node.meta["val"] = _fake((), torch.float32)
        if "nn_module_stack" in user.meta:
            node.meta["nn_module_stack"] = dict(user.meta["nn_module_stack"])
        meta.put(node, meta.DTYPE, "float32")
        meta.put(node, meta.CREATED, {"pass": self.name, "reason": (
            f"static activation scale of {user.name}: dequantization scale amax {amax:.3g} x margin "
            f"{margin:g} / 448 (quantization multiplier 448 / (amax x margin) = {E4M3_MAX / (amax * margin):.4g})")})
        return node

    def _annotate(self, node, op, record, w_target, w_fp8, w_scale, emulated, per_channel):
        scale_text = (f"per output channel scales ({w_scale.numel()})" if per_channel
                      else f"per-tensor scale {float(w_scale):.3g}")
        if record.get("scaling") == "static":
            act = f"static activation scale 448/(amax x {record.get('margin', self.options.margin):g})"
        else:
            act = f"dynamic per-{'row' if per_channel else 'tensor'} activation scale"
        where = f"; emulated on this machine ({emulated})" if emulated else "; runs torch._scaled_mm"
        reason = (f"{op} -> rewriter::fp8_linear: {w_target} stored float8_e4m3fn ({scale_text}), {act}, "
                  f"{meta.dtype_name(node.args[5])} output{where}")
        new = dict(record)
        new.update({
            "use": True, "mode": record.get("scaling", "dynamic"), "scale": record.get("scale"),
            "emulated": emulated is not None, "weight_fp8": w_target, "weight_bytes": int(w_fp8.numel()),
            "scale_bytes": int(w_scale.numel() * 4), "granularity": "row" if per_channel else "tensor",
            "from_op": op,
        })
        self._record(node, new, emulated, reason, "fp8_linear", f"FP8 GEMM made by rewrite/fp8 from {op}")

    def _annotate_weight_only(self, node, op, record, w_target, w_fp8, w_scale):
        reason = (f"{op} -> rewriter::fp8_weight_linear: {w_target} stored float8_e4m3fn (per output channel "
                  f"scales ({w_scale.numel()})), widened to {meta.dtype_name(meta.value_dtype(node.args[0])) or 'x'}"
                  f"'s dtype inside the GEMM, activation not quantized, {meta.dtype_name(node.args[4])} output "
                  f"({record.get('reason', '')})")
        new = dict(record)
        new.update({"use": True, "mode": "weight-only", "scale": None, "emulated": False, "weight_fp8": w_target,
                    "weight_bytes": int(w_fp8.numel()), "scale_bytes": int(w_scale.numel() * 4),
                    "granularity": "row", "from_op": op})
        self._record(node, new, None, reason, "fp8_weight_linear",
                     f"weight-only FP8 GEMM made by rewrite/fp8 from {op}")

    @staticmethod
    def _drop_unused(gm: fx.GraphModule, target: str) -> list[str]:
        """Delete the fp32 original of a quantized weight when no node reads it any more."""
        if any(n.op == "get_attr" and str(n.target) == target for n in gm.graph.nodes):
            return []
        module, name = attr_owner(gm, target)
        if name in module._parameters:
            del module._parameters[name]
        elif name in module._buffers:
            del module._buffers[name]
        else:
            return []
        return [target]

    def _summarize(self, gm, done, dropped, emulated) -> None:
        summary = gm.meta.setdefault(meta.FP8, {})
        converted = [n for n in gm.graph.nodes if n.target in (fp8_linear_op, fp8_weight_linear_op)]
        fp8_bytes = 0
        scale_bytes = 0
        seen = set()
        for n in converted:
            for arg in n.args[1:3]:
                if isinstance(arg, fx.Node) and str(arg.target) not in seen:
                    seen.add(str(arg.target))
                    t = getattr(*attr_owner(gm, arg.target))
                    if t.dtype == FP8_DTYPE:
                        fp8_bytes += t.numel()
                    else:
                        scale_bytes += t.numel() * t.element_size()
        summary.update({
            "converted": [n.name for n in converted],
            "weight_bytes_fp8": fp8_bytes,
            "scale_bytes": scale_bytes,
            "dropped_weights": sorted(set(summary.get("dropped_weights", [])) | set(dropped)),
            "emulated": emulated is not None,
            "emulation": emulated,
        })

