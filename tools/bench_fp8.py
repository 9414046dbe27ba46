"""FP8 side by side, one process, one GPU: our FP8 vs our BF16 vs torchao float8, eager and torch.compile.

Models (random init; --small swaps in tiny configs for a CPU smoke run):
    bert_large   BERT-large, b32 s384                     target: our FP8 >= 1.25x our BF16
    gpt2_medium  GPT-2 medium (Conv1D = addmm), b8 s1024   target: our FP8 >= 1.25x our BF16
    llama_mlp    Llama-style MLP, hidden 4096, gate/up 4096->14336, down 14336->4096, SiLU, b8 s1024
                 (target >= 1.25x)
    bert_base    BERT-base, b32 s128                      the cost model must keep BF16: >= 1.0x
    vit_b_16     ViT-B/16, b64                            the cost model must keep BF16: >= 1.0x

Variants per model (all built and warmed up first, then timed round-robin, one block of --iters calls
of each in turn, --repeats rounds, median per variant; a variant that fails is reported, the others run):
    fp32 strict              reference for the error (TF32 off)
    ours bf16                rewriter.convert(precision="bf16")
    ours fp8                 rewriter.convert(precision="fp8"): the cost model decides per GEMM (eager costs)
    ours fp8 all             Fp8Options.always(): every eligible GEMM in FP8 (what the cost model saves us from)
    ours bf16 compile        torch.compile of our bf16 model, converted for inductor (backend="compile")
    ours fp8 compile         precision="fp8" with Fp8Options(fused_quantization=True), then torch.compile
    ours fp8 compile static  the same with calibration (the example and one more random batch): static
                             activation scales, whose quantization inductor fuses into the producer
    torchao fp8 / + compile  Float8DynamicActivationFloat8WeightConfig on model.bfloat16() (n/a without torchao)
    ours bf16 compile tuned, ours fp8 compile static tuned
                             the same with inductor's coordinate_descent_tuning (block sizes tuned per kernel)
    ours bf16 cudagraphs, ours fp8 static cudagraphs
                             torch.compile(mode="reduce-overhead"): CUDA graphs, no per-kernel launch cost
Per variant: median latency (CUDA events, --repeats x --iters after --warmup), speed-up over our bf16 in the
same mode (eager vs eager, compiled vs compiled), relative L2 error of the output vs fp32 strict (float64),
GEMMs in FP8 / GEMMs, weight bytes. The GEMM table (--gemms, on by default) times each distinct linear
shape alone: bf16 F.linear vs rewriter::fp8_linear (dynamic and static scales, eager), next to the cost
model's estimate, to check FP8_ROOFLINE_EFFICIENCY on the machine.

    python -m tools.bench_fp8 --device cuda --out bench_fp8.json          # tools/results/README.md
    python -m tools.bench_fp8 --device cuda --models bert_large --profile 12  # + kernel time by kind
    python -m tools.bench_fp8 --device cpu --small                         # smoke run (FP8 emulated)
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
import time
import traceback
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from rewriter import meta
from tools import harness

__all__ = ["main", "build", "MODELS", "TARGETS"]

MODELS = ("bert_large", "gpt2_medium", "llama_mlp", "bert_base", "vit_b_16")
TARGETS = {"bert_large": 1.25, "gpt2_medium": 1.25, "llama_mlp": 1.25, "bert_base": 1.0, "vit_b_16": 1.0}


def build(name: str, small: bool, device: torch.device):
    """(model, args, kwargs): random-init fp32 eval model and its inputs, on `device` (tools.harness)."""
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
    return harness.build_model(name, small=small, device=device)


def _fp8_counts(gm) -> tuple[int, int, dict]:
    records = [meta.get(n, meta.FP8) for n in gm.graph.nodes if meta.get(n, meta.FP8)]
    gemms = [r for r in records if r.get("rule") not in ("op",)]
    rules: dict = {}
    for r in gemms:
        rules[r["rule"]] = rules.get(r["rule"], 0) + 1
    return sum(bool(r["use"]) for r in records), len(gemms), rules


# ---------------------------------------------------------------- variants


def _torchao_fp8(model):
    """model.bfloat16() with torchao's dynamic float8 activations and weights; raises ImportError."""
    from torchao.quantization import quantize_

    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig as config
        cfg = config()
    except ImportError:
        from torchao.quantization import float8_dynamic_activation_float8_weight as config
        cfg = config()
    m = copy.deepcopy(model).to(torch.bfloat16)
    quantize_(m, cfg)
    converted = sum(1 for mod in m.modules() if isinstance(mod, nn.Linear)
                    and "float8" in type(mod.weight).__name__.lower() + str(getattr(mod.weight, "dtype", "")))
    return m, converted


