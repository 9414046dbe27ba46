"""export_onnx: the converted GraphModule as an ONNX file that runs on the chosen ONNX Runtime target.

    converted gm --OrtKernels(target): node.meta[TARGET] on ops the target EP cannot run in 16 bits
                 --torch.export (the dims convert found dynamic: batch, sequence, image size)--> ExportedProgram
                 --torch.onnx.export(dynamo=True, optimize=False; FP8 GEMMs as Q/DQ or GemmFloat8)--> ONNX IR
                 --cleanup (folding.py), fp32 islands of the target decisions (kernels.py), CAST_RULES
                 --(optimize=True) ORT fusions, kept only when the precision check passes (fusion.py)--> .onnx
                 (optimize=True and an attention op unfused at symbolic sizes: once more at the example's
                 sizes, kept when that fuses more attention ops, with a note)

Before: x(fp32) -> _to_copy(fp16) -> linear(fp16) -> _to_copy(fp32) -> layer_norm(fp32)
After:  x(fp32) -> Cast(to=FLOAT16) -> MatMul/Add(fp16, fp16 initializers) -> Cast(to=FLOAT)
        -> LayerNormalization(fp32)

Every ONNX node is renamed "<module path>/<fx node>[/<OpType>]" after the node of the converted graph it
came from, so `rewrite diff` and the ONNX graph can be read side by side. The target decisions stay on
the converted model's nodes (node.meta[TARGET]: only annotations, the torch model computes as before),
so `rewrite diff` shows why a node runs in fp32 in the file.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Iterable

import onnx
import onnx_ir as ir
import torch
import torch.fx as fx

from rewriter import meta
from rewriter.backends.onnx.common import quiet
from rewriter.backends.onnx.folding import (fold_casts, infer_types, name_batch_dim, rename_nodes, simplify,
                                            symbolic_sizes)
from rewriter.backends.onnx.fp8 import (FP8_GEMMS, MIN_OPSET, ORT_CUDA_SPEED, check_gemm_float8, fp8_nodes,
                                        qdq_compute, translation_table, type_gemm_float8)
from rewriter.backends.onnx.fusion import fuse, unfused_attention
from rewriter.backends.onnx.kernels import check_decisions, fp32_fallbacks
from rewriter.backends.onnx.padding import is_right_padded, use_mask_index
from rewriter.backends.onnx.report import ExportReport, summarize
from rewriter.backends.onnx.trace import (check_converted, example_inputs_of, feeds_of, origin_map, output_names,
                                          precision_of, reexport, to_onnx)
from rewriter.errors import BackendError, ConfigError, InputError
from rewriter.passes.op_tables import EXPORT_TARGETS
from rewriter.passes.target.ort_kernels import OrtKernels
from rewriter.reexport import batch_is_dynamic

__all__ = ["export_onnx", "default_target", "DEFAULT_OPSET", "TARGETS"]

DEFAULT_OPSET = 18
TARGETS = tuple(EXPORT_TARGETS)
_BF16_OPSET = 22  # Conv, MaxPool and the pooling ops accept bfloat16 only from opset 22
_FP8_OPSET = 21   # QuantizeLinear/DequantizeLinear: float8e4m3fn and saturate from 19, the newest form 21


def default_target(converted: fx.GraphModule) -> tuple[str, str]:
    """(target, why): "ort-cuda" when the converted model's weights are on a CUDA device, else "ort-cpu"
    (the file then runs where the model runs now; pass target= to export for another machine)."""
    tensors = list(converted.parameters()) + list(converted.buffers())
    if any(t.is_cuda for t in tensors):
        return "ort-cuda", "the converted model is on CUDA"
    return "ort-cpu", "the converted model is on the CPU (pass target='ort-cuda' for a GPU machine)"


def _opset(opset, converted, fp8: bool) -> int:
    if opset is None:
        has_bf16 = any(meta.value_dtype(n) == torch.bfloat16 for n in converted.graph.nodes)
        opset = _BF16_OPSET if has_bf16 else _FP8_OPSET if fp8 else DEFAULT_OPSET
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not 18 <= opset <= newest:
        raise ConfigError(f"opset={opset!r}: write an integer from 18 (the exporter's base opset) to "
                          f"{newest} (the newest this onnx knows)")
    if fp8 and opset < MIN_OPSET:
        raise ConfigError(f"opset={opset}: the FP8 GEMMs need QuantizeLinear with float8e4m3fn, opset "
                          f"{MIN_OPSET} or later; write opset={_FP8_OPSET} or leave it out")
    return opset


def _check_options(fallback: str, target: str, fp8_gemm: str, converted, assume_right_padding, optimize) -> None:
    if fallback not in ("fp32", "error"):
        raise ConfigError(f"fallback={fallback!r}: write fallback='fp32' (keep such nodes in fp32 with "
                          "Casts around them) or fallback='error' (refuse them)")
    if target not in TARGETS:
        raise ConfigError(f"target={target!r}: write one of {', '.join(repr(t) for t in TARGETS)}")
    if fp8_gemm not in FP8_GEMMS:
        raise ConfigError(f"fp8_gemm={fp8_gemm!r}: write fp8_gemm='qdq' (QuantizeLinear/DequantizeLinear, "
                          "every EP) or fp8_gemm='com.microsoft' (GemmFloat8, CUDA EP on sm_89+)")
    if fp8_gemm == "com.microsoft":
        if target == "ort-cpu":
            raise BackendError("fp8_gemm='com.microsoft' emits com.microsoft.GemmFloat8, which only ONNX "
                               "Runtime's CUDA EP runs (sm_89+): export with target='ort-cuda', or with "
                               "fp8_gemm='qdq' for the CPU EP")
        check_gemm_float8(converted)
    if assume_right_padding and not optimize:
        raise ConfigError("assume_right_padding=True needs optimize=True: it rewrites ONNX Runtime's fused "
                          "Attention nodes")


def export_onnx(converted: fx.GraphModule, path: str | os.PathLike, *, target: str | None = None,
                opset: int | None = None, dynamic_batch: bool = True, dynamic_sizes: bool = True,
                optimize: bool = False,
                fallback: str = "fp32", fp32_ops: Iterable[str] | None = None, example_inputs: Any = None,
                assume_right_padding: bool = False, fp8_gemm: str = "qdq") -> ExportReport:
    """Export a converted model to ONNX with its precision decisions, made to run on `target`.

    Args:
        converted: the GraphModule returned by `rewriter.convert`.
        path: where to write the .onnx file (weights over 2 GB go to `<path>.data` beside it).
        target: the ONNX Runtime execution provider the file is for: "ort-cpu", "ort-cuda" or
            "tensorrt". Ops its kernels cannot run in the converted 16-bit dtype (passes/op_tables.py:
            the CPU EP has no bfloat16 Conv/Gemm/MatMul, no EP has a float16 TopK...) are computed in fp32,
            the reason on node.meta[TARGET] and in `report.fallbacks`. Default: "ort-cuda" when the
            converted model is on CUDA, else "ort-cpu" (`default_target`).
        opset: ONNX opset; default 18, 21 with FP8 GEMMs, 22 when the model holds bfloat16 tensors.
        dynamic_batch: dimension 0 of every input is symbolic ("batch") when the model allows it. The
            other dimensions convert kept dynamic (sequence length, image size) stay symbolic too, with
            optimize=True as well (the fusions match a symbolic sequence length). Only when an attention
            op fuses at the example's sizes and not at symbolic ones are those sizes fixed, which
            `report.notes` says (`report.symbolic_sizes` lists what stayed symbolic).
        dynamic_sizes: False fixes every dimension but the batch at the example's size (for a runtime
            that wants static shapes, or to compare).
        optimize: apply ONNX Runtime fusions where they keep the precision decisions (fusion.py).
        fallback: "fp32" computes the nodes above in fp32 with Casts around them; "error" refuses the
            first with a BackendError naming it and the target that has the kernel.
        fp32_ops: extra ONNX op types to compute in fp32.
        example_inputs: inputs to trace with when the model does not carry the ones it was converted with.
        assume_right_padding: with optimize=True, attention reads ONNX Runtime's 1-D mask_index (valid
            length per row) instead of the exact key padding mask: correct only for right-padded rows
            (padding.py). Off by default.
        fp8_gemm: how FP8 GEMMs (precision="fp8") are written: "qdq" (QuantizeLinear/DequantizeLinear in
            float8e4m3fn around a Gemm, every EP; for "ort-cuda" the DequantizeLinear outputs and the Gemm
            are float16 when the scales allow, `report.notes` says which) or "com.microsoft"
            (com.microsoft.GemmFloat8, cuBLASLt's FP8 GEMM: CUDA EP on sm_89+, per-tensor scales). ONNX
            Runtime runs no FP8 GEMM for "qdq" (no fusion of float8 Q/DQ + Gemm): on the CUDA EP it is
            the 16-bit GEMM plus the Q/DQ passes. See fp8.py.

    Returns:
        ExportReport: target, inputs/outputs, ops per dtype, Cast counts, fallbacks, FP8 GEMMs, fusions.

    Raises:
        InputError: `converted` is not a converted model, or no example inputs are known.
        ConfigError: an invalid option.
        BackendError: an op has no ONNX export; a node has no 16-bit kernel on `target` with
            fallback="error"; fp8_gemm="com.microsoft" for the CPU EP or with per-channel scales.

    Example:
        >>> report = rewriter.export_onnx(fast, "bert-fp16.onnx", target="ort-cuda", optimize=True)
        >>> report.cast_chains
        0
    """
    check_converted(converted)
    target, target_why = (target, "asked for") if target is not None else default_target(converted)
    _check_options(fallback, target, fp8_gemm, converted, assume_right_padding, optimize)
    fp8 = fp8_nodes(converted)
    opset = _opset(opset, converted, bool(fp8))
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"cannot write {path!r}: the folder {parent!r} does not exist")
    OrtKernels(target)(converted)  # node.meta[TARGET]: annotations only

    args, kwargs = example_inputs_of(converted, example_inputs)
    notes: list[str] = []
    captured_dynamic = converted.meta.get(meta.INFO, {}).get("dynamic_batch", True)
    if dynamic_batch and not captured_dynamic:
        notes.append("the converted model has a static batch dimension (see its capture notes): "
                     "exported with the example batch size")
    header = dict(path=path, opset=opset, precision=precision_of(converted), target=f"{target} ({target_why})")
    compute = "float32"
    if fp8:
        compute, why = qdq_compute(converted, target)
        notes.append(f"FP8 GEMMs quantize from {compute}: {why}")
        if target == "ort-cuda":
            notes.append(ORT_CUDA_SPEED)
    options = dict(batch=dynamic_batch and captured_dynamic, opset=opset, fp8=fp8, fp8_gemm=fp8_gemm, compute=compute,
                   fp32_ops=frozenset(fp32_ops or ()), fallback=fallback, optimize=optimize,
                   assume_right_padding=assume_right_padding)
    model, report = _build(converted, args, kwargs, header, list(notes), sizes=dynamic_sizes, **options)
    missing = unfused_attention(converted, report.fusions) if optimize else 0
    if missing and report.symbolic_sizes:
        # an attention the fusions matched at fixed sizes only: the file is then for the example's sizes
        fixed_model, fixed = _build(converted, args, kwargs, header, list(notes), sizes=False, **options)
        fixed_missing = unfused_attention(converted, fixed.fusions)
        if fixed_missing < missing:
            fixed.notes.append(
                f"optimize=True: the sizes other than the batch ({', '.join(report.symbolic_sizes)}) are fixed "
                f"at the example's: with them symbolic, ONNX Runtime's attention fusion left {missing} of the "
                f"model's attention ops unfused, with them fixed {fixed_missing}; export with optimize=False "
                "to keep them symbolic")
            model, report = fixed_model, fixed
        else:
            report.notes.append(f"optimize=True: {missing} attention op(s) stay unfused at symbolic and at "
                                "fixed sizes alike; the sizes stay symbolic")
    _warn(report, target)
    summarize(model, report)
    _save(model, path)
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as exc:
        raise BackendError(f"the exported model {path} fails onnx.checker ({str(exc).strip()[:300]}); this "
                           "is a bug in the ONNX backend, please report it with the model") from exc
    return report


def _build(converted, args, kwargs, header: dict, notes: list[str], *, sizes: bool, batch: bool, opset: int, fp8,
           fp8_gemm: str, compute: str, fp32_ops: frozenset, fallback: str, optimize: bool, assume_right_padding: bool):
    """(ONNX IR model, its report): torch.export with the batch symbolic when `batch` and the other
    dimensions convert found dynamic symbolic when `sizes`, translation, cleanup, target fallbacks and,
    with `optimize`, the fusions."""
    import onnx_ir.passes.common as ir_passes

    ep = reexport(converted, args, kwargs, batch, notes, dynamic_sizes=sizes)
    dynamic = batch_is_dynamic(ep)
    with quiet():
        n_out = len(ep.graph_signature.user_outputs)
    program = to_onnx(ep, converted, opset, output_names(converted, n_out),
                      translation_table(fp8_gemm, compute) if fp8 else None)
    model = program.model
    onnx_ep = getattr(program, "exported_program", None) or ep

    simplify(model)
    if type_gemm_float8(model):
        infer_types(model)  # what reads the GemmFloat8 outputs
    origin = origin_map(model, onnx_ep, converted)
    names = rename_nodes(model, origin)
    if dynamic:
        name_batch_dim(model)
    report = ExportReport(dynamic_batch=dynamic, notes=notes, symbolic_sizes=symbolic_sizes(model), **header)
    report.precision_mismatches = check_decisions(model, origin)
    report.fallbacks = fp32_fallbacks(model, origin, opset, fp32_ops, fallback, names)
    report.cast_rules = dict(fold_casts(model, fp8=bool(fp8)))
    report.casts_removed = sum(report.cast_rules.values())
    with quiet():
        ir_passes.RemoveUnusedNodesPass()(model)
    if fp8:
        report.fp8_gemms = {"count": len(fp8), "form": fp8_gemm}
    if optimize:
        feeds = feeds_of(model, args, kwargs, dynamic)
        model = fuse(model, converted, report, feeds)
        if assume_right_padding:
            report.fusion_notes.append(_right_padding(model, feeds))
    return model, report


def _warn(report: ExportReport, target: str) -> None:
    """One warning for the nodes computed in fp32 for the target, one per precision mismatch."""
    if report.fallbacks:
        shown = "; ".join(report.fallbacks[:3]) + (f"; and {len(report.fallbacks) - 3} more"
                                                   if len(report.fallbacks) > 3 else "")
        warnings.warn(f"{len(report.fallbacks)} ONNX node(s) computed in fp32 for target {target}: {shown}",
                      stacklevel=3)
    for message in report.precision_mismatches:
        warnings.warn(message, stacklevel=3)


def _right_padding(model, feeds: dict) -> str:
    """Apply padding.use_mask_index when the example masks are right-padded; the note for the report."""
    names = {v.name for v in model.graph.inputs}
    masks = {k: v for k, v in feeds.items() if k in names and getattr(v, "ndim", 0) == 2}
    done = use_mask_index(model) if all(is_right_padded(v) for v in masks.values()) else None
    if done is None:
        return ("assume_right_padding: not applied, an example attention mask is not right-padded "
                "(rows must be ones followed by zeros)")
    if not done:
        return "assume_right_padding: no attention reads a key padding mask of an input; nothing changed"
    return (f"assume_right_padding: attention reads the valid length of each row of {', '.join(done)} "
            "(mask_index) instead of the mask: correct only for right-padded rows")


def _save(model, path: str) -> None:
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if size > 1_800_000_000:
        ir.save(model, path, external_data=os.path.basename(path) + ".data")
    else:
        ir.save(model, path)
