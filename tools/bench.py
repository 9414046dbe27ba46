"""Side-by-side latency and accuracy of fp32, TF32, autocast, blanket casts, torch.compile and rewriter.

Every variant runs in the same process on the same inputs and GPU; errors are relative L2 against strict
fp32 (TF32 off), computed in float64. Latency: CUDA events, median of --repeats x --iters after --warmup.
Every variant is built and warmed up first and stays alive; then --repeats rounds time one block of
--iters calls of each variant in turn, and each latency is the median of its blocks, so the ratios
compare variants measured side by side in time on a noisy shared machine.
Per row: latency, speedup vs strict fp32 and vs autocast at the same dtype, achieved TFLOP/s and its
fraction of the bf16 compute ceiling (FLOPs counted once per model and batch with
torch.utils.flop_counter.FlopCounterMode; ceiling --peak-tflops, 790 = bf16 GEMM measured on an H100),
peak memory (parameter bytes + the most memory the variant allocated while running, CUDA-graph pools and
compile workspaces included), relative L2 error vs strict fp32 and whether every output is finite.
A variant that fails is reported with its error; the others still run. JSON is rewritten after every
model, so a run that is cut off keeps what it measured; --plot writes a PNG (needs matplotlib).

Variants: fp32 strict, tf32, then per dtype: autocast, .to(dtype), rewriter (eager), rewriter in each
--modes backend (compile, cuda_graphs), and torch.compile(model.to(dtype)) when --modes has compile.

    python -m tools.bench --device cuda --modes compile,compile:reduce-overhead,cuda_graphs \
        --batch default,1 --out bench.json --plot bench.png                 # tools/results/README.md
    python -m tools.bench --device cpu --small --models bert --iters 2 --repeats 1 --warmup 1   # smoke
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback

import torch

from rewriter import measure
from tools import harness

__all__ = ["main", "variants", "count_flops", "plot"]


def _cast_inputs(args, kwargs, dtype):
    cast = lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def count_flops(model, args, kwargs) -> int:
    """FLOPs of one forward of `model` (matmuls, convolutions, attention), counted once."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*args, **kwargs)
    return int(counter.get_total_flops())


