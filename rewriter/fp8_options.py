"""FP8 options of a conversion (`precision="fp8"`): how GEMMs are converted and which ones pay.

The defaults are the constants below, each with the measurement it comes from; the cost model that uses
them is rewriter/passes/plan/fp8_cost.py. Part of the ground floor: imports nothing from the passes.

    >>> rewriter.convert(model, (x,), precision="fp8", fp8=rewriter.Fp8Options(granularity="row"))
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from rewriter.errors import ConfigError

__all__ = ["Fp8Options", "resolve_options", "target_capability", "FP8_MIN_MNK", "FP8_MIN_ROWS",
           "FP8_MIN_SPEEDUP", "FP8_AMAX_MARGIN", "DECODE_GEMMS"]

FP8_MIN_MNK = 2 ** 31
"""Smallest M*N*K rewritten: torchao Float8Linear runs at 0.80x BF16 at M,K,N = 1024,2048,1024
(= 2^31) on an H100, 1.39x at 4096,8192,16384 (shared/ANCHORS.md, torchao float8 README)."""

FP8_MIN_ROWS = 8192
"""Fewest activation rows M (batch x seq) rewritten. Measured end to end on the H100 (tools/bench_fp8.py,
compiled, static scales): with FP8 on its fused q/k/v and FFN-up GEMMs, BERT-base b32 s128 (M=4096)
read 0.90x its bf16 model (tools/results/bench_fp8_base_vit_fused_h100.json), and in the next run three
compiles of one identical bf16 graph spread over 3.00-3.73 ms (bench_fp8_base_vit_minrows_h100.json):
at that size the model is bound by kernel launches and FP8 has nothing measurable to win, while it
adds quantization. Every end-to-end FP8 win was measured at M >= 8192 (GPT-2 medium b8 s1024, the
Llama MLP at 8192 rows, BERT-large and ViT-B at about 12,300 rows)."""

FP8_MIN_SPEEDUP = 1.05
"""Estimated speed-up (roofline x FP8_ROOFLINE_EFFICIENCY, passes/plan/fp8_cost.py) a GEMM needs to be rewritten: FP8 must
never be slower than BF16, so a GEMM estimated near break-even stays BF16."""

DECODE_GEMMS = ("auto", "scaled_mm", "weight_only", "flops")
"""Choices of `Fp8Options.decode_gemms` (see there)."""

FP8_AMAX_MARGIN = 2.0
"""Static scales map amax * margin to 448: one binade of head room for inputs larger than those
calibrated (the Ranges pass uses the same margin for fp16 overflow). e4m3fn keeps 3 mantissa bits in
every normal binade, so the head room costs precision only for values below amax * margin / 2^15
(e4m3's smallest normal, 2^-6, scaled), which become subnormals one binade earlier."""


@dataclasses.dataclass(frozen=True)
class Fp8Options:
    """How precision="fp8" converts GEMMs. Defaults are the module constants above.

    Args:
        granularity: "tensor" (one scale per weight and per activation: `_scaled_mm` tensorwise, the
            torchao default) or "row" (per output channel weights, per row activations: rowwise).
        margin: static activation scales are 448 / (amax * margin).
        static_scales: use calibrated amax when the ranges pass measured it (else always dynamic).
        min_mnk: GEMMs with M*N*K below this stay bf16.
        min_rows: GEMMs whose activation has fewer rows M (batch x seq of the example) stay bf16.
        min_speedup: GEMMs whose estimated speed-up is below this stay bf16 (0 disables the estimate).
        fused_quantization: estimate for a model run under torch.compile, which fuses the activation
            quantization into its producer (eager otherwise). None (the default): True when the
            conversion's backend is "compile" with inductor, else False.
        target: compute capability of the GPU the model will run on: "sm_90", "9.0", (9, 0), "cpu";
            None: the current CUDA device, or, without one, an FP8 GPU (the converted model then
            emulates FP8 here and says so).
        fast_accum: `torch._scaled_mm(use_fast_accum=...)`: faster FP8 accumulation, as torchao's
            inference and forward GEMMs use.
        decode_gemms: how the decode graph of a converted causal LM (generate=True) runs its GEMMs. A
            decode step multiplies a few rows (the batch) by every weight: it is bound by the weight
            bytes it reads, not by FLOPs, so the FLOP rules above (min_mnk, min_rows) would keep every
            decode GEMM bf16; decode GEMMs are judged by the weight bytes they read instead
            (passes/plan/fp8_decode.py). "scaled_mm": FP8 weights stored once and the activation
            quantized per call, `rewriter::fp8_linear` (torch._scaled_mm); "weight_only": FP8 weights
            widened inside the GEMM, the activation as it is, `rewriter::fp8_weight_linear` (on CUDA with
            triton a Triton GEMV reading each weight byte once, eager or compiled; elsewhere it pays only
            when the decode graph is compiled, which fuses the widening: fused_quantization); "auto"
            (default): per GEMM, the one estimated faster; "flops": judge decode GEMMs by the FLOP rules
            like any other graph. Prefill graphs always use the FLOP rules.

    Example:
        >>> rewriter.convert(model, (x,), precision="fp8", fp8=Fp8Options(granularity="row"))
    """

    granularity: str = "tensor"
    margin: float = FP8_AMAX_MARGIN
    static_scales: bool = True
    min_mnk: int = FP8_MIN_MNK
    min_rows: int = FP8_MIN_ROWS
    min_speedup: float = FP8_MIN_SPEEDUP
    fused_quantization: "bool | None" = None
    target: "str | tuple[int, int] | None" = None
    fast_accum: bool = True
    decode_gemms: str = "auto"

    def __post_init__(self):
        if self.granularity not in ("tensor", "row"):
            raise ConfigError(f"Fp8Options(granularity={self.granularity!r}): write 'tensor' (one scale "
                              "per tensor) or 'row' (per output channel weights, per row activations)")
        if not isinstance(self.margin, (int, float)) or not (1.0 <= float(self.margin) <= 2 ** 8):
            raise ConfigError(f"Fp8Options(margin={self.margin!r}): write a number from 1 (scale amax to "
                              "448 exactly) to 256, e.g. 2.0 for one binade of head room")
        if not isinstance(self.min_mnk, int) or self.min_mnk < 0:
            raise ConfigError(f"Fp8Options(min_mnk={self.min_mnk!r}): write a non-negative integer such as "
                              f"{FP8_MIN_MNK} (0 rewrites GEMMs of any size)")
        if not isinstance(self.min_rows, int) or self.min_rows < 0:
            raise ConfigError(f"Fp8Options(min_rows={self.min_rows!r}): write a non-negative integer such as "
                              f"{FP8_MIN_ROWS} (0 rewrites GEMMs at any batch x seq)")
        if not isinstance(self.min_speedup, (int, float)) or self.min_speedup < 0:
            raise ConfigError(f"Fp8Options(min_speedup={self.min_speedup!r}): write a number >= 0 such as "
                              f"{FP8_MIN_SPEEDUP} (0 disables the estimate)")
        if self.decode_gemms not in DECODE_GEMMS:
            raise ConfigError(f"Fp8Options(decode_gemms={self.decode_gemms!r}): write one of "
                              f"{', '.join(map(repr, DECODE_GEMMS))} (how a decode graph's GEMMs use FP8 weights)")
        target_capability(self.target)  # validates

    @classmethod
    def always(cls, **changes) -> "Fp8Options":
        """Options that rewrite every eligible GEMM whatever its size (tests, emulation, accuracy
        studies): min_mnk=0, min_rows=0, min_speedup=0."""
        return cls(**{"min_mnk": 0, "min_rows": 0, "min_speedup": 0.0, **changes})

    def check_mode(self, mode: str) -> None:
        """Raise ConfigError when these options cannot convert a conversion of `mode` ("eval" | "train")."""
        if mode == "train" and self.granularity == "row":
            raise ConfigError("Fp8Options(granularity='row') is for mode='eval': FP8 training scales x, the "
                              "weight and the gradient per tensor (dynamic, as torchao's Float8Linear); write "
                              "granularity='tensor' for mode='train'")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["target"] = _target_text(self.target)
        return out


def _target_text(target) -> str | None:
    cap = target_capability(target)
    if cap is None:
        return None
    return "cpu" if cap == (0, 0) else f"sm_{cap[0]}{cap[1]}"


def target_capability(target) -> tuple[int, int] | None:
    """(major, minor) of the target of an `Fp8Options.target`; (0, 0) for "cpu"; None for "auto"."""
    if target is None or target == "auto":
        return None
    if isinstance(target, tuple) and len(target) == 2 and all(isinstance(v, int) for v in target):
        return target
    text = str(target).strip().lower()
    if text == "cpu":
        return (0, 0)
    found = re.fullmatch(r"(?:sm_?)?(\d+)(?:\.(\d+))?", text)
    if found:
        digits, minor = found.group(1), found.group(2)
        if minor is not None:
            return int(digits), int(minor)
        if len(digits) >= 2:
            return int(digits[:-1]), int(digits[-1])
    raise ConfigError(f"Fp8Options(target={target!r}): write a compute capability such as 'sm_90', "
                      "'sm_89', '9.0' or (9, 0), 'cpu', or None for the current device")


def resolve_options(options: "Fp8Options | None", config: Any) -> Fp8Options:
    """`options` (None: the config's `fp8`) with fused_quantization=None decided by the conversion's
    backend: inductor (backend="compile", the default compiler) fuses each activation's quantization into
    its producer. `config` is the ConvertConfig (its `fp8` and `compiled_by_inductor()` are read)."""
    if options is None:
        options = getattr(config, "fp8", None) or Fp8Options()
    if options.fused_quantization is not None:
        return options
    return dataclasses.replace(options, fused_quantization=config.compiled_by_inductor())
