"""ONNX Runtime, one GEMM form at a time: what each way of writing an FP8 GEMM costs per call on an EP.

A chain of --layers square GEMMs (rows x dim times dim x dim, BERT-large's 12288 x 1024 by default), each
layer written the way export_onnx writes an FP8 GEMM (backends/onnx/fp8.py), so per-call overheads
(host synchronization, allocations) add up as they do in a model:

    matmul-fp16   x(f16) -> MatMul(W f16)                                          what ours-fp16 runs
    qdq-fp32      x(f32) -> Q -> DQ(f32) -> Gemm(f32, DQ(W8, f32), transB)          fp8_gemm="qdq" before
    qdq-fp16      x(f32) -> Q -> DQ(f16) -> Gemm(f16, DQ(W8, f16), transB) -> Cast(f32)   "qdq", ort-cuda now
    gemmfloat8    x(f16) -> Cast(f32) -> Q -> GemmFloat8(., W8, transB, dtype=f16)  fp8_gemm="com.microsoft"

Each variant is one session (CUDA EP with IO binding on a GPU), timed round-robin like tools/bench_onnx.py
(median of --repeats blocks of --iters runs); "ms_per_gemm" = ms / layers. A variant the EP cannot run
(GemmFloat8 outside the CUDA EP) reads n/a with the reason.

    python -m tools.bench_ort_gemm --device cuda --out ort_gemm.json
    python -m tools.bench_ort_gemm --device cpu --rows 64 --dim 32 --layers 2   # smoke run
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from tools import harness

__all__ = ["main", "build_chain", "VARIANTS"]

VARIANTS = ("matmul-fp16", "qdq-fp32", "qdq-fp16", "gemmfloat8")
_F32, _F16, _F8 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.FLOAT8E4M3FN


def _fp8_weight(name: str, dim: int, seed: int) -> tuple[onnx.TensorProto, float]:
    """A random [dim, dim] float8e4m3fn weight (N x K) and its per-tensor scale."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=g) / dim ** 0.5
    scale = float(w.abs().max()) / 448.0
    w8 = (w / scale).to(torch.float8_e4m3fn)
    raw = w8.view(torch.uint8).numpy().tobytes()
    return helper.make_tensor(name, _F8, [dim, dim], raw, raw=True), scale


def _const(name: str, value, dtype: int) -> onnx.TensorProto:
    array = np.asarray(value, dtype=np.float16 if dtype == _F16 else np.float32)
    return helper.make_tensor(name, dtype, list(array.shape), array.flatten().tolist())


def build_chain(variant: str, rows: int, dim: int, layers: int) -> onnx.ModelProto:
    """The ONNX model of `layers` GEMMs of `variant` (module docstring) on a [rows, dim] input."""
    nodes, inits = [], []
    in_type = _F16 if variant in ("matmul-fp16", "gemmfloat8") else _F32
    x = "x"
    zero = helper.make_tensor("zero", _F8, [], [0.0])
    inits.append(zero)
    x_scale = 32.0 / 448.0  # activations of std ~1 (amax ~10 measured at dim 32): |x| <= 32 on the grid
    for i in range(layers):
        w8, w_scale = _fp8_weight(f"w{i}", dim, seed=i)
        if variant == "matmul-fp16":
            w = np.frombuffer(w8.raw_data, dtype=np.uint8)
            w16 = (torch.from_numpy(w.copy()).view(torch.float8_e4m3fn).float().reshape(dim, dim) * w_scale)
            w16 = w16.t().half().numpy()  # MatMul reads W^T (K x N)
            inits.append(helper.make_tensor(f"w{i}", _F16, [dim, dim], w16.flatten().tolist()))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
            x = f"y{i}"
            continue
        inits += [w8, _const(f"sx{i}", x_scale, _F32)]
        if variant == "gemmfloat8":
            inits.append(_const(f"sw{i}", w_scale, _F32))
            nodes += [helper.make_node("Cast", [x], [f"x{i}f"], to=_F32),
                      helper.make_node("QuantizeLinear", [f"x{i}f", f"sx{i}", "zero"], [f"q{i}"], saturate=1),
                      helper.make_node("GemmFloat8", [f"q{i}", f"w{i}", "", f"sx{i}", f"sw{i}"], [f"y{i}"],
                                       domain="com.microsoft", transA=0, transB=1, dtype=_F16)]
            x = f"y{i}"
            continue
        compute = _F16 if variant == "qdq-fp16" else _F32
        inits += [_const(f"sxd{i}", x_scale, compute), _const(f"sw{i}", w_scale, compute)]
        nodes += [helper.make_node("QuantizeLinear", [x, f"sx{i}", "zero"], [f"q{i}"], saturate=1),
                  helper.make_node("DequantizeLinear", [f"q{i}", f"sxd{i}"], [f"xd{i}"]),
                  helper.make_node("DequantizeLinear", [f"w{i}", f"sw{i}"], [f"wd{i}"]),
                  helper.make_node("Gemm", [f"xd{i}", f"wd{i}"], [f"g{i}"], transB=1)]
        if compute == _F16:
            nodes.append(helper.make_node("Cast", [f"g{i}"], [f"y{i}"], to=_F32))
        else:
            nodes[-1].output[0] = f"y{i}"
        x = f"y{i}"
    out_type = _F16 if variant in ("matmul-fp16", "gemmfloat8") else _F32
    graph = helper.make_graph(nodes, variant, [helper.make_tensor_value_info("x", in_type, [rows, dim])],
                              [helper.make_tensor_value_info(x, out_type, [rows, dim])], inits)
    opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid("com.microsoft", 1)]
                                              if variant == "gemmfloat8" else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10  # opset 21's; onnxruntime 1.31 reads IR <= 13
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_ort_gemm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--rows", type=int, default=12288, help="activation rows M (BERT-large b32 s384: 12288)")
    p.add_argument("--dim", type=int, default=1024, help="K = N of every GEMM")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - set(VARIANTS):
        p.error(f"unknown variants {sorted(set(variants) - set(VARIANTS))}; choose from {','.join(VARIANTS)}")
    from rewriter.backends.onnx import ort_session

    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(args.rows, args.dim, generator=g).numpy()
    rows, live = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            row = rows[variant] = {"ms": None, "ms_per_gemm": None, "note": ""}
            path = os.path.join(tmp, f"{variant}.onnx")
            onnx.save(build_chain(variant, args.rows, args.dim, args.layers), path)
            try:
                session = ort_session(path, device=args.device)
                x = x32.astype(np.float16) if variant in ("matmul-fp16", "gemmfloat8") else x32
                session.bind(x=x)
                for _ in range(max(1, args.warmup)):
                    session.run_bound()
                live.append((row, session))
            except Exception as exc:
                row["note"] = f"n/a: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
        harness.round_robin([(row, session.run_bound) for row, session in live], device="cpu",
                            iters=args.iters, repeats=args.repeats)
    for variant, row in rows.items():
        if row["ms"] is not None:
            row["ms_per_gemm"] = row["ms"] / args.layers
        ms = "n/a" if row["ms"] is None else f"{row['ms']:.3f} ms ({row['ms_per_gemm'] * 1000:.1f} us per GEMM)"
        print(f"{variant:12s} {ms}  {row['note']}")
    results = {"device": args.device, "rows": args.rows, "dim": args.dim, "layers": args.layers,
               "onnxruntime": harness.package_version("onnxruntime-gpu", "onnxruntime"), "variants": rows}
    if args.device == "cuda" and torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name()
    if args.out:
        harness.write_json(args.out, results, device=args.device, argv=argv, module="tools.bench_ort_gemm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