def variants(model, args, kwargs, dtypes, modes, *, compile_mode=None, backend_options=None):
    """[(name, dtype, build)] for every variant; build() -> (callable, module whose bytes to count).

    Built lazily, one at a time, so a variant that fails to build is reported and skipped and the
    memory of one is freed before the next is made.
    """
    import rewriter

    out = [("fp32 strict", None, lambda: (lambda: model(*args, **kwargs), model)),
           ("tf32", None, lambda: (lambda: model(*args, **kwargs), model))]
    converted: dict = {}

    def convert(dtype, short):
        if dtype not in converted:
            converted.clear()  # keep one converted model alive at a time
            t0 = time.perf_counter()
            converted[dtype] = rewriter.convert(model, args, kwargs, precision=short)
            print(f"  converted {short} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        return converted[dtype]

    device_type = (args[0] if args else next(iter(kwargs.values()))).device.type
    for dtype in dtypes:
        short = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        bargs, bkwargs = _cast_inputs(args, kwargs, dtype)

        def autocast(dtype=dtype):
            def call():
                with torch.autocast(device_type, dtype=dtype):
                    return model(*args, **kwargs)
            return call, model

        def blanket(dtype=dtype, bargs=bargs, bkwargs=bkwargs):
            b = copy.deepcopy(model).to(dtype)
            return (lambda: b(*bargs, **bkwargs)), b

        def ours(dtype=dtype, short=short):
            fast = convert(dtype, short)
            return (lambda: fast(*args, **kwargs)), fast

        out += [(f"autocast {short}", dtype, autocast), (f".to({short})", dtype, blanket),
                (f"rewriter {short}", dtype, ours)]
        for mode in modes:
            def ours_mode(dtype=dtype, short=short, mode=mode):
                from rewriter.backends.torch_backend import graph_module_of, optimize

                base, _, own_mode = mode.partition(":")  # "compile:reduce-overhead" = compile + CUDA graphs
                opts = dict(backend_options or {})
                if base == "compile" and (own_mode or compile_mode) and "compile_mode" not in opts:
                    opts["compile_mode"] = own_mode or compile_mode
                opts = {k: v for k, v in opts.items() if k in _mode_options(base)}
                fast = optimize(convert(dtype, short), mode=base, **opts)
                return (lambda: fast(*args, **kwargs)), graph_module_of(fast)
            out.append((f"rewriter {short} {mode}", dtype, ours_mode))
        if any(m.partition(":")[0] == "compile" for m in modes):
            def compiled(dtype=dtype, bargs=bargs, bkwargs=bkwargs):
                b = copy.deepcopy(model).to(dtype)
                c = torch.compile(b, mode=compile_mode)
                return (lambda: c(*bargs, **bkwargs)), b
            out.append((f"torch.compile(.to({short}))", dtype, compiled))
    return out


def _mode_options(mode: str) -> set:
    from rewriter.backends import torch_backend

    return set(torch_backend._OPTIONS.get(mode, {}))


def _prepare(fn, module, device, ref, warmup: int) -> dict:
    """Error vs `ref` and memory of one variant, measured over its first call and `warmup` more."""
    with measure.peak_memory(device) as mem, torch.no_grad():
        out = harness.output_tensor(fn()).float()
        row = {"rel_l2": harness.rel_l2(ref, out), "finite": bool(torch.isfinite(out).all())}
        del out
        for _ in range(warmup):
            fn()
    work = mem.bytes or 0
    params = harness.param_bytes(module)
    row.update(param_mb=params / 2**20, work_mb=work / 2**20,
               peak_mb=(params + work) / 2**20 if device.type == "cuda" else None)
    return row


def _ratios(rows, flops, peak_tflops) -> None:
    base = next((x for x in rows if x["variant"] == "fp32 strict" and x.get("ms")), None)
    for r in rows:
        if not r.get("ms"):
            continue
        short = next((d for d in ("fp16", "bf16") if d in r["variant"]), None)
        auto = next((x for x in rows if short and x["variant"] == f"autocast {short}" and x.get("ms")), None)
        r["vs_fp32"] = base["ms"] / r["ms"] if base else None
        r["vs_autocast"] = auto["ms"] / r["ms"] if auto else None
        r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12 if flops else None
        r["ceiling_frac"] = r["tflops"] / peak_tflops if flops else None


def plot(results: list[dict], path: str) -> bool:
    """Speedup vs strict fp32 per variant, one panel per model and batch; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}", file=sys.stderr)
        return False
    groups: dict = {}
    for r in results:
        groups.setdefault((r["model"], r["batch"]), []).append(r)
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 0.32 * max(len(g) for g in groups.values()) *
                                                        len(groups) + 1.2 * len(groups)), squeeze=False)
    for ax, ((model, batch), rows) in zip(axes[:, 0], groups.items()):
        names = [r["variant"] for r in rows]
        vals = [r.get("vs_fp32") or 0.0 for r in rows]
        colors = ["tab:green" if n.startswith("rewriter") else "tab:gray" if "fp32" in n or "tf32" in n
                  else "tab:blue" for n in names]
        ax.barh(range(len(rows)), vals, color=colors)
        ax.set_yticks(range(len(rows)), names, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.6)
        ax.set_xlim(0, max(vals + [1.0]) * 1.45)  # room for the labels
        for i, r in enumerate(rows):
            text = (f"{r['ms']:.2f} ms, err {r['rel_l2']:.1e}" if r.get("ms") else
                    f"failed: {str(r.get('error', ''))[:60]}")
            ax.text(vals[i], i, " " + text, va="center", fontsize=6)
        ax.set_title(f"{model}, batch {batch}: speedup vs strict fp32 (higher is better)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def _write_json(path, device, args, results, argv) -> None:
    harness.write_json(path, {"args": vars(args), "results": results}, device=device, argv=argv,
                       module="tools.bench")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,vit_b_16,bert,gpt2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="fp16,bf16")
    p.add_argument("--modes", default="", help="backend modes of ours besides eager: compile,cuda_graphs, "
                   "or compile:<torch.compile mode> for ours only, e.g. compile:reduce-overhead (compile with "
                   "CUDA graphs); any compile mode also adds the torch.compile(model.to(dtype)) baseline")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for ours and the baseline, "
                   "e.g. max-autotune-no-cudagraphs")
    p.add_argument("--backend-options", default=None, help='JSON options for our backends, e.g. '
                   '\'{"dynamic": false, "clone_outputs": false}\' (each mode takes the ones it knows)')
    p.add_argument("--batch", default="default", help="batch sizes, comma separated: 'default' is each "
                   "model's own (128/64/32/8), e.g. --batch default,1")
    p.add_argument("--small", action="store_true", help="tiny configs for a CPU smoke run")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=790.0, help="compute ceiling for the fraction "
                   "column (790: bf16 GEMM measured on an H100 SXM)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG here (default: next to --out)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtypes = [{"fp16": torch.float16, "bf16": torch.bfloat16}[d] for d in a.dtypes.split(",") if d]
    modes = [m for m in a.modes.split(",") if m]
    batches = [None if b.strip() in ("default", "") else int(b) for b in a.batch.split(",")]
    backend_options = json.loads(a.backend_options) if a.backend_options else None
    if modes:
        from torch import _dynamo

        # many compiled variants of the same forward in one process: never let dynamo give up silently
        for key in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                    "accumulated_recompile_limit"):
            if hasattr(_dynamo.config, key):
                setattr(_dynamo.config, key, 256)
    results = []
    for name in a.models.split(","):
        for batch in batches:
            model, args, kwargs = harness.build_model(name, small=a.small, device=device, batch=batch)
            b = (args[0] if args else next(iter(kwargs.values()))).shape[0]
            print(f"== {name} batch {b}", file=sys.stderr, flush=True)
            harness.set_tf32(False)
            with torch.no_grad():
                ref = harness.output_tensor(model(*args, **kwargs)).float()
            flops = count_flops(model, args, kwargs)
            rows, live = [], []
            for vname, dtype, build in variants(model, args, kwargs, dtypes, modes,
                                                compile_mode=a.compile_mode, backend_options=backend_options):
                row = {"model": name, "batch": b, "variant": vname, "gflops": flops / 1e9}
                harness.set_tf32(vname == "tf32")
                try:
                    fn, module = build()
                    row.update(_prepare(fn, module, device, ref, a.warmup))
                    live.append((row, fn))
                    print(f"  {vname:30s} ready, err {row['rel_l2']:.2e}", file=sys.stderr, flush=True)
                except Exception as exc:  # report and go on: one failing variant must not lose the run
                    row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500]
                    print(f"  {vname:30s} FAILED {row['error']}", file=sys.stderr, flush=True)
                    from rewriter.errors import RewriterError

                    if not isinstance(exc, RewriterError):  # ours say what is wrong; others need a trace
                        traceback.print_exc(limit=3, file=sys.stderr)
                finally:
                    fn = module = None
                    harness.set_tf32(False)
                rows.append(row)
            # one block of --iters calls per round, after _prepare's warm-up
            harness.round_robin(live, device=device, iters=a.iters, repeats=a.repeats)
            for row, _ in live:
                print(f"  {row['variant']:30s} {row['ms']:8.2f} ms  err {row['rel_l2']:.2e}", file=sys.stderr)
            live.clear()
            harness.free(device)
            _ratios(rows, flops, a.peak_tflops)
            results.extend(rows)
            del model, args, kwargs, ref
            if modes:
                _dynamo.reset()
            harness.free(device)
            if a.out:
                _write_json(a.out, device, a, results, argv)
    print(f"\ndevice: {harness.device_name(device)}, torch {torch.__version__}, "
          f"ceiling {a.peak_tflops:g} TFLOP/s")
    print("| model | batch | variant | ms | x fp32 | x autocast | TFLOP/s | % ceiling | rel. L2 vs fp32 | finite "
          "| peak MB | param MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda v, fmt="{:.2f}": "-" if v is None else fmt.format(v)
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | {r['batch']} | {r['variant']} | failed: {r['error'][:80]} |  |  |  |  |  |  |  |  |")
            continue
        print(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['ms']:.2f} | {f(r['vs_fp32'])} | "
              f"{f(r['vs_autocast'])} | {f(r['tflops'], '{:.3g}')} | {f(r['ceiling_frac'] and 100 * r['ceiling_frac'], '{:.3g}')} | "
              f"{r['rel_l2']:.1e} | {'yes' if r['finite'] else 'NO'} | {f(r['peak_mb'], '{:.0f}')} | {r['param_mb']:.0f} |")
    if a.out:
        _write_json(a.out, device, a, results, argv)
    plot_path = a.plot or (a.out.rsplit(".", 1)[0] + ".png" if a.out else None)
    if plot_path and results:
        if plot(results, plot_path):
            print(f"plot: {plot_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