def _variants(model, args, kwargs, small: bool, compile_on: bool):
    import rewriter
    from rewriter.backends.torch_backend import graph_module_of
    from rewriter.passes.plan.fp8_cost import Fp8Options

    cache: dict = {}

    def convert(precision, fp8=None, calibrated=False, compiled=False):
        key = (precision, fp8, calibrated, compiled)
        if key not in cache:  # one conversion per key; all stay alive for the timing rounds
            t0 = time.perf_counter()
            calibration = _calibration_batches(args, kwargs) if calibrated else None
            # for torch.compile: the graph as backend="compile" shapes it for inductor (SigmoidGelu, fused
            # quantization estimates), then compiled here like every other compiled variant
            converted = rewriter.convert(model, args, kwargs, precision=precision, fp8=fp8,
                                         calibration=calibration, backend="compile" if compiled else "eager")
            cache[key] = graph_module_of(converted)
            print(f"    converted {precision}{' ' + str(fp8) if fp8 else ''}{' for inductor' if compiled else ''} "
                  f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        return cache[key]

    bf_args = tuple(a.to(torch.bfloat16) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    bf_kwargs = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v)
                 for k, v in kwargs.items()}

    def ours(precision, fp8=None, compiled=False, calibrated=False, **compile_kwargs):
        def make():
            gm = convert(precision, fp8, calibrated, compiled)
            fn = torch.compile(gm, **compile_kwargs) if compiled else gm
            return (lambda: fn(*args, **kwargs)), gm, gm
        return make

    def torchao(compiled=False):
        def make():
            m, n = _torchao_fp8(model)
            fn = torch.compile(m) if compiled else m
            return (lambda: fn(*bf_args, **bf_kwargs)), m, n
        return make

    out = [("fp32 strict", "eager", lambda: ((lambda: model(*args, **kwargs)), model, None)),
           ("ours bf16", "eager", ours("bf16"))]
    if compile_on:
        out.append(("ours bf16 compile", "compile", ours("bf16", compiled=True)))
    out += [("ours fp8", "eager", ours("fp8")),
            ("ours fp8 all", "eager", ours("fp8", Fp8Options.always()))]
    if compile_on:
        fused = Fp8Options(fused_quantization=True)
        out.append(("ours fp8 compile", "compile", ours("fp8", fused, compiled=True)))
        out.append(("ours fp8 compile static", "compile", ours("fp8", fused, compiled=True, calibrated=True)))
    out.append(("torchao fp8", "eager", torchao()))
    if compile_on:
        out.append(("torchao fp8 compile", "compile", torchao(compiled=True)))
        # the same graphs under other compile settings, each mode against our bf16 in that mode
        tuned = {"options": {"coordinate_descent_tuning": True}}
        out += [("ours bf16 compile tuned", "compile tuned", ours("bf16", compiled=True, **tuned)),
                ("ours fp8 compile static tuned", "compile tuned",
                 ours("fp8", fused, compiled=True, calibrated=True, **tuned)),
                ("ours bf16 cudagraphs", "cudagraphs", ours("bf16", compiled=True, mode="reduce-overhead")),
                ("ours fp8 static cudagraphs", "cudagraphs",
                 ours("fp8", fused, compiled=True, calibrated=True, mode="reduce-overhead"))]
    return out


def _calibration_batches(args, kwargs, count: int = 2) -> list:
    """`count` batches like the example for static scales: the example itself, then fresh draws (floats
    from N(0, 1), token ids from the example's range; masks and other 0/1 tensors kept)."""
    def redraw(x, gen):
        if not torch.is_tensor(x):
            return x
        if x.is_floating_point():
            return torch.randn(x.shape, generator=gen).to(x)
        if int(x.max()) <= 1:
            return x
        return torch.randint(0, int(x.max()) + 1, x.shape, generator=gen).to(x)

    batches = [args if not kwargs else dict(kwargs)]
    for i in range(1, count):
        gen = torch.Generator().manual_seed(1000 + i)
        batches.append(tuple(redraw(a, gen) for a in args) if not kwargs
                       else {k: redraw(v, gen) for k, v in kwargs.items()})
    return batches


