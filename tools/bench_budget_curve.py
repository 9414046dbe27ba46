"""Error vs latency under an accuracy budget: ours compiled at several tolerances, against autocast +
compile and compile(model.to(bf16)).

For each model, autocast's error against strict fp32 (TF32 off) is measured on the calibration batches
(max over batches, relative L2 over every floating output, as the sensitivity search measures it). Each
budget is a multiple of it ("2x": tolerance = 2 * that error; "none": no tolerance, the default policy),
and ours is converted with that tolerance and the calibration batches (sensitivity keeps nodes fp32,
budget_lowering lowers the policy's fp32 norms and residual adds where the budget allows), then
compiled (backend="compile"). Errors are measured on held-out batches the search never saw; latency is
timed round-robin in one process (rewriter.measure.round_robin) on the zoo's example input. Every model
and budget is compiled once. Models come from tools/bench_zoo.py (`llama6`: hidden 1024, GQA 16/4,
b8 s512; `bert`: BERT-base, b32 s128), built with use_cache=False; `--tiny` builds tiny configs of the
same architectures for CPU smoke runs. Ours is converted with static=True unless --dynamic.

    python -m tools.bench_budget_curve --device cuda --models llama6,bert --budgets none,1x,2x,4x \\
        --out tools/results/budget_curve_h200.json
    python -m tools.bench_budget_curve --device cpu --tiny --compiler eager --repeats 1   # smoke test

Columns: ms (median), x_ac = autocast+compile ms / ms, x_bf16 = compile(model.to(bf16)) ms / ms,
err (held-out, vs strict fp32), err/ac = err / autocast's held-out error, lowered / kept = nodes
budget_lowering lowered and sensitivity kept fp32.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback

import torch
import torch.utils._pytree as pytree

import rewriter
from rewriter import measure, meta
from tools import bench_zoo, harness

__all__ = ["TINY", "build", "resample", "run_model", "main"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _tiny_llama():
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    ids = torch.randint(0, 128, (2, 16))
    return LlamaModel(cfg), (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    ids = torch.randint(0, 100, (2, 16))
    return BertModel(cfg), (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


TINY = {"llama6": _tiny_llama, "bert": _tiny_bert}


def build(name: str, tiny: bool = False):
    """(model in eval mode without a KV cache, args, kwargs) on the CPU: the zoo's entry or its tiny twin."""
    if tiny:
        torch.manual_seed(0)
        model, args, kwargs = TINY[name]()
        model = model.eval()
    else:
        model, args, kwargs = bench_zoo.build(name)
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False  # the error and the budget are about the hidden states
    return model, args, kwargs


def resample(value, seed: int):
    """Inputs of the same shapes and kinds: integer tensors (token ids) redrawn in [0, their max], float
    tensors redrawn from a normal distribution, all-ones masks kept."""
    gen = torch.Generator().manual_seed(seed)

    def one(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_floating_point():
            return torch.randn(t.shape, generator=gen).to(t.dtype)
        if t.dtype in (torch.int64, torch.int32) and int(t.min()) != int(t.max()):
            return torch.randint(0, int(t.max()) + 1, t.shape, generator=gen).to(t.dtype)
        return t.clone()
    return pytree.tree_map(one, value)


def _to(value, device):
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, value)


def _error(refs, outs) -> float:
    """Max over batches of the relative L2 error over every floating output (the search's metric)."""
    return max(measure.compare(r, o).rel_l2 for r, o in zip(refs, outs))


def _budgets(text: str) -> list[tuple[str, float | None]]:
    out = []
    for item in (b.strip() for b in text.split(",") if b.strip()):
        if item == "none":
            out.append((item, None))
            continue
        try:
            out.append((item, float(item.rstrip("x"))))
        except ValueError:
            raise SystemExit(f"--budgets: {item!r} is not 'none' or a multiple such as '2x'") from None
    return out


