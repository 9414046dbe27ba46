"""Fp8Cost: decide, per GEMM, whether FP8 pays off; every GEMM kept in BF16 says why.

Runs after `assign` (precision="fp8" only). For every tensor-core op (the op table's LOWP class) it
writes node.meta[FP8] = {"use": bool, "rule": ..., "reason": ..., plus the shape and the estimate}.
`rewrite/fp8` then rewrites exactly the nodes with "use": True. Rules, in order (the first that fails
is the reason):

  precision  the node was decided bf16 (an override or a measurement may have kept it fp32)
  override   the user did not override it to bf16: under precision="fp8" an override KEY=bf16 on a GEMM
             (op type, module regex or module path) means "this GEMM stays bf16, not FP8"
  op         linear, addmm, mm or matmul whose second operand is a stored 2-D weight; GEMMs of two
             activations (attention), batched GEMMs and convolutions stay bf16
  dims       K and N multiples of 16 (`torch._scaled_mm`: mat1 [M, K] and mat2 [K, N], ScaledBlas.cpp)
  hardware   the target GPU has FP8 tensor cores: compute capability 8.9+ (`torch._scaled_mm`)
  size       M*N*K >= FP8_MIN_MNK (FP8 loses on small GEMMs: torchao Float8Linear 0.80x at
             M,K,N = 1024,2048,1024 on H100; pytorch/ao#1297, TransformerEngine#445), and
             M >= FP8_MIN_ROWS (measured end to end: see that constant)
  cost       estimate FP8_ROOFLINE_EFFICIENCY x t_bf16 / (t_fp8 + t_quantize) >= FP8_MIN_SPEEDUP

mode="train" applies the same rules to the training step (`estimate_train_speedup`): the forward,
grad_x and grad_w GEMMs (the same FLOPs each) in bf16 against FP8, plus the dynamic quantization of x,
the weight and grad_out and the transposed float8 copies the backward GEMMs read. Training always scales
dynamically per tensor (weights change every step: no static scales, no stored FP8 weights; gradients in
float8_e5m2, rewriter/runtime/fp8_train_ops.py), so its records say {"scaling": "dynamic", "training":
True, "grad_dtype": "float8_e5m2"}; Fp8Options(granularity="row") is refused in training mode
(ConfigError), because the training GEMMs scale per tensor only.

M is the example's batch*seq (rows of the activation in the captured example); a model traced at a
small batch is judged at that batch, and the reason says which M it used.

The decode graph of a converted causal LM (gm.meta[GENERATION_STEP] == "decode", rewriter/generation)
is judged by passes/plan/fp8_decode.py instead of the size rules: its GEMMs read every weight for a
few rows, so FP8 pays by halving weight bytes (Fp8Options.decode_gemms; rule "decode").

The roofline follows torchao's `torchao/testing/training/roofline_utils.py` (inference variant): a
GEMM takes max(2MNK / rate, bytes / bandwidth, launch), and quantizing the activation costs its
kernels' memory traffic, each at least one launch. Rates are those measured on the H100 in
shared/ANCHORS.md (798 TFLOP/s bf16, 1449 TFLOP/s `_scaled_mm` fp8 at 8192^3); bandwidth is the H100
SXM datasheet's 3.35 TB/s at torchao's 92% achievable. The quantization traffic is measured
(tools/bench_gemm_fp8.py on the H100): eager quantization costs about 20 bytes per activation element
(dynamic) and 32 (static: the clamp runs as its own kernels); under torch.compile
(`Fp8Options(fused_quantization=True)`) inductor fuses it into the producer of the activation (about
6 bytes per element dynamic, 1.5 static). So eager FP8 pays only on very large GEMMs, while compiled
FP8 with calibrated (static) scales pays on the transformer GEMMs of BERT-large and GPT-2 medium.
Inductor can only fuse into kernels it generates: an activation that comes straight (through views)
from an extern kernel, attention or another GEMM in bf16, or from a bf16 graph input, is quantized by
a kernel of its own that reads it again (3 bytes per element static, measured 12.2 us for BERT-large's
12288 x 1024 attention output on the H100), which the bf16 GEMM does not pay: the estimate charges it
("quantize": "own kernel" in the record), so the attention output projections of BERT-large and GPT-2
medium stay bf16 (measured: 26.8 + 12.2 us in FP8 vs 37.3 us in bf16).

Before (node.meta[FP8]): -
After:  linear(768x768, M=4096)     {"use": False, "rule": "cost", "reason": "kept bf16: estimated 0.34x ..."}
        linear(4096x14336, M=8192) {"use": True, "rule": "fp8", "reason": "float8_e4m3fn GEMM: estimated 1.17x ..."}

Static scales: when `ranges` measured the activation (node.meta[RANGE]["amax"], finite and > 0), the
activation scale is fixed at conversion: 448 / (amax * margin); otherwise it is computed per call.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from rewriter import meta
from rewriter.config import ConvertConfig, Mode
from rewriter.fp8_options import (FP8_AMAX_MARGIN, FP8_MIN_MNK, FP8_MIN_ROWS, FP8_MIN_SPEEDUP, Fp8Options,
                                  resolve_options, target_capability)
from rewriter.passes.graph_utils import is_cast
from rewriter.passes.infra import AnalysisPass, PassResult
from rewriter.passes.op_tables import op_name
from rewriter.runtime.fp8_ops import E4M3_MAX, FP8_DIM_MULTIPLE, FP8_MIN_CAPABILITY, fp8_linear_op
from rewriter.runtime.fp8_train_ops import fp8_linear_train
from rewriter.runtime.fp8_weight_ops import fp8_weight_linear_op
from rewriter.passes.plan.fp8_decode import judge_decode
from rewriter.passes.plan.fp8_roofline import (  # noqa: F401 (_QUANT_KERNELS: read by tools/bench_gemm_fp8.py)
    _QUANT_KERNELS, BF16_FLOPS, FP8_FLOPS, FP8_ROOFLINE_EFFICIENCY, HBM_BYTES_PER_S, KERNEL_LAUNCH_S, GemmShape,
    estimate_speedup, estimate_train_speedup)

__all__ = ["Fp8Options", "Fp8Cost", "resolve_options", "GemmShape", "estimate_speedup", "estimate_train_speedup",
           "gemm_operands", "stored_weight", "target_capability", "FP8_MIN_MNK", "FP8_MIN_ROWS", "FP8_MIN_SPEEDUP",
           "FP8_ROOFLINE_EFFICIENCY", "FP8_AMAX_MARGIN", "FP8_DIM_MULTIPLE", "FP8_MIN_CAPABILITY", "BF16_FLOPS",
           "FP8_FLOPS", "HBM_BYTES_PER_S", "KERNEL_LAUNCH_S", "FP8_GEMM_OPS"]

# ---------------------------------------------------------------- constants (each with its source)
# The option defaults (FP8_MIN_MNK, FP8_MIN_ROWS, FP8_MIN_SPEEDUP, FP8_AMAX_MARGIN) live with Fp8Options in
# rewriter/fp8_options.py, the facts of `torch._scaled_mm` (FP8_DIM_MULTIPLE, FP8_MIN_CAPABILITY) in
# rewriter/runtime/fp8_ops.py, the roofline (rates, bandwidth, quantization traffic, the estimates) in
# passes/plan/fp8_roofline.py; they are imported above and stay importable from here.

FP8_GEMM_OPS = ("linear", "addmm", "mm", "matmul")
"""Ops rewritten to `rewriter::fp8_linear` when their second operand is a stored 2-D weight."""

_LAYOUT_OPS = frozenset("""
view reshape _unsafe_view transpose permute t expand squeeze unsqueeze flatten unflatten contiguous clone
alias detach dropout getitem split split_with_sizes chunk unbind slice select narrow
""".split())
"""Ops between a producer and a GEMM that inductor turns into indexing, not kernels (dropout: eval;
getitem: of a split, or of attention's (output, logsumexp) tuple)."""


def _resolve_target(options: Fp8Options) -> tuple[tuple[int, int] | None, str]:
    """(capability or None for "an FP8 GPU assumed", words) of the hardware the plan is for."""
    cap = target_capability(options.target)
    if cap is not None:
        return cap, ("cpu" if cap == (0, 0) else f"sm_{cap[0]}{cap[1]} (given)")
    if torch.cuda.is_available() and torch.version.hip is None:
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return (major, minor), f"{torch.cuda.get_device_name(index)} (sm_{major}{minor}, this machine)"
    return None, "an FP8 GPU (sm_89+; none here: the converted model emulates FP8 on this machine)"


def gemm_operands(node: fx.Node):
    """(activation, weight, bias, weight_is_nk) of a GEMM node, or None when it is not one of
    FP8_GEMM_OPS in the supported form. The weight may be a get_attr or a cast of one.

    linear(x, w[N,K], b) -> weight_is_nk True; addmm(b, x, w[K,N]), mm(x, w[K,N]), matmul(x, w[K,N])
    -> weight_is_nk False.
    """
    if node.op != "call_function":
        return None
    target = node.target
    name = getattr(getattr(target, "_overloadpacket", None), "__name__", None)
    if name is None:
        name = getattr(target, "__name__", "")
    name = name.split("::")[-1].split(".")[0]
    args = node.args
    if name == "linear":
        if node.kwargs or len(args) < 2:
            return None
        return args[0], args[1], (args[2] if len(args) > 2 else None), True
    if name == "addmm":
        if any(float(node.kwargs.get(key, 1)) != 1.0 for key in ("beta", "alpha")) or len(args) != 3:
            return None
        return args[1], args[2], args[0], False
    if name in ("mm", "matmul"):
        if node.kwargs or len(args) != 2:
            return None
        return args[0], args[1], None, False
    return None


def stored_weight(value) -> fx.Node | None:
    """The get_attr behind a GEMM's weight operand (through one dtype cast), or None."""
    if not isinstance(value, fx.Node):
        return None
    if is_cast(value):
        value = value.args[0]
    return value if isinstance(value, fx.Node) and value.op == "get_attr" else None


def _shape(node) -> tuple | None:
    val = node.meta.get("val", node.meta.get("tensor_meta")) if isinstance(node, fx.Node) else None
    shape = getattr(val, "shape", None)
    return None if shape is None else tuple(shape)


def _int(size) -> int:
    try:
        return int(size)
    except Exception:  # symbolic: use the example's value
        hint = getattr(getattr(size, "node", None), "hint", None)
        return int(hint) if hint is not None else 1


def _fmt(x: float) -> str:
    return f"{x:.1e}"


# ---------------------------------------------------------------- the pass


class Fp8Cost(AnalysisPass):
    """Annotate every tensor-core op with node.meta[FP8] = {"use", "rule", "reason", ...}.

    Args:
        config: the conversion config (precision must be fp8 for anything to be used).
        options: FP8 options (scaling, thresholds, target); defaults from the module constants.

    Example:
        >>> PassManager([Classify(), Assign(config), Fp8Cost(config)])(gm)
        >>> {n.name: n.meta[meta.FP8]["reason"] for n in gm.graph.nodes if meta.FP8 in n.meta}
    """

    name = "fp8_cost"

    def __init__(self, config: ConvertConfig, options: Fp8Options | None = None):
        self.config = config
        self.options = resolve_options(options, config)
        self.options.check_mode(config.mode.value)

    def call(self, gm: fx.GraphModule) -> PassResult:
        cap, where = _resolve_target(self.options)
        # a causal LM's decode step (rewriter/generation): its GEMMs are judged by weight bytes (fp8_decode)
        self._decode = gm.meta.get(meta.GENERATION_STEP) == "decode"
        plan = {"use": [], "kept": {}}
        for node in gm.graph.nodes:
            info = meta.get(node, meta.OP_CLASS) or {}
            if node.op != "call_function" or info.get("class") != "lowp":
                continue
            if node.target in (fp8_linear_op, fp8_linear_train, fp8_weight_linear_op):
                continue  # already rewritten: its record stays as the rewrite left it
            record = self._judge(node, info.get("op", node.name), cap, where)
            meta.put(node, meta.FP8, record)
            if record["use"]:
                plan["use"].append(node.name)
            else:
                plan["kept"][node.name] = record["reason"]
        summary = gm.meta.setdefault(meta.FP8, {})
        summary.update({"target": where, "options": self.options.to_dict(), "planned": plan["use"],
                        "kept": plan["kept"]})
        return PassResult(gm, False)

    # ------------------------------------------------------------------ one node
    def _judge(self, node: fx.Node, op: str, cap, where: str) -> dict:
        opts = self.options
        decision = meta.get(node, meta.DECISION) or {}

        def keep(rule: str, reason: str, **extra) -> dict:
            dtype = decision.get("dtype", "bfloat16")
            short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)
            return {"use": False, "rule": rule, "reason": f"kept {short}: {reason}", **extra}

        if decision.get("dtype") != "bfloat16":
            return keep("precision", f"{op} was decided {decision.get('dtype')} by {decision.get('rule')} "
                        f"({decision.get('reason')}); FP8 only replaces bf16 GEMMs")
        if str(decision.get("rule", "")).startswith("override:"):
            return keep("override", f"{decision.get('reason')}: under precision fp8 a bf16 override keeps the "
                        "GEMM in bf16")
        if decision.get("rule") == "autocast-region":
            return keep("autocast-region", f"{decision.get('reason')}: the model asks for bf16 here, not FP8")
        operands = gemm_operands(node)
        if operands is None:
            what = ("multiplies activations batch by batch" if op in ("bmm", "baddbmm") else
                    "is a convolution" if op.startswith("conv") or op.startswith("_conv") else
                    "is attention" if "attention" in op else f"is {op}")
            return keep("op", f"{op} {what}; the FP8 rewrite handles {', '.join(FP8_GEMM_OPS)} with a "
                        "stored 2-D weight")
        x, w, _bias, nk = operands
        weight = stored_weight(w)
        x_shape, w_shape = _shape(x), _shape(w)
        if weight is None:
            return keep("op", f"{op} multiplies two activations (its second operand {getattr(w, 'name', w)} "
                        "is computed at run time, not a stored weight); FP8 needs a pre-quantized weight")
        if not x_shape or len(x_shape) < 2 or not w_shape or len(w_shape) != 2:
            return keep("op", f"{op}: needs an activation of rank >= 2 and a 2-D weight "
                        f"(got {x_shape} and {w_shape})")
        n, k = (_int(w_shape[0]), _int(w_shape[1])) if nk else (_int(w_shape[1]), _int(w_shape[0]))
        m = max(1, math.prod(_int(s) for s in x_shape[:-1]))
        shape = GemmShape(m, n, k)
        dims = {"m": m, "n": n, "k": k, "mnk": shape.mnk, "weight": str(weight.target)}
        if self._decode and opts.decode_gemms != "flops" and self.config.mode is not Mode.TRAIN:
            return judge_decode(shape, dims, opts, cap, where, keep, _quantization_producer(x, decision.get("dtype")))
        if k % FP8_DIM_MULTIPLE or n % FP8_DIM_MULTIPLE:
            bad = " and ".join(f"{d}={v}" for d, v in (("K", k), ("N", n)) if v % FP8_DIM_MULTIPLE)
            return keep("dims", f"{bad} not a multiple of {FP8_DIM_MULTIPLE} (torch._scaled_mm needs K and N "
                        f"divisible by {FP8_DIM_MULTIPLE})", **dims)
        if cap is not None and cap < FP8_MIN_CAPABILITY:
            what = "the CPU has" if cap == (0, 0) else f"sm_{cap[0]}{cap[1]} has"
            return keep("hardware", f"target {where}: {what} no FP8 tensor cores (torch._scaled_mm needs "
                        f"sm_{FP8_MIN_CAPABILITY[0]}{FP8_MIN_CAPABILITY[1]}+)", **dims)
        train = self.config.mode is Mode.TRAIN
        amax, scaling_note = self._static_amax(x)
        static = amax is not None
        if train:
            speedup, detail = estimate_train_speedup(shape, fused=opts.fused_quantization)
            dims.update({"training": True, "grad_dtype": "float8_e5m2"})
        else:
            producer, own = _quantization_producer(x, decision.get("dtype"))
            speedup, detail = estimate_speedup(shape, static=static, fused=opts.fused_quantization,
                                               own_kernel=own)
            if opts.fused_quantization:
                dims["quantize"] = (f"own kernel: {producer} is not fusable (extern kernel or graph input)"
                                    if own else f"fused into {producer}")
        dims.update({"est_speedup": round(speedup, 3), **detail,
                     "scaling": "static" if static else "dynamic", "granularity": opts.granularity})
        if static:
            dims.update({"amax": amax, "margin": float(opts.margin),
                         "scale": E4M3_MAX / (amax * float(opts.margin))})
        sizes = f"M={m} (example batch x seq), N={n}, K={k}"
        if shape.mnk < opts.min_mnk:
            return keep("size", f"M*N*K = {_fmt(shape.mnk)} < {_fmt(opts.min_mnk)} ({sizes}): FP8 loses on "
                        "small GEMMs (torchao Float8Linear 0.80x at 1024x2048x1024 on H100)", **dims)
        if m < opts.min_rows:
            return keep("size", f"M = {m} rows < {opts.min_rows} ({sizes}): below 8192 rows no end-to-end FP8 "
                        "gain was measured on an H100 (BERT-base at M=4096: 0.90x)", **dims)
        mode = "fused quantization (torch.compile)" if opts.fused_quantization else "eager"
        gemm, quantized = ((" forward + grad_x + grad_w", "x, weight and grad_out (+ transposes)") if train
                           else ("", f"the activation ({dims['quantize']})" if "quantize" in dims
                                 else "the activation"))
        estimate = (f"estimated {speedup:.2f}x vs bf16 on an H100, {mode} (roofline {detail['roofline']:.2f}x x "
                    f"{FP8_ROOFLINE_EFFICIENCY:g}: bf16{gemm} GEMM {detail['bf16_us']} us, fp8{gemm} GEMM "
                    f"{detail['fp8_us']} us + quantizing {quantized} {detail['quant_us']} us; {sizes})")
        if opts.min_speedup and speedup < opts.min_speedup:
            return keep("cost", f"{estimate} < {opts.min_speedup:g}x", **dims)
        forced = []
        if shape.mnk < FP8_MIN_MNK:
            forced.append(f"M*N*K {_fmt(shape.mnk)} < default {_fmt(FP8_MIN_MNK)}")
        if m < FP8_MIN_ROWS:
            forced.append(f"M {m} < default {FP8_MIN_ROWS} rows")
        if speedup < FP8_MIN_SPEEDUP:
            forced.append(f"{speedup:.2f}x < default {FP8_MIN_SPEEDUP:g}x")
        if forced:
            estimate += (f"; rewritten although {' and '.join(forced)}, because Fp8Options(min_mnk="
                         f"{opts.min_mnk}, min_rows={opts.min_rows}, min_speedup={opts.min_speedup:g})")
        if train:
            what = "FP8 training GEMMs (float8_e4m3fn forward, float8_e5m2 gradients)"
            how = "x and the fp32 master weight quantized on every call with dynamic per-tensor scales"
        else:
            what = "float8_e4m3fn GEMM"
            how = (f"static activation scale 448/(amax {_fmt(amax)} x margin {opts.margin:g})" if static
                   else f"dynamic per-{'row' if opts.granularity == 'row' else 'tensor'} activation scale "
                        f"({scaling_note})")
        return {"use": True, "rule": "fp8", "reason": f"{what}: {estimate}; {how}", **dims}

    def _static_amax(self, x) -> tuple[float | None, str]:
        if self.config.mode is Mode.TRAIN:
            return None, "training scales dynamically"
        if not self.options.static_scales:
            return None, "static scales disabled"
        value = x.args[0] if isinstance(x, fx.Node) and is_cast(x) else x
        record = meta.get(value, meta.RANGE) if isinstance(value, fx.Node) else None
        if not record or "amax" not in record:
            return None, "no calibration range"
        amax = record.get("amax")
        if not isinstance(amax, (int, float)) or not math.isfinite(amax) or amax <= 0:
            return None, f"calibrated amax {amax!r} is not a positive finite number"
        if record.get("nonfinite"):
            return None, f"calibration saw {record['nonfinite']} non-finite values"
        return float(amax), "calibrated"


def _quantization_producer(x, dtype: str | None) -> tuple[str, bool]:
    """(name of the node whose kernel would quantize the activation `x`, True when that cannot be fused:
    through layout ops, `x` comes from a graph input or an op of the LOWP class (GEMM, convolution,
    attention: extern kernels) already in the GEMM's dtype, so no cast kernel exists to fuse into)."""
    node = x
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method") \
            and op_name(node) in _LAYOUT_OPS \
            and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    if not isinstance(node, fx.Node):
        return str(node), False
    if node.op in ("placeholder", "get_attr"):
        own = meta.dtype_name(meta.value_dtype(node)) == dtype
        return (node.name if own else f"the cast of {node.name}"), own
    info = meta.get(node, meta.OP_CLASS) or {}
    produced = (meta.get(node, meta.DECISION) or {}).get("dtype")
    return node.name, info.get("class") == "lowp" and produced == dtype