def _bench_model(name, args_ns, device, timer):
    """Build every variant (error, FP8 counts, warm-up), then time them round-robin."""
    model, args, kwargs = build(name, args_ns.small, device)
    harness.set_tf32(False)
    with torch.no_grad():
        reference = model(*args, **kwargs)
    rows, live = [], []
    wanted = {v.strip() for v in args_ns.variants.split(",")} if args_ns.variants else None
    for label, mode, make in _variants(model, args, kwargs, args_ns.small, args_ns.compile_on):
        if wanted is not None and label not in wanted and label != "fp32 strict":
            continue
        row = {"model": name, "variant": label, "mode": mode}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn, module, extra = make()
                with torch.no_grad():
                    out = fn()
                    row["error_vs_fp32"] = harness.rel_l2(reference, out)
                    row["finite"] = bool(torch.isfinite(harness.output_tensor(out).float()).all())
                    del out
                    for _ in range(timer.warmup):
                        fn()
            row["weight_bytes"] = harness.param_bytes(module)
            if label.startswith("ours fp8"):
                fp8, gemms, rules = _fp8_counts(extra)
                row.update({"fp8_gemms": fp8, "gemms": gemms, "kept_by_rule": rules,
                            "emulated": bool(extra.meta.get(meta.FP8, {}).get("emulated"))})
            elif label.startswith("torchao"):
                row["fp8_gemms"] = extra
            live.append((row, fn))
        except ImportError as exc:
            row["error"] = f"n/a ({exc.name or exc} not installed)"
        except Exception as exc:  # noqa: BLE001 - one failing variant must not hide the others
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            if args_ns.verbose:
                traceback.print_exc()
        finally:
            fn = module = extra = None  # noqa: F841
        rows.append(row)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        harness.round_robin(live, device=device, iters=timer.iters, repeats=timer.repeats)
    if args_ns.profile:
        _profile(live, device, args_ns.profile)
    base = {row["mode"]: row["ms"] for row, _ in live if row["variant"].startswith("ours bf16")}
    for row in rows:
        if "ms" in row and row["mode"] in base and row["variant"] != "fp32 strict":
            row["speedup_vs_ours_bf16"] = base[row["mode"]] / row["ms"]
    live.clear()
    del model
    harness.free(device)
    return rows


def _kernel_kind(name: str) -> str:
    """fused elementwise (inductor's triton kernels, whatever ops their names list), attention,
    fp8 GEMM (cuBLAS nvjet "qq" kernels: float8 operands), GEMM, other."""
    low = name.lower()
    if low.startswith("triton_"):
        return "fused elementwise"
    if any(k in low for k in ("flash", "fmha", "sdpa", "attention")):
        return "attention"
    if re.match(r"nvjet_sm\d+_qq", low) or any(k in low for k in ("e4m3", "f8f8", "fp8")):
        return "gemm fp8"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "sm90_xmma", "ampere_", "matmul")):
        return "gemm"
    return "other"


def _profile(live, device, top: int) -> None:
    """Per variant: device time per call by kernel kind (fp8 GEMM, GEMM, attention, other) and the
    `top` kernels, into row["kernels"] (tools/profile_kernels.kernel_table)."""
    from tools.profile_kernels import kernel_table

    for row, fn in live:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            total, kernels = kernel_table(fn, device)
        kinds: dict = {}
        for name, us, _n in kernels:
            kinds[_kernel_kind(name)] = kinds.get(_kernel_kind(name), 0.0) + us
        row["kernel_us"] = {"total": round(total, 1), **{k: round(v, 1) for k, v in sorted(kinds.items())}}
        row["kernels"] = [{"name": n[:160], "us": round(us, 1), "calls": c} for n, us, c in kernels[:top]]
        print(f"  {row['variant']}: {total / 1e3:.2f} ms of kernels per call; "
              + ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in sorted(kinds.items())), file=sys.stderr)
        for name, us, calls in kernels[:top]:
            print(f"    {us:9.1f} us x{calls:<4d} {name[:120]}", file=sys.stderr)


