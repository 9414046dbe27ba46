"""FP8 vs BF16 per GEMM shape, measured next to the cost model (passes/plan/fp8_cost.py), to fit it.

Run on the H100 (one process, one GPU; about 5-8 minutes, mostly torch.compile of 8 small modules per
shape; the JSON is rewritten after every shape, so a run cut short keeps what it measured):

    python -m tools.bench_gemm_fp8 --device cuda --out gemm_fp8_h100.json

or in two halves when one command may not take 10 minutes:

    python -m tools.bench_gemm_fp8 --device cuda --models bert_large,gpt2_medium --out gemm_fp8_h100_a.json
    python -m tools.bench_gemm_fp8 --device cuda --models bert_base,llama_mlp --out gemm_fp8_h100_b.json

CPU smoke run (no FP8 tensor cores: the FP8 variants run the project's emulation and their speed-ups
are n/a; --no-compile skips the torch.compile variants):

    python -m tools.bench_gemm_fp8 --device cpu --small --no-compile

Shapes (M, K, N; x [M, K] @ w[N, K].T): the GEMMs of BERT-large b32 s384 (M=12288), GPT-2 medium b8
s1024 (M=8192), BERT-base b32 s128 (M=4096) and a Llama MLP with hidden 4096 (M=8192); `--shapes
"M,K,N;M,K,N"` times others instead. `--small` divides the default shapes (M by 256, K and N by 32, rounded up to multiples of 16).

Variants per shape (all built and warmed up first, then timed round-robin: --rounds rounds of one block
of --iters calls of each variant in turn, median per variant; CUDA events around each block):
    bf16                       F.linear(x_bf16, w_bf16)                                       (eager)
    fp8_gemm                   torch._scaled_mm(x_fp8, w_fp8.t(), per-tensor scales, bf16 out) on an
                               activation quantized beforehand: the GEMM alone
    fp8_eager_dynamic          rewriter::fp8_linear (rewriter/runtime/fp8_ops.py), dynamic scale: amax,
                               scale, quantize, _scaled_mm on every call, as a converted model runs eagerly
    fp8_eager_static           the same op with a fixed (calibrated) activation scale: clamp, quantize, GEMM
    compiled_<p>_only          torch.compile(producer) alone, p = layernorm | gelu, on a bf16 [M, K] tensor
    compiled_<p>_bf16          torch.compile(producer -> F.linear bf16)
    compiled_<p>_fp8_dynamic   torch.compile(producer -> rewriter::fp8_linear, dynamic scale): inductor
                               fuses the quantization into the producer, as end to end
    compiled_<p>_fp8_static    the same with the activation scale a 0-dim buffer (a tensor constant, as
                               the FP8 rewrite stores calibrated scales)
On CUDA every variant is timed twice: as launched from Python ("stream") and replayed from a CUDA graph
of --iters calls ("graph", no host overhead: the GPU time a GPU-bound model sees). "ms" is the graph
time (the stream time where capture failed); both are in the JSON. --inputs distinct activations are
cycled (default 4) so that x is not served from the 50 MB L2 cache call after call.

Per shape the table gives ms, TFLOP/s, speed-ups vs bf16 (eager variants) and vs the compiled bf16
module with the same producer (whole module, and "net": producer-only time subtracted from both, i.e.
GEMM + whatever quantization the fusion leaves, which is what the cost model estimates), the relative
error vs an fp32 reference, and the cost model's `estimate_speedup` and decision (rule) for each
scaling mode: eager dynamic, eager static, compiled (fused) dynamic, compiled (fused) static. The
decision comes from running the real Fp8Cost pass on a one-GEMM graph for --target (default: this GPU;
on CPU sm_90). "fit" holds what the constants are made of: measured bf16 / fp8 TFLOP/s (BF16_FLOPS,
FP8_FLOPS), the GEMM-only speed-up next to its roofline, the quantization overhead in us and in bytes
per activation element at HBM_BYTES_PER_S (the cost model: 5 eager dynamic, 7 eager static, 3 fused
dynamic, 1 fused static), and measured / roofline per mode (FP8_ROOFLINE_EFFICIENCY).
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
import time
import traceback
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from tools import harness

__all__ = ["main", "DEFAULT_SHAPES", "EAGER_VARIANTS", "PRODUCERS", "MODES", "variant_names", "shape_list"]

# (model, M, [(K, N, role), ...]) for the models whose end-to-end FP8 speed-up we want to explain
DEFAULT_SHAPES = (
    ("bert_large", 32 * 384, ((1024, 1024, "q/k/v, attn out"), (1024, 4096, "ffn up"),
                              (4096, 1024, "ffn down"))),
    ("gpt2_medium", 8 * 1024, ((1024, 3072, "c_attn (qkv)"), (1024, 1024, "attn c_proj"),
                               (1024, 4096, "mlp c_fc"), (4096, 1024, "mlp c_proj"))),
    ("bert_base", 32 * 128, ((768, 768, "q/k/v, attn out"), (768, 3072, "ffn up"), (3072, 768, "ffn down"))),
    ("llama_mlp", 8 * 1024, ((4096, 14336, "gate/up"), (14336, 4096, "down"))),
)
EAGER_VARIANTS = ("bf16", "fp8_gemm", "fp8_eager_dynamic", "fp8_eager_static")
PRODUCERS = ("layernorm", "gelu")
COMPILED_KINDS = ("only", "bf16", "fp8_dynamic", "fp8_static")
# cost-model scaling modes: name -> (static, fused)
MODES = {"eager_dynamic": (False, False), "eager_static": (True, False),
         "compiled_dynamic": (False, True), "compiled_static": (True, True)}


def variant_names(producers=PRODUCERS) -> list[str]:
    """Every variant a shape reports (each has "ms" or an "na" reason)."""
    return list(EAGER_VARIANTS) + [f"compiled_{p}_{kind}" for p in producers for kind in COMPILED_KINDS]


def _small_dim(size: int) -> int:
    """K or N of a --small shape: size / 32 rounded up to a multiple of 16 (what _scaled_mm needs)."""
    return max(16, -(-(size // 32) // 16) * 16)


def shape_list(spec: str | None, models: str | None, small: bool) -> list[dict]:
    """[{"label", "models", "m", "k", "n"}] without duplicates (M, K, N)."""
    out: dict[tuple, dict] = {}
    if spec:
        for part in spec.replace(" ", "").split(";"):
            if not part:
                continue
            try:
                m, k, n = (int(v) for v in part.split(","))
            except ValueError:
                raise SystemExit(f"--shapes {spec!r}: write M,K,N triples separated by ';', e.g. "
                                 "'8192,1024,4096;8192,4096,1024'") from None
            if min(m, k, n) <= 0:
                raise SystemExit(f"--shapes: {part} has a non-positive size")
            out.setdefault((m, k, n), {"label": f"custom {m}x{k}x{n}", "models": ["custom"], "m": m, "k": k, "n": n})
        return list(out.values())
    names = [n.strip() for n in (models or "").split(",") if n.strip()] or [d[0] for d in DEFAULT_SHAPES]
    known = {d[0]: d for d in DEFAULT_SHAPES}
    for name in names:
        if name not in known:
            raise SystemExit(f"--models: unknown model {name!r}; choose from {', '.join(known)}")
        _, m, gemms = known[name]
        for k, n, role in gemms:
            mm, kk, nn_ = (max(16, m // 256), _small_dim(k), _small_dim(n)) if small else (m, k, n)
            entry = out.setdefault((mm, kk, nn_), {"label": f"{name} {role}", "models": [], "m": mm, "k": kk, "n": nn_})
            entry["models"].append(name)
    return list(out.values())


# ---------------------------------------------------------------- torch._scaled_mm across versions


def _scaled_mm_caller(device: torch.device):
    """(call(a, b, scale_a, scale_b, bias, out_dtype, fast_accum) -> Tensor, description) for this
    torch: keyword or positional scales, 0-dim or [1] scales, a tuple result (torch < 2.4) unpacked.
    Raises RuntimeError with every attempt's error when none works."""
    def kw(a, b, sa, sb, bias, out_dtype, fast):
        return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, bias=bias, out_dtype=out_dtype, use_fast_accum=fast)

    def pos(a, b, sa, sb, bias, out_dtype, fast):  # (mat1, mat2, scale_a, scale_b, bias, scale_result, out_dtype, fast)
        return torch._scaled_mm(a, b, sa, sb, bias, None, out_dtype, fast)

    a = torch.randn(32, 32, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(32, 32, device=device).to(torch.float8_e4m3fn).t()
    errors = []
    for name, fn in (("keyword scales", kw), ("positional scales", pos)):
        for shape_name, shape in (("0-dim", ()), ("[1]", (1,))):
            def call(x, w, sa, sb, bias, out_dtype, fast, _fn=fn, _shape=shape):
                out = _fn(x, w, sa.reshape(_shape), sb.reshape(_shape), bias, out_dtype, fast)
                return out[0] if isinstance(out, tuple) else out
            try:
                one = torch.ones((), device=device)
                y = call(a, b, one, one, None, torch.bfloat16, True)
                if y.dtype != torch.bfloat16 or tuple(y.shape) != (32, 32):
                    raise RuntimeError(f"returned {y.dtype} {tuple(y.shape)}")
                return call, f"torch._scaled_mm, {name}, {shape_name} fp32 scales, out_dtype=bf16"
            except (RuntimeError, TypeError) as exc:
                errors.append(f"{name}/{shape_name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    raise RuntimeError("torch._scaled_mm refused every calling convention tried: " + "; ".join(errors))


def _emulated_gemm():
    """The project's emulation of an FP8 GEMM (dequantize, fp32 matmul), or the equivalent."""
    from rewriter.runtime import fp8_ops

    fn = getattr(fp8_ops, "_emulated_mm", None)
    if fn is not None:
        return fn

    def emulated(q, s_x, w_fp8, w_scale, bias, out_dtype):
        y = (q.float() * s_x) @ (w_fp8.float() * w_scale).t()
        return (y if bias is None else y + bias.float()).to(out_dtype)
    return emulated


# ---------------------------------------------------------------- the compiled modules


class ProducerGemm(nn.Module):
    """producer(x) -> GEMM: the producer is LayerNorm over K or GELU; the GEMM is none (producer only),
    bf16 F.linear, or rewriter::fp8_linear with a dynamic or a static (0-dim buffer) activation scale."""

    def __init__(self, producer: str, gemm: str, k: int, w16, w8, w_scale, bias, x_scale, fast_accum: bool):
        super().__init__()
        self.producer, self.gemm, self.k, self.fast_accum = producer, gemm, k, fast_accum
        if producer == "layernorm":
            g = torch.Generator().manual_seed(1)
            self.register_buffer("ln_w", (1 + 0.1 * torch.randn(k, generator=g)).to(w16.device, torch.bfloat16))
            self.register_buffer("ln_b", (0.1 * torch.randn(k, generator=g)).to(w16.device, torch.bfloat16))
        if gemm == "bf16":
            self.register_buffer("w16", w16)
        elif gemm.startswith("fp8"):
            self.register_buffer("w8", w8)
            self.register_buffer("w_scale", w_scale)
            if gemm == "fp8_static":
                self.register_buffer("x_scale", x_scale)
        self.register_buffer("bias", bias)

    def forward(self, x):
        if self.producer == "layernorm":
            h = F.layer_norm(x, (self.k,), self.ln_w, self.ln_b, 1e-5)
        else:
            h = F.gelu(x)
        if self.gemm == "only":
            return h
        if self.gemm == "bf16":
            return F.linear(h, self.w16, self.bias)
        from rewriter.runtime.fp8_ops import fp8_linear_op

        x_scale = self.x_scale if self.gemm == "fp8_static" else None
        return fp8_linear_op(h, self.w8, self.w_scale, self.bias, x_scale, torch.bfloat16, self.fast_accum)

    def reference(self, x):
        """fp32 result of the same math (the error reference)."""
        xf = x.float()
        if self.producer == "layernorm":
            h = F.layer_norm(xf, (self.k,), self.ln_w.float(), self.ln_b.float(), 1e-5)
        else:
            h = F.gelu(xf)
        return h


def _configure_dynamo() -> None:
    """Every shape compiles 8 modules of one class: raise the recompile limit (8 by default, after which
    dynamo silently runs eagerly) and fail instead of falling back when it is hit anyway."""
    from torch import _dynamo

    cfg = _dynamo.config
    for name, value in (("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 4096),
                        ("accumulated_cache_size_limit", 4096), ("fail_on_recompile_limit_hit", True),
                        ("fail_on_cache_limit_hit", True)):
        try:
            if hasattr(cfg, name):
                current = getattr(cfg, name)
                setattr(cfg, name, value if isinstance(value, bool) else max(int(current), value))
        except Exception:  # noqa: BLE001 - an option this torch does not have
            pass


# ---------------------------------------------------------------- timing


class _Live:
    """One built variant: fn(i) runs a call on input i; graph replays `iters` calls."""

    def __init__(self, name: str, fn, row: dict):
        self.name, self.fn, self.row = name, fn, row
        self.graph = None


def _capture(fn, iters: int, n_inputs: int):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for j in range(3):
            fn(j % n_inputs)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(iters):
            fn(j % n_inputs)
    torch.cuda.synchronize()
    return graph


def _stream(live: _Live, iters: int, n_inputs: int):
    """`iters` calls of the variant launched from Python, one after the other (outputs not kept)."""
    def run() -> None:
        for j in range(iters):
            live.fn(j % n_inputs)
    return run


def _time_round_robin(lives: list[_Live], device, ns) -> None:
    """Round-robin timing (tools.harness): each round times one block of --iters calls of every variant
    in every mode (one CUDA graph replay of them, then launched from Python) in turn; the medians per
    variant and mode go to row["ms_graph"] / row["ms_stream"], ms per call."""
    modes = ["graph", "stream"] if device.type == "cuda" and ns.cuda_graph else ["stream"]
    entries = [({"variant": live.name}, live, mode) for live in lives for mode in modes
               if mode == "stream" or live.graph is not None]
    calls = [(sub, live.graph.replay if mode == "graph" else _stream(live, ns.iters, ns.inputs))
             for sub, live, mode in entries]
    harness.round_robin(calls, device=device, iters=1, repeats=ns.rounds)  # one call = one block
    for sub, live, mode in entries:
        live.row[f"ms_{mode}"] = sub["ms"] / ns.iters
        live.row[f"samples_ms_{mode}"] = [round(s / ns.iters, 5) for s in sub["samples_ms"]]
    for live in lives:
        row = live.row
        row["ms"] = row.get("ms_graph", row.get("ms_stream"))
        row["timing"] = "cuda graph" if "ms_graph" in row else ("stream" if device.type == "cuda" else "cpu wall")


# ---------------------------------------------------------------- the cost model


def _pass_decision(m: int, k: int, n: int, static: bool, fused: bool, target) -> dict:
    """node.meta[FP8] that the real Fp8Cost pass writes for linear(x[M, K], w[N, K]) in bf16."""
    import torch.fx as fx

    from rewriter.passes.plan.fp8_cost import Fp8Cost, Fp8Options
    from rewriter import meta
    from rewriter.config import ConvertConfig

    root = nn.Module()
    root.register_buffer("weight", torch.empty(n, k, device="meta"))
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(m, k, device="meta", dtype=torch.bfloat16)
    w = graph.get_attr("weight")
    w.meta["val"] = torch.empty(n, k, device="meta", dtype=torch.bfloat16)
    y = graph.call_function(torch.ops.aten.linear.default, (x, w))
    y.meta["val"] = torch.empty(m, n, device="meta", dtype=torch.bfloat16)
    graph.output(y)
    gm = fx.GraphModule(root, graph)
    meta.put(y, meta.OP_CLASS, {"class": "lowp", "op": "linear"})
    meta.put(y, meta.DECISION, {"dtype": "bfloat16", "rule": "bench", "reason": "bench_gemm_fp8"})
    if static:
        meta.put(x, meta.RANGE, {"amax": 4.0, "nonfinite": 0})
    Fp8Cost(ConvertConfig(precision="fp8"), Fp8Options(fused_quantization=fused, target=target)).call(gm)
    return dict(meta.get(y, meta.FP8))


def predictions(m: int, k: int, n: int, target) -> dict:
    """Per scaling mode: estimate_speedup (with its roofline and times) and the pass's decision."""
    from rewriter.passes.plan import fp8_cost

    out = {}
    for mode, (static, fused) in MODES.items():
        est, detail = fp8_cost.estimate_speedup(fp8_cost.GemmShape(m, n, k), static=static, fused=fused)
        rec = {"estimate": round(est, 4), **detail, "static": static, "fused": fused}
        try:
            record = _pass_decision(m, k, n, static, fused, target)
            rec.update({"use_fp8": bool(record["use"]), "rule": record["rule"], "reason": record["reason"],
                        "decided_by": "Fp8Cost pass"})
        except Exception as exc:  # noqa: BLE001 - the pass changed: fall back to its documented rules
            rule = ("dims" if k % fp8_cost.FP8_DIM_MULTIPLE or n % fp8_cost.FP8_DIM_MULTIPLE else
                    "size" if m * n * k < fp8_cost.FP8_MIN_MNK or m < fp8_cost.FP8_MIN_ROWS else
                    "cost" if est < fp8_cost.FP8_MIN_SPEEDUP else "fp8")
            rec.update({"use_fp8": rule == "fp8", "rule": rule, "reason": f"bench replica of the rules ({rule})",
                        "decided_by": f"replica (Fp8Cost failed: {type(exc).__name__}: {exc})"})
        out[mode] = rec
    return out


def cost_model_constants() -> dict:
    from rewriter.passes.plan import fp8_cost

    names = ("FP8_ROOFLINE_EFFICIENCY", "FP8_MIN_SPEEDUP", "FP8_MIN_MNK", "FP8_MIN_ROWS", "BF16_FLOPS", "FP8_FLOPS",
             "HBM_BYTES_PER_S", "KERNEL_LAUNCH_S", "_QUANT_KERNELS")
    out = {}
    for name in names:
        value = getattr(fp8_cost, name, None)
        out[name] = {"/".join(k): list(v) for k, v in value.items()} if isinstance(value, dict) else value
    return out


# ---------------------------------------------------------------- one shape


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _bench_shape(shape: dict, ns, device: torch.device, caller, emulated: str | None) -> dict:
    from rewriter.runtime import fp8_ops
    from rewriter.runtime.fp8_ops import (E4M3_MAX, activation_scale, fp8_linear_op, quantize_activation,
                                        quantize_weight)

    m, k, n = shape["m"], shape["k"], shape["n"]
    result = {**shape, "gflop": 2.0 * m * n * k / 1e9, "variants": {}}
    rows: dict[str, dict] = {name: {} for name in variant_names(ns.producers)}
    result["variants"] = rows
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(m, k, generator=g).to(device, torch.bfloat16) for _ in range(ns.inputs)]
    w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(device)
    w16 = w.to(torch.bfloat16)
    bias = (0.1 * torch.randn(n, generator=g)).to(device, torch.bfloat16) if ns.bias else None
    w8, w_scale = quantize_weight(w, per_channel=False)
    # static scale as the FP8 rewrite stores it: dequantization scale amax * margin / 448, margin 2
    x_static = (torch.stack([x.float().abs().amax() for x in xs]).amax() * 2.0 / E4M3_MAX).to(torch.float32)
    # the activation quantized beforehand for the GEMM-only variant
    pre = []
    for x in xs:
        s = activation_scale(x, per_row=False)
        pre.append((quantize_activation(x, s, saturate=False), s))
    w8t = w8.t()  # [K, N] column-major: the layout _scaled_mm wants for mat2
    emu = _emulated_gemm()
    b32 = None if bias is None else bias.float()

    def ref_linear():  # fp32 references are made one at a time, when checked (Llama's is 470 MB)
        return F.linear(xs[0].float(), w16.float(), b32)

    def gemm_only(i):
        q, s = pre[i]
        if emulated:
            return emu(q, s, w8, w_scale, bias, torch.bfloat16)
        return caller(q, w8t, s, w_scale, bias, torch.bfloat16, ns.fast_accum)

    fns = {
        "bf16": lambda i: F.linear(xs[i], w16, bias),
        "fp8_gemm": gemm_only,
        "fp8_eager_dynamic": lambda i: fp8_linear_op(xs[i], w8, w_scale, bias, None, torch.bfloat16, ns.fast_accum),
        "fp8_eager_static": lambda i: fp8_linear_op(xs[i], w8, w_scale, bias, x_static, torch.bfloat16,
                                                    ns.fast_accum),
    }
    refs = {name: ref_linear for name in fns}
    if ns.compile_on:
        from torch import _dynamo

        _dynamo.reset()  # a fresh recompile budget per shape
    for p in ns.producers:
        for kind in COMPILED_KINDS:
            name = f"compiled_{p}_{kind}"
            if not ns.compile_on:
                rows[name]["na"] = "n/a: --no-compile"
                continue
            module = ProducerGemm(p, kind, k, w16, w8, w_scale, bias, None, ns.fast_accum).to(device).eval()
            if kind == "fp8_static":  # calibrated on what the GEMM reads: the producer's output
                amax = torch.stack([module.reference(x).abs().amax() for x in xs]).amax()
                module.x_scale = (amax * 2.0 / E4M3_MAX).to(torch.float32)
            refs[name] = (lambda mod=module: mod.reference(xs[0])) if kind == "only" else \
                (lambda mod=module: F.linear(mod.reference(xs[0]), w16.float(), b32))
            fns[name] = _compiled(module, ns, rows[name], xs)
    lives = []
    failed_before = dict(getattr(fp8_ops, "_SCALED_MM_FAILED", {}))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in fns.items():
            row = rows[name]
            if "na" in row:
                continue
            try:
                t0 = time.perf_counter()
                out = fn(0)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if name.startswith("compiled_"):
                    row["first_call_s"] = round(time.perf_counter() - t0, 2)  # includes the compilation
                row["rel_err"] = harness.rel_l2(refs[name](), out)
                row["finite"] = bool(torch.isfinite(out.float()).all())
                del out
                for j in range(ns.warmup):
                    fn(j % ns.inputs)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                live = _Live(name, fn, row)
                if device.type == "cuda" and ns.cuda_graph:
                    try:
                        live.graph = _capture(fn, ns.iters, ns.inputs)
                    except Exception as exc:  # noqa: BLE001 - time it from Python instead
                        row["graph_na"] = f"n/a: CUDA graph capture failed: {_first_line(exc)}"
                        try:
                            torch.cuda.synchronize()
                        except Exception:  # noqa: BLE001 - the failed capture already said why
                            pass
                lives.append(live)
            except Exception as exc:  # noqa: BLE001 - one failing variant must not hide the others
                row.clear()
                row["na"] = f"n/a: failed: {_first_line(exc)}"
                if ns.verbose:
                    traceback.print_exc()
        failed = {k: v for k, v in getattr(fp8_ops, "_SCALED_MM_FAILED", {}).items() if k not in failed_before}
        if failed and not emulated:  # the project's op fell back to emulation: its timings are not FP8
            for live in list(lives):
                if live.name.startswith("fp8_eager"):
                    live.row.clear()
                    live.row["na"] = ("n/a: rewriter::fp8_linear fell back to emulation (torch._scaled_mm "
                                      f"refused it: {next(iter(failed.values()))})")
                    lives.remove(live)
        _time_round_robin(lives, device, ns)
    for live in lives:
        live.graph = None
    for name, row in rows.items():
        if name != "bf16" and ("fp8" in name) and emulated and "na" not in row:
            row["emulated"] = emulated
    _derive(result, ns)
    return result


def _compiled(module: nn.Module, ns, row: dict, xs):
    """fn(i) of torch.compile(module); a graph break is retried without fullgraph and noted."""
    kwargs = {"dynamic": False}
    if ns.compile_mode:
        kwargs["mode"] = ns.compile_mode
    state = {"fn": torch.compile(module, fullgraph=True, **kwargs)}

    def run(i):
        try:
            return state["fn"](xs[i])
        except Exception as exc:  # noqa: BLE001
            if state.get("retried"):
                raise
            state["retried"] = True
            row["note"] = f"fullgraph=True failed ({_first_line(exc)}); compiled with graph breaks"
            state["fn"] = torch.compile(module, fullgraph=False, **kwargs)
            return state["fn"](xs[i])
    return run


def _ratio(a, b):
    return a / b if a is not None and b is not None and b > 0 else None


def _derive(result: dict, ns) -> None:
    """Speed-ups, TFLOP/s, quantization overheads and measured vs predicted per mode."""
    from rewriter.passes.plan import fp8_cost

    m, k, n = result["m"], result["k"], result["n"]
    rows = result["variants"]
    flop = 2.0 * m * n * k
    ms = {name: row.get("ms") for name, row in rows.items()}
    bf16 = ms.get("bf16")
    for name, row in rows.items():
        if row.get("ms") is None:
            row.setdefault("na", "n/a: not measured")
            continue
        row["tflops"] = flop / (row["ms"] * 1e-3) / 1e12
        if name.startswith("compiled_"):
            p = name.split("_")[1]
            only, cb16 = ms.get(f"compiled_{p}_only"), ms.get(f"compiled_{p}_bf16")
            if name.endswith("_only"):
                row["tflops"] = None
                row["gb_per_s"] = m * k * 4 / (row["ms"] * 1e-3) / 1e9  # bf16 in + bf16 out
                continue
            net = row["ms"] - only if only is not None else None
            row["net_ms"] = net if net is not None and net > 0 else None
            row["tflops"] = flop / (row["net_ms"] * 1e-3) / 1e12 if row["net_ms"] else None
            row["speedup_vs_bf16"] = _ratio(bf16, row["net_ms"])
            if not name.endswith("_bf16"):
                row["speedup_vs_compiled_bf16"] = _ratio(cb16, row["ms"])
                cb16_net = cb16 - only if cb16 is not None and only is not None else None
                row["net_speedup_vs_compiled_bf16"] = _ratio(cb16_net, row["net_ms"])
        else:
            row["speedup_vs_bf16"] = _ratio(bf16, row["ms"])
        if row.get("emulated"):
            for key in ("speedup_vs_bf16", "speedup_vs_compiled_bf16", "net_speedup_vs_compiled_bf16"):
                if key in row:
                    row[key] = None
            row["speedup_na"] = "n/a: emulated FP8 (no FP8 tensor cores on this device)"
    # what the cost model's constants are made of
    pred = result["predictions"]
    hbm = fp8_cost.HBM_BYTES_PER_S
    elements = m * k
    gemm = ms.get("fp8_gemm")
    emulated = any(row.get("emulated") for row in rows.values())
    fit = {"bf16_tflops": rows["bf16"].get("tflops"), "fp8_gemm_tflops": rows["fp8_gemm"].get("tflops"),
           "model_bf16_tflops": fp8_cost.BF16_FLOPS / 1e12, "model_fp8_tflops": fp8_cost.FP8_FLOPS / 1e12,
           "gemm_speedup": None if emulated else _ratio(bf16, gemm),
           "gemm_roofline": _ratio(pred["eager_dynamic"]["bf16_us"], pred["eager_dynamic"]["fp8_us"])}

    def overhead(key, total):
        if emulated or total is None or gemm is None:
            return
        us = (total - gemm) * 1e3
        fit[f"{key}_quant_us"] = us
        fit[f"{key}_quant_bytes_per_element"] = us * 1e-6 * hbm / elements
        fit[f"{key}_model_quant_us"] = pred[key.split("/")[0]]["quant_us"]

    overhead("eager_dynamic", ms.get("fp8_eager_dynamic"))
    overhead("eager_static", ms.get("fp8_eager_static"))
    comparison = {}
    for mode in MODES:
        sources = ([f"fp8_{mode}"] if mode.startswith("eager") else
                   [f"compiled_{p}_fp8_{mode.split('_')[1]}" for p in ns.producers])
        for src in sources:
            row = rows.get(src, {})
            key = "net_speedup_vs_compiled_bf16" if src.startswith("compiled_") else "speedup_vs_bf16"
            measured = row.get(key)
            label = mode if src.startswith("fp8_") else f"{mode}/{src.split('_')[1]}"
            if src.startswith("compiled_") and row.get("net_ms") is not None:
                overhead(label, row["net_ms"])
            comparison[label] = {
                "measured": measured, "measured_from": f"{src}.{key}",
                "whole_module": row.get("speedup_vs_compiled_bf16"),
                "predicted": pred[mode]["estimate"], "roofline": pred[mode]["roofline"],
                "implied_efficiency": _ratio(measured, pred[mode]["roofline"]),
                "cost_model_uses_fp8": pred[mode]["use_fp8"], "rule": pred[mode]["rule"],
                "fp8_pays": None if measured is None else measured >= 1.0,
            }
    result["fit"] = fit
    result["comparison"] = comparison


# ---------------------------------------------------------------- printing


def _f(value, fmt: str, width: int) -> str:
    return f"{value:{width}{fmt}}" if isinstance(value, (int, float)) and value is not None else f"{'-':>{width}s}"


def print_shape(res: dict) -> None:
    print(f"\n{res['label']}  M={res['m']} K={res['k']} N={res['n']}  ({res['gflop']:.1f} GFLOP)")
    print(f"  {'variant':30s} {'ms':>9s} {'TFLOP/s':>8s} {'x bf16':>7s} {'x c-bf16':>8s} {'net x':>6s} "
          f"{'rel err':>8s}  notes")
    for name, row in res["variants"].items():
        if row.get("ms") is None:
            print(f"  {name:30s} {row.get('na', 'n/a')}")
            continue
        notes = []
        if row.get("emulated"):
            notes.append("emulated")
        if "graph_na" in row:
            notes.append("stream timing (no graph)")
        if row.get("note"):
            notes.append(row["note"])
        if "first_call_s" in row:
            notes.append(f"compile {row['first_call_s']}s")
        if "gb_per_s" in row:
            notes.append(f"{row['gb_per_s']:.0f} GB/s")
        if row.get("finite") is False:
            notes.append("NON-FINITE")
        if "ms_stream" in row and "ms_graph" in row:
            notes.append(f"stream {row['ms_stream']:.4f} ms")
        print(f"  {name:30s} {row['ms']:9.4f} {_f(row.get('tflops'), '.1f', 8)} {_f(row.get('speedup_vs_bf16'), '.2f', 7)} "
              f"{_f(row.get('speedup_vs_compiled_bf16'), '.2f', 8)} {_f(row.get('net_speedup_vs_compiled_bf16'), '.2f', 6)} "
              f"{_f(row.get('rel_err'), '.1e', 8)}  {'; '.join(notes)}")
    preds = res["predictions"]
    print("  cost model: " + " | ".join(
        f"{mode} {p['estimate']:.2f}x (roofline {p['roofline']:.2f}) -> {'fp8' if p['use_fp8'] else 'bf16 [' + p['rule'] + ']'}"
        for mode, p in preds.items()))


def print_summary(results: list[dict]) -> None:
    labels = []
    for res in results:
        for label in res.get("comparison", {}):
            if label not in labels:
                labels.append(label)
    print("\nmeasured / predicted speed-up over bf16 (compiled: net of the producer, vs compiled bf16); "
          "* = the cost model uses fp8")
    short = {"eager_dynamic": "eager dyn", "eager_static": "eager static", "compiled_dynamic": "c-dyn",
             "compiled_static": "c-static", "layernorm": "LN", "gelu": "GELU"}

    def name(label):
        return " ".join(short.get(part, part) for part in label.split("/"))

    head = f"{'shape':28s} {'M':>6s} {'K':>6s} {'N':>6s} {'gemm':>11s} " + " ".join(f"{name(lab):>15s}" for lab in labels)
    print(head)
    print("-" * len(head))
    for res in results:
        fit, comp = res.get("fit", {}), res.get("comparison", {})
        gemm = f"{_f(fit.get('gemm_speedup'), '.2f', 5)}/{_f(fit.get('gemm_roofline'), '.2f', 5)}"
        cells = []
        for label in labels:
            c = comp.get(label)
            if not c:
                cells.append(f"{'':>15s}")
                continue
            star = "*" if c["cost_model_uses_fp8"] else " "
            cells.append(f"{_f(c['measured'], '.2f', 5)}/{c['predicted']:5.2f}{star}".rjust(15))
        print(f"{res['label'][:28]:28s} {res['m']:6d} {res['k']:6d} {res['n']:6d} {gemm:>11s} " + " ".join(cells))
    print("gemm = fp8 GEMM alone / its roofline (t_bf16 / t_fp8); the efficiency the cost model assumes is "
          "FP8_ROOFLINE_EFFICIENCY (see 'implied_efficiency' and 'fit' in the JSON)")


# ---------------------------------------------------------------- main


def _device_check(device: torch.device) -> str | None:
    """None when FP8 GEMMs run here; the emulation reason on CPU; SystemExit on a CUDA GPU without FP8."""
    from rewriter.runtime.fp8_ops import emulation_reason, fp8_gemm_supported

    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible to this torch "
                             f"({torch.__version__}); use --device cpu --small for a smoke run")
        if not fp8_gemm_supported(device):
            raise SystemExit(f"refusing to benchmark: {emulation_reason(device)}. FP8 GEMMs (torch._scaled_mm, "
                             "float8_e4m3fn) need compute capability 8.9+ (Ada, Hopper, Blackwell) on CUDA; "
                             "timing the emulation on this GPU would say nothing about FP8")
        return None
    if device.type != "cpu":
        raise SystemExit(f"--device {device}: write cuda or cpu")
    return emulation_reason(device) or "cpu: FP8 GEMMs emulated"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_gemm_fp8", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--small", action="store_true", help="the default shapes divided (M/256, K/32, N/32): CPU smoke run")
    p.add_argument("--models", default=None, help=f"comma list from {','.join(d[0] for d in DEFAULT_SHAPES)}")
    p.add_argument("--shapes", default=None, help="'M,K,N;M,K,N': time these instead of the default list")
    p.add_argument("--producers", default=",".join(PRODUCERS), help="compiled producers: layernorm,gelu")
    p.add_argument("--compile", dest="compile_on", action="store_true", default=True)
    p.add_argument("--no-compile", dest="compile_on", action="store_false", help="skip the torch.compile variants")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", default=True,
                   help="time only the Python-launched calls (no CUDA graph replay)")
    p.add_argument("--warmup", type=int, default=None, help="calls per variant before timing")
    p.add_argument("--iters", type=int, default=None, help="calls per timed block (and per CUDA graph)")
    p.add_argument("--rounds", type=int, default=None, help="round-robin rounds (median over them)")
    p.add_argument("--inputs", type=int, default=None, help="distinct activations cycled (defeats L2 reuse)")
    p.add_argument("--bias", action="store_true", help="GEMMs with a bf16 bias (epilogue)")
    p.add_argument("--no-fast-accum", dest="fast_accum", action="store_false", default=True,
                   help="torch._scaled_mm(use_fast_accum=False) (the project default is True)")
    p.add_argument("--target", default=None, help="target of the cost model's decision: sm_90, sm_89, ... "
                   "(default: this GPU; on CPU sm_90)")
    p.add_argument("--out", default=None, help="write the results as JSON (after every shape)")
    p.add_argument("--verbose", action="store_true")
    ns = p.parse_args(argv)
    device = torch.device(ns.device)
    cpu = device.type == "cpu"
    ns.warmup = ns.warmup if ns.warmup is not None else (1 if cpu else 10)
    ns.iters = ns.iters if ns.iters is not None else (1 if cpu else 20)
    ns.rounds = ns.rounds if ns.rounds is not None else (2 if cpu else 15)
    ns.inputs = ns.inputs if ns.inputs is not None else (1 if cpu else 4)
    if min(ns.iters, ns.rounds, ns.inputs) < 1 or ns.warmup < 0:
        raise SystemExit("--iters, --rounds and --inputs must be >= 1, --warmup >= 0")
    ns.producers = [x.strip() for x in ns.producers.split(",") if x.strip()]
    for prod in ns.producers:
        if prod not in PRODUCERS:
            raise SystemExit(f"--producers: unknown {prod!r}; choose from {', '.join(PRODUCERS)}")
    shapes = shape_list(ns.shapes, ns.models, ns.small and not ns.shapes)
    emulated = _device_check(device)
    from rewriter.passes.plan.fp8_cost import target_capability

    target = ns.target if ns.target is not None else (None if device.type == "cuda" else "sm_90")
    try:
        target_capability(target)
    except Exception as exc:  # noqa: BLE001
        raise SystemExit(f"--target {ns.target!r}: {exc}") from None
    caller, call_text = None, "n/a (emulated)"
    if emulated is None:
        try:
            caller, call_text = _scaled_mm_caller(device)
        except RuntimeError as exc:
            raise SystemExit(f"refusing to benchmark: {exc}") from None
    if ns.compile_on:
        _configure_dynamo()
    info = {"device": harness.device_name(device),
            "capability": ("sm_%d%d" % torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "fp8": emulated or call_text,
            "cost_model_target": target or "this GPU", "small": ns.small, "warmup": ns.warmup, "iters": ns.iters,
            "rounds": ns.rounds, "inputs": ns.inputs, "cuda_graph": device.type == "cuda" and ns.cuda_graph,
            "compile": ns.compile_on, "compile_mode": ns.compile_mode, "bias": ns.bias, "fast_accum": ns.fast_accum,
            "producers": ns.producers, "variants": variant_names(ns.producers),
            "cost_model": cost_model_constants()}
    print(" | ".join(f"{k}: {v}" for k, v in info.items() if k not in ("variants", "cost_model")))
    results = {"info": info, "shapes": []}

    def save():
        if ns.out:
            harness.write_json(ns.out, results, device=device, argv=argv, module="tools.bench_gemm_fp8")

    t_start = time.perf_counter()
    for i, shape in enumerate(shapes):
        print(f"[{i + 1}/{len(shapes)}] {shape['label']} M={shape['m']} K={shape['k']} N={shape['n']} "
              f"({time.perf_counter() - t_start:.0f}s so far)", file=sys.stderr, flush=True)
        pred = predictions(shape["m"], shape["k"], shape["n"], target)
        try:
            res = _bench_shape({**shape, "predictions": pred}, ns, device, caller, emulated)
        except Exception as exc:  # noqa: BLE001 - one failing shape (memory) must not end the run
            if ns.verbose:
                traceback.print_exc()
            res = {**shape, "predictions": pred, "error": _first_line(exc),
                   "variants": {v: {"na": f"n/a: shape failed: {_first_line(exc)}"} for v in variant_names(ns.producers)}}
        results["shapes"].append(res)
        if "error" not in res:
            print_shape(res)
        else:
            print(f"\n{shape['label']}: {res['error']}")
        save()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_summary([r for r in results["shapes"] if "comparison" in r])
    results["info"]["seconds"] = round(time.perf_counter() - t_start, 1)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
