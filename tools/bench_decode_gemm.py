"""Decode GEMMs (a few rows times every weight): bf16 against weight-only FP8, per kernel and compile choice, in GB/s.

A decode step multiplies the batch's rows (1-8) by every weight matrix, so its GEMMs are bound by the weight
bytes they read. `rewriter::fp8_weight_linear` (rewriter/runtime/fp8_weight_ops.py) stores the weights in
float8_e4m3fn; on CUDA it runs our Triton GEMV (rewriter/runtime/fp8_gemv.py), elsewhere its reference
(linear on the widened weight), which pays only if inductor fuses the widening into the kernel that reads
the weight. This tool times each GEMM alone and says which kernels ran, so that the end-to-end decode
figures of tools/bench_generate.py can be explained per GEMM.

    python -m tools.bench_decode_gemm --device cuda --rows 1,8 --out decode_gemm.json
    python -m tools.bench_decode_gemm --device cuda --rows 1,8 --sweep --out sweep.json   # GEMV configurations
    python -m tools.bench_decode_gemm --device cpu --small --rows 1 --iters 2 --rounds 1   # smoke run

Shapes (K, N): the GEMMs of a Llama 3.2 1B decode step: qkv (2048, 3072), o (2048, 2048), gate+up
(2048, 16384), down (8192, 2048) and the LM head (2048, 128256). Variants:
    bf16 eager           F.linear(x, w_bf16): cuBLAS
    bf16 compile         torch.compile(F.linear), mode max-autotune-no-cudagraphs (the decode graph's mode)
    fp8w triton          rewriter::fp8_weight_linear eagerly: on CUDA the Triton GEMV (one launch, or two with
                         split K); its "kernels" field says what the op routed to
    fp8w triton compile  the op compiled (max-autotune-no-cudagraphs): inductor launches the GEMV's kernels
    fp8w eager           the reference path eagerly: the widened weight is materialised on every call
    fp8w compile         the reference compiled, mode max-autotune-no-cudagraphs (what ran before the GEMV)
    fp8w compile cdt     the same with coordinate_descent_tuning (one-row GEMMs become a fused multiply-reduce)
    fp8w compile default the reference compiled with torch.compile's default mode
With --sweep, each shape also times the GEMV under a dozen launch configurations around the rule's choice
(rewriter/runtime/fp8_gemv.py: choose_config) and reports the fastest ("sweep" in the JSON rows).
Each variant is timed inside a CUDA graph of --iters calls (no launch overhead), cycling over enough copies
of the weight that the 50 MB L2 cache does not serve it; --rounds rounds round-robin, median per variant.
GB/s = the weight bytes the variant must read (2 per bf16 weight, 1 per FP8 weight) / time. "kernels"
summarises inductor's generated code: `extern mm` (cuBLAS on a materialised operand), `template` (a Triton
GEMM template), `reduction` (the multiply-reduce form) or `fp8_gemv` (our kernel), and the number of Triton
kernels.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import statistics
import sys
import time

import torch
import torch._dynamo
import torch.nn.functional as F

import rewriter  # noqa: F401  (registers rewriter::fp8_weight_linear)
from rewriter.runtime import fp8_gemv
from rewriter.runtime.fp8_weight_ops import fp8_weight_linear_op, fp8_weight_linear_reference

__all__ = ["SHAPES", "VARIANTS", "kernel_summary", "sweep_configs", "main"]

SHAPES = {"qkv": (2048, 3072), "o": (2048, 2048), "gate_up": (2048, 16384), "down": (8192, 2048),
          "lm_head": (2048, 128256)}
VARIANTS = ("bf16 eager", "bf16 compile", "fp8w triton", "fp8w triton compile", "fp8w eager", "fp8w compile",
            "fp8w compile cdt", "fp8w compile default")
_TUNED = {"max_autotune": True, "triton.cudagraphs": False, "coordinate_descent_tuning": True}


def kernel_summary(code: str) -> dict:
    """What inductor made of one GEMM, from its generated source."""
    return {"extern_mm": bool(re.search(r"extern_kernels\.(mm|addmm|bmm)", code)),
            "template": "triton_tem_" in code,
            "reduction": bool(re.search(r"triton_(red|per)_", code)),
            "fp8_gemv": "_fp8_gemv_kernel" in code,
            "triton_kernels": len(set(re.findall(r"def (triton_\w+)\(", code)))}


def _fn(variant: str, out_dtype: torch.dtype):
    if variant.startswith("bf16"):
        def gemm(x, w, scale):
            return F.linear(x, w)
    elif variant.startswith("fp8w triton"):  # the op: routes to the GEMV where it applies
        def gemm(x, w, scale):
            return fp8_weight_linear_op(x, w, scale, None, out_dtype)
    else:
        def gemm(x, w, scale):
            return fp8_weight_linear_reference(x, w, scale, None, out_dtype)
    if variant.endswith("eager") or variant == "fp8w triton":
        return gemm
    if variant.endswith("cdt"):
        return torch.compile(gemm, options=dict(_TUNED), dynamic=False, fullgraph=True)
    if variant.endswith("default"):
        return torch.compile(gemm, dynamic=False, fullgraph=True)
    return torch.compile(gemm, mode="max-autotune-no-cudagraphs", dynamic=False, fullgraph=True)


def _copies(k: int, n: int, bytes_per: int, device) -> int:
    """Copies of the weight that together exceed twice the L2 cache (50 MB on an H100/H200)."""
    return 1 if device.type != "cuda" else max(1, -(-100 * 2**20 // (k * n * bytes_per)))


def _bench_one(name: str, k: int, n: int, rows: int, ns, device) -> dict:
    torch.manual_seed(0)
    x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
    w16 = torch.randn(n, k, device=device, dtype=torch.bfloat16) / k ** 0.5
    scale = w16.abs().amax(dim=1).float().clamp_min(1e-12) / 448.0
    w8 = (w16.float() / scale[:, None]).to(torch.float8_e4m3fn)
    reference = F.linear(x.float(), w16.float())
    row = {"shape": name, "rows": rows, "k": k, "n": n, "variants": {}}
    lives = {}
    copies: dict[bool, list] = {}  # the weight copies of each dtype, shared by its variants
    for variant in ns.variants:
        fp8 = variant.startswith("fp8w")
        if fp8 not in copies:
            first = w8 if fp8 else w16
            copies[fp8] = [first] + [first.clone() for _ in range(_copies(k, n, 1 if fp8 else 2, device) - 1)]
        weights = copies[fp8]
        fn = _fn(variant, torch.bfloat16)
        entry = {"weight_bytes": k * n * (1 if fp8 else 2)}
        try:
            fp8_gemv.reset_routing_counts()
            if not (variant.endswith("eager") or variant == "fp8w triton"):
                from torch._inductor.utils import run_and_get_code

                out, codes = run_and_get_code(fn, x, weights[0], scale)
                entry["kernels"] = kernel_summary("\n".join(codes))
            else:
                out = fn(x, weights[0], scale)
            if variant.startswith("fp8w triton"):  # what rewriter::fp8_weight_linear chose (eager call or trace)
                entry["route"] = sorted(fp8_gemv.routing_counts())
            entry["rel_err"] = float((out.float() - reference).norm() / reference.norm().clamp_min(1e-30))
            lives[variant] = (fn, weights)
        except Exception as exc:  # a variant that cannot compile is a row with its reason
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        row["variants"][variant] = entry
    if ns.sweep and fp8_gemv.gemv_available() and device.type == "cuda":
        row["sms"] = fp8_gemv._sms(device)
        for config in sweep_configs(rows, n, k, row["sms"]):
            launch = functools.partial(_gemv_with, config=config)
            lives[f"sweep {_config_name(config)}"] = (launch, copies.get(True) or [w8])
    graphs = {}
    for v, (fn, weights) in lives.items():
        try:
            graphs[v] = _graph(fn, weights, x, scale, ns.iters, device)
        except Exception as exc:  # a sweep configuration that does not compile (shared memory): its reason
            if not v.startswith("sweep "):
                raise
            row.setdefault("sweep", {})[v[6:]] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    times = {v: [] for v in graphs}
    for _ in range(ns.rounds):
        for v, run in graphs.items():
            times[v].append(_time(run, device) / ns.iters)
    base = statistics.median(times["bf16 eager"]) if times.get("bf16 eager") else None
    for v, samples in times.items():
        us = statistics.median(samples) * 1e6
        if v.startswith("sweep "):
            row.setdefault("sweep", {})[v[6:]] = {"us": round(us, 2), "gb_s": round(k * n / us / 1e3, 1)}
            continue
        entry = row["variants"][v]
        entry.update(us=round(us, 2), gb_s=round(entry["weight_bytes"] / us / 1e3, 1))
        if base:
            entry["x_bf16_eager"] = round(base * 1e6 / us, 3)
    return row


def sweep_configs(rows: int, n: int, k: int, sms: int) -> list:
    """The rule's GEMV configuration and its neighbours: tile width, K step, split, warps, stages, form."""
    base = fp8_gemv.choose_config(rows, n, k, sms)
    swap = dataclasses.replace
    steps = -(-k // base.block_k)
    out = [base, swap(base, block_n=base.block_n // 2), swap(base, block_n=base.block_n * 2),
           swap(base, block_k=base.block_k // 2), swap(base, block_k=base.block_k * 2),
           swap(base, num_warps=8), swap(base, num_warps=2), swap(base, num_stages=1 if base.use_dot else 3)]
    if not base.use_dot:  # the tensor-core form for 1-2 rows
        out.append(swap(base, use_dot=True, block_n=16, block_k=min(512, base.block_k), num_stages=3))
    elif rows <= 4:  # the CUDA-core form for 3-4 rows (its partial sums grow with the rows: a smaller tile)
        out.append(swap(base, use_dot=False, block_n=8, block_k=256, num_stages=2))
    if base.split_k > 1:  # fewer programs, no second kernel (deeper pipelining keeps the bytes in flight)
        out.append(swap(base, split_k=base.split_k // 2))
        out.append(swap(base, split_k=1, num_stages=4))
    if base.split_k * 2 <= steps:
        out.append(swap(base, split_k=base.split_k * 2))
    unique = []
    for c in out:
        if c.block_n >= 1 and c.block_k >= 16 and (not c.use_dot or c.block_n >= 16) and c not in unique:
            unique.append(c)
    return unique


def _config_name(c) -> str:
    return (f"n{c.block_n} k{c.block_k} s{c.split_k} w{c.num_warps} st{c.num_stages} "
            f"{'dot' if c.use_dot else 'fma'}")


def _gemv_with(x, w, scale, config):
    return fp8_gemv._launch(x, w, scale, None, torch.bfloat16, config=config)


def _graph(fn, weights, x, scale, iters: int, device):
    """A callable running `iters` calls cycling over the weight copies: one CUDA graph replay on CUDA."""
    def calls():
        for i in range(iters):
            fn(x, weights[i % len(weights)], scale)

    if device.type != "cuda":
        return calls
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        calls()  # warm-up on a side stream, as capture wants
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        calls()
    return graph.replay


def _time(run, device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    run()
    return time.perf_counter() - t


def _print(rows: list[dict]) -> None:
    print(f"{'shape':8s} {'rows':>4s} {'variant':22s} {'us':>9s} {'GB/s':>7s} {'x bf16':>7s}  kernels")
    for row in rows:
        for v, e in row["variants"].items():
            if "error" in e:
                print(f"{row['shape']:8s} {row['rows']:4d} {v:22s} failed: {e['error'][:80]}")
                continue
            k = e.get("kernels") or {}
            kinds = ",".join(name for name in ("extern_mm", "template", "reduction", "fp8_gemv") if k.get(name))
            if "route" in e:
                kinds = (kinds + " " if kinds else "") + "route: " + "; ".join(e["route"])[:60]
            print(f"{row['shape']:8s} {row['rows']:4d} {v:22s} {e.get('us', float('nan')):9.2f} "
                  f"{e.get('gb_s', float('nan')):7.1f} {e.get('x_bf16_eager', float('nan')):7.3f}  "
                  f"{kinds}{' ' + str(k.get('triton_kernels')) + ' triton' if k else ''}")
        timed = {name: r for name, r in (row.get("sweep") or {}).items() if "us" in r}
        if timed:
            ranked = sorted(timed.items(), key=lambda item: item[1]["us"])
            rule = _config_name(fp8_gemv.choose_config(row["rows"], row["n"], row["k"], row.get("sms", 132)))
            rule = rule if rule in timed else ranked[0][0]
            print(f"{'':13s} GEMV sweep: rule [{rule}] {timed[rule]['us']:.2f} us; fastest: " +
                  ", ".join(f"[{name}] {r['us']:.2f} us {r['gb_s']:.0f} GB/s" for name, r in ranked[:3]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_decode_gemm", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", default="1,8", help="activation rows (the decode batch), comma-separated")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--iters", type=int, default=50, help="calls per timed block (one CUDA graph)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--small", action="store_true", help="K and N divided by 32 (CPU smoke run)")
    p.add_argument("--sweep", action="store_true",
                   help="also time the Triton GEMV under the configurations around its rule's choice (CUDA)")
    p.add_argument("--out", default=None)
    ns = p.parse_args(argv)
    ns.variants = [v for v in ns.variants.split(",") if v]
    unknown = [v for v in ns.variants if v not in VARIANTS] + [s for s in ns.shapes.split(",") if s not in SHAPES]
    if unknown:
        p.error(f"unknown {unknown}; variants: {', '.join(VARIANTS)}; shapes: {', '.join(SHAPES)}")
    device = torch.device(ns.device)
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    rows = []
    for name in ns.shapes.split(","):
        k, n = SHAPES[name]
        if ns.small:
            k, n = max(16, k // 32), max(16, n // 32)
        for r in (int(v) for v in ns.rows.split(",")):
            rows.append(_bench_one(name, k, n, r, ns, device))
            print(f"[bench_decode_gemm] {name} rows={r} done", file=sys.stderr, flush=True)
    _print(rows)
    if ns.out:
        record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "torch": torch.__version__, "command": " ".join(["python -m tools.bench_decode_gemm",
                                                                   *(argv if argv is not None else sys.argv[1:])]),
                  "rows": rows}
        with open(ns.out, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
