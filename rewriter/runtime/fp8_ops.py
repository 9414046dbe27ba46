"""Run-time pieces of FP8 GEMMs: the `rewriter::fp8_linear` custom op and its quantization helpers.

    y = rewriter::fp8_linear(x, w_fp8, w_scale, bias, x_scale, out_dtype, fast_accum)

computes `x @ W.T + bias` with both operands in float8_e4m3fn:
    * `w_fp8` [N, K] holds the weight quantized once at conversion time, `w_scale` its dequantization
      scale (0-dim: per tensor; [N]: per output channel), so that W ~= w_fp8 * w_scale;
    * `x_scale` is the activation's dequantization scale from calibration (0-dim), or None: then it is
      computed from the activation on every call (per tensor when `w_scale` is 0-dim, per row when it
      is per channel, the two layouts `torch._scaled_mm` accepts);
    * the output is `out_dtype` (bf16); `bias` is added in the GEMM's epilogue.
Every scale is a *dequantization* scale (x ~= q * s), the convention of `torch._scaled_mm`'s
scale_a/scale_b and of ONNX QuantizeLinear/DequantizeLinear, so one stored tensor serves all three.
For a calibrated amax: s = amax * margin / 448, i.e. the quantization multiplier is 448 / (amax * margin).

Two paths compute the same quantized math:
    * CUDA, compute capability 8.9 or newer: `torch._scaled_mm` (FP8 tensor cores, fp32 accumulation);
    * anywhere else: emulation. The activation is quantized exactly as on the GPU, then both operands
      are dequantized and multiplied in fp32. Same values (up to fp32 summation order), no speed-up;
      the first emulated call in a process issues one `Fp8EmulationWarning`.

The op is registered with a CompositeImplicitAutograd kernel: torch.export keeps it as one node (so a
converted model re-exports, saves and loads, and the ONNX exporter can translate it, see
backends/onnx/fp8.py), while torch.compile decomposes it into the aten ops below, so inductor fuses the
activation quantization into the op that produces the activation. Importing `rewriter` registers the
op; a process that loads a saved FP8 model with plain `torch.export.load` must import it first.

Before: x(bf16) -> linear(x, w_bf16, b)                                    -> y(bf16)
After:  x(bf16) -> rewriter::fp8_linear(x, w_fp8, w_scale, b, x_scale|None) -> y(bf16)
"""
from __future__ import annotations

import functools
import threading
import warnings

import torch
from torch._subclasses.fake_tensor import is_fake

__all__ = ["E4M3_MAX", "FP8_DTYPE", "SCALE_EPS", "FP8_MIN_CAPABILITY", "FP8_DIM_MULTIPLE",
           "Fp8EmulationWarning", "fp8_linear_op", "fp8_linear",
           "quantize_weight", "activation_scale", "quantize_activation", "casts_saturate", "fp8_gemm_supported",
           "emulation_reason", "reset_emulation_notice", "emulation_noticed", "register_composite"]

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448: largest finite float8_e4m3fn
SCALE_EPS = 1e-12  # smallest amax used for a scale (all-zero tensors), as torchao's float8 EPS
FP8_MIN_CAPABILITY = (8, 9)
"""`torch._scaled_mm` runs on compute capability 8.9 (Ada) and 9.0+ (Hopper, Blackwell) (ScaledBlas.cpp)."""
FP8_DIM_MULTIPLE = 16
"""`torch._scaled_mm` needs K and N divisible by 16 (aten/src/ATen/native/cuda/ScaledBlas.cpp)."""

_NAMESPACE = "rewriter"
_SCHEMA = ("fp8_linear(Tensor x, Tensor w_fp8, Tensor w_scale, Tensor? bias, Tensor? x_scale, "
           "ScalarType out_dtype, bool fast_accum=True) -> Tensor")


class Fp8EmulationWarning(RuntimeWarning):
    """FP8 GEMMs run emulated (dequantize + fp32 matmul) because this device has no FP8 tensor cores."""


# ---------------------------------------------------------------- device support


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_gemm_supported(device: "torch.device | str | None" = None) -> bool:
    """True when `torch._scaled_mm` runs on `device` (CUDA, compute capability 8.9+, not ROCm).

    Args:
        device: a device; None means the current CUDA device (False without one).
    """
    if torch.version.hip is not None:  # MI300 uses e4m3fnuz; our weights are e4m3fn
        return False
    if device is None:
        if not torch.cuda.is_available():
            return False
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= FP8_MIN_CAPABILITY