def _gemm_table(names, small, device, timer):
    """Each distinct linear shape alone: bf16 F.linear vs rewriter::fp8_linear, next to the estimate."""
    from rewriter.passes.plan.fp8_cost import Fp8Options, GemmShape, estimate_speedup
    from rewriter.runtime.fp8_ops import fp8_linear_op, quantize_weight

    shapes = {
        "bert_large": [(32 * 384, 1024, 1024), (32 * 384, 1024, 4096), (32 * 384, 4096, 1024)],
        "gpt2_medium": [(8 * 1024, 1024, 3072), (8 * 1024, 1024, 1024), (8 * 1024, 1024, 4096),
                        (8 * 1024, 4096, 1024)],
        "llama_mlp": [(8 * 1024, 4096, 14336), (8 * 1024, 14336, 4096)],
        "bert_base": [(32 * 128, 768, 768), (32 * 128, 768, 3072), (32 * 128, 3072, 768)],
        "vit_b_16": [(64 * 197, 768, 2304), (64 * 197, 768, 768), (64 * 197, 768, 3072), (64 * 197, 3072, 768)],
    }
    seen, rows = set(), []
    threshold = Fp8Options().min_speedup
    for name in names:
        for m, k, n in shapes.get(name, []):
            if small:
                m, k, n = max(16, m // 256), max(16, k // 16), max(16, n // 16)
            if (m, k, n) in seen:
                continue
            seen.add((m, k, n))
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=device) / k ** 0.5
            w16 = w.to(torch.bfloat16)
            w8, ws = quantize_weight(w, per_channel=False)
            xs = (x.float().abs().amax() * 2 / 448).reshape(())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t_bf16 = timer(lambda: F.linear(x, w16))
                t_dyn = timer(lambda: fp8_linear_op(x, w8, ws, None, None, torch.bfloat16, True))
                t_sta = timer(lambda: fp8_linear_op(x, w8, ws, None, xs, torch.bfloat16, True))
            est = estimate_speedup(GemmShape(m, n, k), static=False)[0]
            rows.append({"model": name, "m": m, "k": k, "n": n, "bf16_ms": t_bf16, "fp8_dynamic_ms": t_dyn,
                         "fp8_static_ms": t_sta, "speedup_dynamic": t_bf16 / t_dyn,
                         "speedup_static": t_bf16 / t_sta, "estimate_dynamic": est,
                         "cost_model_uses_fp8": est >= threshold})
            del x, w, w16, w8
            harness.free(device)
    return rows


def _print_models(rows) -> None:
    head = f"{'model':12s} {'variant':30s} {'ms':>9s} {'x ours bf16':>11s} {'err vs fp32':>11s} " \
           f"{'fp8/gemms':>9s} {'weights MB':>10s}  notes"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:12s} {r['variant']:30s} {'n/a':>9s}  {r['error']}")
            continue
        fp8 = (f"{r['fp8_gemms']}/{r['gemms']}" if "gemms" in r else
               (str(r["fp8_gemms"]) if "fp8_gemms" in r else ""))
        notes = []
        if r.get("emulated"):
            notes.append("emulated (no FP8 GEMMs here)")
        kept = {k: v for k, v in (r.get("kept_by_rule") or {}).items() if k != "fp8"}
        if kept:
            notes.append("kept bf16: " + ", ".join(f"{k}={v}" for k, v in sorted(kept.items())))
        if not r.get("finite", True):
            notes.append("NON-FINITE OUTPUT")
        speed = f"{r['speedup_vs_ours_bf16']:.2f}x" if "speedup_vs_ours_bf16" in r else ""
        print(f"{r['model']:12s} {r['variant']:30s} {r['ms']:9.2f} {speed:>11s} {r['error_vs_fp32']:11.2e} "
              f"{fp8:>9s} {r['weight_bytes'] / 2**20:10.1f}  {'; '.join(notes)}")