def run_model(name: str, device: torch.device, budgets: list[tuple[str, float | None]], *, dtype: str,
              tiny: bool, compiler: str, calibration: int, held_out: int, warmup: int, repeats: int,
              iters: int, static: bool) -> tuple[list[dict], list[dict]]:
    """(rows, one per budget; references: autocast+compile and compile(model.to)) for one model."""
    low = _DTYPES[dtype]
    model, args, kwargs = build(name, tiny)
    model = model.to(device)
    example = _to((args, kwargs), device)
    calib = [_to(resample((args, kwargs), 1 + i), device) for i in range(calibration)]
    held = [_to(resample((args, kwargs), 1000 + i), device) for i in range(held_out)]

    def autocast_call(*a, **k):
        with torch.autocast(device.type, dtype=low):
            return model(*a, **k)

    with torch.no_grad():
        ref_calib = [model(*a, **k) for a, k in calib]
        ref_held = [model(*a, **k) for a, k in held]
        ac_calib = _error(ref_calib, [autocast_call(*a, **k) for a, k in calib])
    blanket_model = copy.deepcopy(model).to(low)
    references = {
        "autocast+compile": torch.compile(autocast_call, backend=compiler),
        "compile(model.to)": torch.compile(blanket_model, backend=compiler),
    }
    casts = {"compile(model.to)": lambda v: bench_zoo._cast_floats(v, low)}
    ours: dict[str, torch.nn.Module] = {}
    info: dict[str, dict] = {}
    for label, multiple in budgets:
        tolerance = None if multiple is None else multiple * ac_calib
        start = time.perf_counter()
        options = dict(precision=dtype, backend="compile", backend_options={"compiler": compiler},
                       static=static)
        if tolerance is not None:
            # a batch is a dict of keyword inputs or a tuple of positional ones (the zoo's have one kind)
            options.update(calibration=[k if not a else tuple(a) for a, k in calib], tolerance=tolerance)
        fast = rewriter.convert(model, example[0], example[1], **options)
        summary = rewriter.graph_module_of(fast).meta.get(meta.CALIBRATION, {})
        info[label] = {"tolerance": tolerance, "convert_s": round(time.perf_counter() - start, 2),
                       "kept": len((summary.get("sensitivity") or {}).get("kept") or []),
                       "lowered": len((summary.get("lowering") or {}).get("lowered") or []),
                       "search_error": (summary.get("lowering") or summary.get("sensitivity") or {}).get("error")}
        graph_info = rewriter.graph_module_of(fast).meta.get(meta.INFO) or {}
        info[label].update(capture=graph_info.get("capture"), notes=list(graph_info.get("notes") or [])[:5])
        ours[f"ours@{label}"] = fast
    variants = {**references, **ours}
    errors = {}
    with torch.no_grad():
        for key, fn in variants.items():  # the first call compiles
            cast = casts.get(key, lambda v: v)
            errors[key] = _error(ref_held, [fn(*a, **k) for a, k in (cast(b) for b in held)])
        # Where a compiled error goes wrong, these say whether the graph or its compile is at fault, and
        # whether only inputs other than the capture's example are (H200 2026-12-03: llama6 read 1.27).
        ref_example = model(*example[0], **example[1])
        for label, _ in budgets:
            fast = ours[f"ours@{label}"]
            eager_graph = rewriter.graph_module_of(fast)
            info[label]["err_eager_graph"] = _error(ref_held, [eager_graph(*a, **k) for a, k in held])
            info[label]["err_example"] = _error([ref_example], [fast(*example[0], **example[1])])
    timed = {}
    for key, fn in variants.items():
        a, k = casts.get(key, lambda v: v)(example)
        timed[key] = lambda f=fn, a=a, k=k: f(*a, **k)
    times = measure.round_robin(timed, device=device, warmup=warmup, repeats=repeats, iters=iters)
    ms = {k: round(t.median_ms, 4) for k, t in times.items()}
    err_ac = errors["autocast+compile"]
    refs = [{"model": name, "variant": key, "ms": ms[key], "err": errors[key]} for key in references]
    rows = []
    for label, _ in budgets:
        key = f"ours@{label}"
        rows.append({"model": name, "budget": label, "static": static, **info[label], "ms": ms[key],
                     "err": errors[key],
                     "autocast_calib_err": ac_calib,
                     "x_autocast_compile": round(ms["autocast+compile"] / ms[key], 3),
                     "x_compile_blanket": round(ms["compile(model.to)"] / ms[key], 3),
                     "err_vs_autocast": round(errors[key] / err_ac, 3) if err_ac > 0 else None})
    del variants, ours, references, blanket_model
    harness.free(device)
    return rows, refs