def emulation_reason(device: "torch.device | str | None" = None) -> str | None:
    """Why FP8 GEMMs are emulated on `device` (None: the current CUDA device, else the CPU); None when
    they run on FP8 tensor cores."""
    if fp8_gemm_supported(device):
        return None
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device or "cpu")
    if device.type == "cuda" and torch.cuda.is_available() and torch.version.hip is None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = _capability(index)
        where = f"{torch.cuda.get_device_name(index)} (sm_{major}{minor}) has no FP8 tensor cores"
    elif torch.version.hip is not None and device.type == "cuda":
        where = "ROCm devices are not supported by the FP8 path"
    else:
        where = f"{device.type} has no FP8 GEMMs"
    return (f"{where}: FP8 GEMMs are emulated (activation quantized as on an FP8 GPU, then dequantized "
            "and multiplied in fp32): same numerics, no speed-up")


class _Notice:
    """One warning per process for emulated FP8 GEMMs."""

    def __init__(self):
        self.lock = threading.Lock()
        self.devices: set[str] = set()

    def note(self, device: torch.device) -> None:
        key = device.type
        if key in self.devices:
            return
        with self.lock:
            if key in self.devices:
                return
            self.devices.add(key)
        warnings.warn(f"rewriter: {emulation_reason(device)}", Fp8EmulationWarning, stacklevel=3)


_NOTICE = _Notice()
_SCALED_MM_FAILED: dict[tuple, str] = {}  # (per_row, has_bias, out_dtype) -> error, eager only


def reset_emulation_notice() -> None:
    """Forget that the emulation warning was issued (for tests)."""
    with _NOTICE.lock:
        _NOTICE.devices.clear()


def emulation_noticed() -> bool:
    """True once an emulated FP8 GEMM has run in this process (and warned)."""
    return bool(_NOTICE.devices)


def _is_traced(t: torch.Tensor) -> bool:
    """Fake/meta tensors (export, compile) or tracing: no warnings, no out= tricks. is_compiling first:
    dynamo, tracing an autograd.Function, cannot step into `is_fake`."""
    return torch.compiler.is_compiling() or t.device.type == "meta" or is_fake(t)


# ---------------------------------------------------------------- quantization