def _verdicts(rows, device) -> list[str]:
    lines = []
    for name, target in TARGETS.items():
        for variant in ("ours fp8", "ours fp8 compile", "ours fp8 compile static", "ours fp8 compile static tuned",
                        "ours fp8 static cudagraphs"):
            r = next((r for r in rows if r["model"] == name and r["variant"] == variant and "ms" in r), None)
            if r is None or "speedup_vs_ours_bf16" not in r:
                continue
            ok = r["speedup_vs_ours_bf16"] >= target
            what = "PASS" if ok else "FAIL"
            if r.get("fp8_gemms") == 0:
                what = ("PASS (every GEMM kept bf16: the same graph as ours bf16, the ratio is noise)"
                        if target <= 1.0 else "FAIL (the cost model kept every GEMM bf16)")
            if device.type != "cuda" or r.get("emulated"):
                what = "n/a (not an FP8 GPU)"
            lines.append(f"{name:12s} {variant:24s} {r['speedup_vs_ours_bf16']:.2f}x vs target >= {target:g}x: {what}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_fp8", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny configs (CPU smoke run)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list from {','.join(MODELS)}")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--compile", dest="compile_on", action="store_true", default=None,
                   help="also torch.compile variants (default: on for cuda, off for cpu)")
    p.add_argument("--no-compile", dest="compile_on", action="store_false")
    p.add_argument("--no-gemms", dest="gemms", action="store_false", help="skip the per-shape GEMM table")
    p.add_argument("--variants", default=None,
                   help="comma list of variant names to run (e.g. 'ours bf16 compile,ours fp8 compile static'); "
                        "default: all")
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.add_argument("--profile", type=int, default=0, metavar="TOP",
                   help="after timing, profile each variant: device time by kernel kind and the TOP kernels")
    p.add_argument("--verbose", action="store_true")
    ns = p.parse_args(argv)
    device = torch.device(ns.device)
    small_run = ns.small or device.type == "cpu"
    ns.warmup = ns.warmup if ns.warmup is not None else (1 if small_run else 10)
    ns.iters = ns.iters if ns.iters is not None else (2 if small_run else 30)
    ns.repeats = ns.repeats if ns.repeats is not None else (1 if small_run else 3)
    if ns.compile_on is None:
        ns.compile_on = device.type == "cuda"
    names = [n.strip() for n in ns.models.split(",") if n.strip()]
    for n in names:
        if n not in MODELS:
            raise SystemExit(f"unknown model {n!r}: choose from {', '.join(MODELS)}")
    from rewriter.runtime.fp8_ops import emulation_reason

    timer = harness.Timer(device, ns.warmup, ns.iters, ns.repeats)
    info = {"device": harness.device_name(device), "torch": torch.__version__, "small": ns.small,
            "warmup": ns.warmup, "iters": ns.iters, "repeats": ns.repeats,
            "fp8_gemms": emulation_reason(device) or "torch._scaled_mm"}
    try:
        import torchao
        info["torchao"] = torchao.__version__
    except ImportError:
        info["torchao"] = "n/a (not installed)"
    print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    results = {"info": info, "models": [], "gemms": []}

    def save():
        if ns.out:
            harness.write_json(ns.out, results, device=device, argv=argv, module="tools.bench_fp8")

    for name in names:
        print(f"\n== {name}", file=sys.stderr, flush=True)
        results["models"].extend(_bench_model(name, ns, device, timer))
        save()
    print()
    _print_models(results["models"])
    if ns.gemms:
        results["gemms"] = _gemm_table(names, ns.small, device, timer)
        save()
        print(f"\n{'model':12s} {'M':>6s} {'K':>6s} {'N':>6s} {'bf16 ms':>8s} {'fp8 dyn':>8s} {'fp8 stat':>8s} "
              f"{'x dyn':>6s} {'x stat':>6s} {'estimate':>8s}  cost model")
        for r in results["gemms"]:
            print(f"{r['model']:12s} {r['m']:6d} {r['k']:6d} {r['n']:6d} {r['bf16_ms']:8.3f} "
                  f"{r['fp8_dynamic_ms']:8.3f} {r['fp8_static_ms']:8.3f} {r['speedup_dynamic']:6.2f} "
                  f"{r['speedup_static']:6.2f} {r['estimate_dynamic']:8.2f}  "
                  f"{'fp8' if r['cost_model_uses_fp8'] else 'bf16'}")
    verdicts = _verdicts(results["models"], device)
    if verdicts:
        print()
        print("\n".join(verdicts))
    results["verdicts"] = verdicts
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