def _table(rows: list[dict], refs: list[dict]) -> str:
    lines = [f"{'model':8s} {'variant':18s} {'tolerance':>9s} {'ms':>9s} {'x_ac':>6s} {'x_bf16':>6s} "
             f"{'err':>9s} {'err/ac':>6s} {'lowered':>7s} {'kept':>5s}"]
    for r in refs:
        lines.append(f"{r['model']:8s} {r['variant']:18s} {'':>9s} {r['ms']:9.3f} {'':>6s} {'':>6s} "
                     f"{r['err']:9.2e}")
    for r in rows:
        tol = "-" if r["tolerance"] is None else f"{r['tolerance']:.2e}"
        ratio = "-" if r["err_vs_autocast"] is None else f"{r['err_vs_autocast']:.2f}"
        lines.append(f"{r['model']:8s} {'ours@' + r['budget']:18s} {tol:>9s} {r['ms']:9.3f} "
                     f"{r['x_autocast_compile']:6.2f} {r['x_compile_blanket']:6.2f} {r['err']:9.2e} "
                     f"{ratio:>6s} {r['lowered']:7d} {r['kept']:5d}")
    for r in rows:  # a compiled error far from its eager graph's: the compile, not the plan, is at fault
        eager, example = r.get("err_eager_graph"), r.get("err_example")
        if eager is not None and r["err"] > 1.5 * eager + 1e-6:
            lines.append(f"  ! {r['model']} ours@{r['budget']}: compiled {r['err']:.2e} on held-out inputs, its "
                         f"eager graph {eager:.2e}, compiled on the example {example:.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_budget_curve",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="llama6,bert")
    parser.add_argument("--budgets", default="none,1x,1.25x,2x,4x",
                        help="'none' (no tolerance) or multiples of autocast's calibration error, e.g. 2x")
    parser.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    parser.add_argument("--tiny", action="store_true", help="tiny configs of the same architectures (CPU)")
    parser.add_argument("--compiler", default="inductor", help="torch.compile backend (eager: smoke tests)")
    parser.add_argument("--calibration", type=int, default=3, help="calibration batches")
    parser.add_argument("--held-out", type=int, default=2, help="held-out batches for the errors")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--iters", type=int, default=5, help="calls per timed block")
    parser.add_argument("--dynamic", action="store_true",
                        help="convert with dynamic shapes (default static=True: every variant is specialised "
                             "on the example shapes, as torch.compile(model) is on its first call)")
    parser.add_argument("--out", help="JSON file (rewritten after each model)")
    args = parser.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    known = TINY if args.tiny else bench_zoo.MODELS
    unknown = [m for m in names if m not in known]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(known)}")
    budgets = _budgets(args.budgets)
    if not budgets:
        parser.error("--budgets is empty: give e.g. none,1x,2x")
    device = torch.device(args.device)
    bench_zoo._strict_fp32()
    rows, refs, failures = [], [], []
    for name in names:
        try:
            got, ref = run_model(name, device, budgets, dtype=args.dtype, tiny=args.tiny, compiler=args.compiler,
                                 calibration=args.calibration, held_out=args.held_out, warmup=args.warmup,
                                 repeats=args.repeats, iters=args.iters, static=not args.dynamic)
            rows += got
            refs += ref
        except Exception as exc:  # one model's failure is a record, not the end of the run
            failures.append({"model": name, "error": f"{type(exc).__name__}: {exc}"[:2000],
                             "trace": traceback.format_exc()[-3000:]})
            print(f"{name} FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        if args.out:
            harness.write_json(args.out, {"rows": rows, "references": refs, "failures": failures},
                               device=device, argv=argv, module="tools.bench_budget_curve")
    print(_table(rows, refs))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