def quantize_weight(weight: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a [N, K] weight to float8_e4m3fn, once, in fp32.

    Args:
        weight: the weight, [N, K] (output features first, as nn.Linear stores it).
        per_channel: one scale per output row (shape [N]) instead of one for the tensor (0-dim).

    Returns:
        (w_fp8, w_scale): w_fp8 [N, K] float8_e4m3fn, w_scale fp32 dequantization scale
        (amax / 448), so that weight ~= w_fp8.float() * w_scale.

    Example:
        >>> w_fp8, s = quantize_weight(torch.randn(64, 32), per_channel=False)
        >>> w_fp8.dtype, s.shape
        (torch.float8_e4m3fn, torch.Size([]))
    """
    w = weight.detach().to(torch.float32).contiguous()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    scale = amax.clamp_min(SCALE_EPS) / E4M3_MAX
    q = quantize_activation(w, scale, saturate=False)  # |w| / scale <= 448: in range by construction
    return q.contiguous(), (scale.reshape(-1) if per_channel else scale).to(torch.float32)


def activation_scale(x2d: torch.Tensor, per_row: bool, dtype: torch.dtype = FP8_DTYPE) -> torch.Tensor:
    """Dynamic dequantization scale of a [M, K] activation: amax / 448 (0-dim, or [M, 1] per row);
    amax / 57344 for dtype=torch.float8_e5m2 (the largest finite value of `dtype`)."""
    if per_row:
        amax = torch.linalg.vector_norm(x2d, float("inf"), dim=1, keepdim=True, dtype=torch.float32)
    else:
        amax = torch.linalg.vector_norm(x2d, float("inf"), dtype=torch.float32)
    return amax.clamp_min(SCALE_EPS) / (E4M3_MAX if dtype == FP8_DTYPE else float(torch.finfo(dtype).max))


_OUT_DIV_OK = [True]  # torch.div(..., out=<float8 tensor>) worked on this build (tried once per process)


def _probe_saturation(device: torch.device) -> bool:
    """Run one cast: does this build's eager float8_e4m3fn cast map finite overflow to +-448?"""
    probe = torch.tensor([1.0e4, -1.0e4], device=device).to(FP8_DTYPE).to(torch.float32)
    return bool((probe.abs() == E4M3_MAX).all())


_SATURATES: dict[str, bool] = {"cpu": _probe_saturation(torch.device("cpu"))}  # device type -> eager casts


def casts_saturate(x: torch.Tensor) -> bool:
    """Whether casting `x` (after scaling) to float8_e4m3fn maps finite overflow to +-448 by itself, so a
    static-scale quantization needs no clamp.

    Eager casts saturate from torch 2.12 on (pytorch/pytorch #177870, #178817); torch 2.11's give NaN, so
    the answer is probed once per device type with one real cast. Traced code on a CUDA GPU with FP8
    (compute capability >= 8.9) is compiled by inductor into Triton, whose fp32 -> e4m3 conversion is the
    saturating `cvt.rn.satfinite` instruction on every torch version (pytorch/ao #1912). The clamp it
    replaces costs the fused GELU -> quantize kernel of GPT-2 medium 8 us of 51 on the H100 (the
    NaN-propagating max/min of `torch.clamp`). A traced graph run by a backend other than inductor
    (e.g. aot_eager) on torch 2.11 would therefore give NaN, not 448, beyond the calibrated range.
    """
    device = x.device
    if _is_traced(x):
        if device.type == "cuda" and fp8_gemm_supported(device):
            return True
        return _SATURATES.get(device.type, False)
    known = _SATURATES.get(device.type)
    if known is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False  # no probe inside a CUDA graph capture: clamp this time
        known = _SATURATES[device.type] = _probe_saturation(device)
    return known


def quantize_activation(x2d: torch.Tensor, scale: torch.Tensor, saturate: bool,
                        dtype: torch.dtype = FP8_DTYPE) -> torch.Tensor:
    """q = round_to_e4m3(x * (1 / scale)) computed in fp32; with `saturate` (static scales, whose
    calibrated range a new input may exceed; e4m3fn has no infinity) values beyond +-448 become +-448:
    by the cast itself where it saturates (`casts_saturate`), else by a clamp of x first. `dtype`
    float8_e5m2 rounds to e5m2 instead (gradients in FP8 training; not with `saturate`).

    What ONNX QuantizeLinear(x_fp32, scale, float8e4m3fn zero point, saturate=1) computes, except that
    x * (1 / scale) and x / scale may differ by one fp32 ulp before the rounding to 3 mantissa bits (no
    element of 84 M GELU outputs differed on the H100). The multiplication, as torchao's, keeps
    inductor's fused producer -> quantize kernels from a per-element division: GPT-2 medium's GELU ->
    quantize took 53.8 us with the division and 52.6 us without on the H100 (the bf16 GELU alone 48.5).
    In eager mode the fp32 product is written straight into the float8 result (one kernel, 3 bytes per
    element for a bf16 x); a 0-dim scale is viewed as [1] so type promotion computes in fp32, not in x's
    dtype (a bf16 product would round twice).
    """
    if saturate and not casts_saturate(x2d):
        # clamp in x's dtype: the bound may round up by 2^-8, still below e4m3's 464 midpoint
        bound = scale * E4M3_MAX
        x2d = torch.clamp(x2d, -bound, bound)
    multiplier = torch.reciprocal(scale.reshape(1) if scale.dim() == 0 else scale)
    # out= is for inference; autograd refuses it when x needs a gradient (then: two kernels)
    if _OUT_DIV_OK[0] and not _is_traced(x2d) and not (x2d.requires_grad and torch.is_grad_enabled()):
        out = torch.empty(x2d.shape, dtype=dtype, device=x2d.device)
        try:
            return torch.mul(x2d, multiplier, out=out)
        except RuntimeError:  # a build without float8 output casts in TensorIterator: two kernels
            _OUT_DIV_OK[0] = False
    return torch.mul(x2d, multiplier).to(dtype)


# ---------------------------------------------------------------- the op


def fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
               x_scale: torch.Tensor | None, out_dtype: torch.dtype, fast_accum: bool = True) -> torch.Tensor:
    """Reference implementation of `rewriter::fp8_linear` (see the module docstring).

    Args:
        x: activation [..., K], any float dtype (bf16 in a converted graph).
        w_fp8: weight [N, K], float8_e4m3fn.
        w_scale: weight dequantization scale, 0-dim (per tensor) or [N] (per output channel), fp32.
        bias: [N] or None.
        x_scale: static activation dequantization scale (0-dim fp32), or None for dynamic scaling.
        out_dtype: dtype of the result (bf16 or fp16; fp32 allowed).
        fast_accum: let `torch._scaled_mm` use the faster, less precise FP8 accumulation (the setting
            torchao uses for inference and for forward GEMMs).

    Returns:
        [..., N] in `out_dtype`.
    """
    k = x.shape[-1]
    n = w_fp8.shape[0]
    x2d = x.reshape(-1, k)
    per_row = w_scale.dim() > 0 and w_scale.numel() != 1
    if x_scale is None:
        s_x = activation_scale(x2d, per_row)
        q = quantize_activation(x2d, s_x, saturate=False)
    else:
        s_x = x_scale.to(torch.float32)
        q = quantize_activation(x2d, s_x, saturate=True)
    key = (per_row, bias is not None, out_dtype)
    if fp8_gemm_supported(x.device) and key not in _SCALED_MM_FAILED:
        try:
            y = _scaled_mm(q, s_x, w_fp8, w_scale, bias, out_dtype, fast_accum, per_row)
        except RuntimeError as exc:
            if _is_traced(x):
                raise
            # a torch build or GPU that refuses this scaling layout: keep the model running, say so once
            _SCALED_MM_FAILED[key] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            warnings.warn(f"rewriter: torch._scaled_mm refused an FP8 GEMM ({'rowwise' if per_row else 'tensorwise'}"
                          f" scales, bias={bias is not None}, out={out_dtype}): {_SCALED_MM_FAILED[key]}; "
                          "these GEMMs are emulated from now on (same values, no speed-up)",
                          Fp8EmulationWarning, stacklevel=2)
            y = _emulated_mm(q, s_x, w_fp8, w_scale, bias, out_dtype)
    else:
        if not _is_traced(x):
            _NOTICE.note(x.device)
        y = _emulated_mm(q, s_x, w_fp8, w_scale, bias, out_dtype)
    return y.reshape(*x.shape[:-1], n)


def _scaled_mm(q, s_x, w_fp8, w_scale, bias, out_dtype, fast_accum, per_row):
    m = q.shape[0]
    if per_row:
        scale_a = s_x.reshape(-1, 1).expand(m, 1).contiguous() if s_x.numel() == 1 else s_x
        scale_b = w_scale.reshape(1, -1)
    else:
        scale_a, scale_b = s_x.reshape(()), w_scale.reshape(())
    epilogue = bias is not None and out_dtype in (torch.bfloat16, torch.float16)
    y = torch._scaled_mm(q, w_fp8.t(), scale_a=scale_a, scale_b=scale_b,
                         bias=bias.to(out_dtype) if epilogue else None,
                         out_dtype=out_dtype, use_fast_accum=fast_accum)
    if bias is not None and not epilogue:  # _scaled_mm refuses a bias with fp32 output
        y = y + bias.to(out_dtype)
    return y


def _emulated_mm(q, s_x, w_fp8, w_scale, bias, out_dtype):
    x_deq = q.to(torch.float32) * s_x
    w_deq = w_fp8.to(torch.float32) * (w_scale.reshape(-1, 1) if w_scale.dim() > 0 else w_scale)
    y = torch.mm(x_deq, w_deq.t())
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def register_composite(schema: str, name: str, fn) -> torch.library.Library:
    """Define the op `rewriter::<schema>` and implement it by `fn` for every backend
    (CompositeImplicitAutograd: autograd and fake tensors follow fn's own ops); the returned library must
    stay referenced. A second import of the defining module (importlib.reload) keeps the first definition."""
    lib = torch.library.Library(_NAMESPACE, "FRAGMENT")  # noqa: TOR901 - the caller keeps it alive
    try:
        lib.define(schema)
    except RuntimeError as exc:  # re-import of the defining module: already defined
        if "already" not in str(exc) and "multiple times" not in str(exc):
            raise
        return lib
    lib.impl(name, fn, "CompositeImplicitAutograd")
    return lib


_LIB = register_composite(_SCHEMA, "fp8_linear", fp8_linear)
fp8_linear_op = torch.ops.rewriter.fp8_linear.default
"""The OpOverload a converted graph calls: `torch.ops.rewriter.fp8_linear.default`."""
