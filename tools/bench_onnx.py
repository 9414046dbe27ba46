"""ONNX Runtime side by side: rewriter's export vs onnxconverter-common fp16 vs the onnxruntime.transformers
optimizer (fp16 and fp32) vs a plain fp32 export, in one process, on BERT-base and GPT-2.

Every variant runs on the same inputs through one `ort_session` (CUDA EP with IO binding on a GPU, inputs
bound on the device once). Latency: synchronized wall time per run (ONNX Runtime returns when the outputs
are ready). Every variant's session is built and warmed up (--warmup runs) first; then --repeats rounds
time one block of --iters runs of each variant in turn, and each latency is the median of its blocks, so
the ratios compare variants measured side by side in time on a noisy shared machine. Error: relative L2
of the first output (last_hidden_state) against strict fp32 PyTorch (TF32 off), in float64. "casts": Cast nodes in the file.

Baselines get the export that suits them best: the TorchScript exporter on the eager-attention model
(the patterns the transformers optimizer fuses), falling back to torch.onnx's dynamo exporter. Ours:
rewriter.convert(precision=fp16) + rewriter.export_onnx(optimize=True) (and optimize=False), and with
overrides={"layer_norm": "fp16"} (ours-fp16-ln16: an fp16 residual stream, the optimizer's numerics).
A variant whose package is missing (onnxconverter-common, onnxruntime.transformers) reads 'n/a'.

    python -m tools.bench_onnx --device cuda --out bench_onnx.json        # BERT-base b32 s128, GPT-2 b8 s512
    python -m tools.bench_onnx --device cpu --small --out /tmp/smoke.json  # smoke run, tiny configs
    python -m tools.bench_onnx --device cuda --large --random-bias --out onnx_fp8.json \
        --variants ortopt-fp16,ours-fp16,ours-fp8-qdq,ours-fp8-gemmfloat8,ours-fp8-qdq-nofuse,ours-fp8-gemmfloat8-nofuse
        # BERT-large b32 s384, GPT-2 medium b8 s1024: our FP8 (Q/DQ, GemmFloat8) vs our fp16 vs the ORT optimizer
    python -m tools.bench_onnx --device cuda --profile --out bench_onnx.json  # + where the time goes

Progress: a line per variant as soon as it is ready ("ready after N s (convert, export_onnx, session,
warm-up)") and the model's shared phases (build, reference, fp32 export: only when a baseline variant needs
it, traced at batch 1); the JSON keeps them under "phases". --shape B,S replaces the default shape.

--profile: each variant also runs in a separate ONNX Runtime session with profiling on (a fresh process,
python -m tools.profile_onnx, with CUDA_LAUNCH_BLOCKING=1 on CUDA so node time includes the kernels): time per
op type and output dtype, and the 15 slowest nodes, printed and stored in the results under "profile".
Profiled times are for comparing variants, not latencies: synchronized launches add a few us per node.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch
import torch.nn as nn

from tools import harness

__all__ = ["main", "build"]

VARIANTS = ("fp32", "occ-fp16", "ortopt-fp16", "ortopt-fp32", "ours-fp16", "ours-fp16-fixed", "ours-fp16-nofuse",
            "ours-fp16-ln16",
            "ours-fp16-ln16-rpad", "ours-fp8-qdq", "ours-fp8-gemmfloat8", "ours-fp8-qdq-nofuse",
            "ours-fp8-gemmfloat8-nofuse")
# ours-fp8-*: rewriter.convert(precision="fp8", calibration=one other batch,
# fp8=Fp8Options(fused_quantization=True)) puts the GEMMs its cost model chooses in FP8 (static per-tensor
# scales); export_onnx writes them as QuantizeLinear/DequantizeLinear around fp32 Gemms ("qdq": every EP) or as com.microsoft.GemmFloat8 (cuBLASLt FP8 GEMM: CUDA EP on sm_89+ only); -nofuse:
# without ORT fusions (the bf16 fusions cannot be run on a CPU at export, only checked for precision).
# ours-fp16-ln16: rewriter.convert(precision="fp16", overrides={"layer_norm": "fp16"}): LayerNorm reads and
# writes fp16 (its kernels still compute the statistics in fp32), so the residual stream is fp16, as in the
# transformers optimizer's graphs; the default keeps it fp32 like autocast.
# ours-fp16-ln16-rpad: the same with export_onnx(assume_right_padding=True): attention reads the valid length
# of each row (ORT's 1-D mask_index, the optimizer's form; only correct for right-padded batches).
# ours-fp16-fixed: ours-fp16 exported with dynamic_sizes=False (the sequence length fixed at the benchmark's,
# as optimize=True exported before it kept the length symbolic): what a symbolic length costs, if anything.
_OVERRIDES = {"ours-fp16-ln16": {"layer_norm": "fp16"}, "ours-fp16-ln16-rpad": {"layer_norm": "fp16"}}


class _Hidden(nn.Module):
    """forward(input_ids, attention_mask) -> last_hidden_state: one output, the same for every variant."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _checkpoint_like(model: nn.Module) -> None:
    """Random biases and LayerNorm affine parameters, as in a trained checkpoint: random init leaves biases
    at zero and LayerNorm at (1, 0), which lets an export drop bias Adds a real model has."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + 0.05 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.02 * torch.randn(module.bias.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith("bias") and "LayerNorm" not in name and ".ln_" not in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def build(name: str, small: bool, random_bias: bool = False, large: bool = False, shape=None):
    """(sdpa model, eager-attention twin with the same weights, inputs dict, shape text, optimizer args).
    `shape`: (batch, sequence length) in place of the default one."""
    from transformers import BertModel, GPT2Model

    torch.manual_seed(0)
    if name not in ("bert", "gpt2"):
        raise SystemExit(f"unknown model {name!r}: use bert or gpt2")
    make = BertModel if name == "bert" else GPT2Model
    zoo = {"bert": "bert_large", "gpt2": "gpt2_medium"}[name] if large and not small else name
    cfg = harness.hf_config(zoo, small)
    b, s = harness.default_shape(zoo, small)
    if name == "gpt2" and small:
        b, s = 2, 64  # the smoke shape tests/backends/ were written against
    if shape:
        b, s = shape
    heads = cfg.num_attention_heads
    hidden = cfg.hidden_size
    model = _Hidden(make(cfg).eval()).eval()
    if random_bias:
        _checkpoint_like(model)
    eager = _Hidden(make(harness.hf_config(zoo, small, attn_implementation="eager")).eval()).eval()
    eager.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    vocab = model.model.config.vocab_size
    feeds = {"input_ids": torch.randint(0, vocab, (b, s), generator=g),
             "attention_mask": torch.ones(b, s, dtype=torch.long)}
    return model, eager, feeds, f"b{b} s{s}", {"model_type": name, "num_heads": heads, "hidden_size": hidden}


def _calibration_batch(model, feeds) -> dict:
    """Another batch of the same shape (FP8 static scales are calibrated on it, not on the timed inputs)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.model.config.vocab_size, tuple(feeds["input_ids"].shape), generator=g)
    return {"input_ids": ids, "attention_mask": feeds["attention_mask"]}


def _quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


_BASELINES = ("fp32", "occ-fp16", "ortopt-fp16", "ortopt-fp32")  # the variants made from the fp32 export


def _export_fp32(eager, feeds, path) -> str:
    """fp32 ONNX for the baselines: TorchScript exporter first, dynamo exporter if that fails.

    Traced on the first row only (the batch axis is dynamic, the sequence length stays the benchmark's):
    the TorchScript trace keeps every intermediate of the eager model, which at GPT-2 medium b8 s1024
    (8 x 16 heads x 1024 x 1024 fp32 attention scores per layer) went over 24 GiB and was killed."""
    args = (feeds["input_ids"][:1], feeds["attention_mask"][:1])
    axes = {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "last_hidden_state": {0: "batch"}}
    with _quiet():
        try:
            torch.onnx.export(eager, args, path, dynamo=False, opset_version=17,
                              input_names=["input_ids", "attention_mask"],
                              output_names=["last_hidden_state"], dynamic_axes=axes)
            return "torchscript"
        except Exception:
            batch = torch.export.Dim("batch")
            program = torch.onnx.export(eager, args, dynamo=True, opset_version=18,
                                        input_names=["input_ids", "attention_mask"],
                                        output_names=["last_hidden_state"],
                                        dynamic_shapes={"input_ids": {0: batch}, "attention_mask": {0: batch}})
            program.save(path)
            return "dynamo"


def _make_variant(label, ctx, workdir):
    """Write the variant's .onnx; returns (path, note)."""
    import onnx

    fp32_path = ctx.get("fp32_path")
    out = os.path.join(workdir, f"{ctx['name']}-{label}.onnx")
    if label == "fp32":
        return fp32_path, f"export: {ctx['exporter']}"
    if label == "occ-fp16":
        from onnxconverter_common import float16

        with _quiet():
            model = float16.convert_float_to_float16(onnx.load(fp32_path), keep_io_types=True)
        onnx.save(model, out)
        return out, "convert_float_to_float16(keep_io_types=True)"
    if label in ("ortopt-fp16", "ortopt-fp32"):
        from onnxruntime.transformers.optimizer import optimize_model

        with _quiet():
            opt = optimize_model(fp32_path, opt_level=0, use_gpu=True, **ctx["opt_args"])
            fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
            if label == "ortopt-fp16":
                opt.convert_float_to_float16(keep_io_types=True)
            opt.save_model_to_file(out)
        return out, "fused " + ", ".join(f"{k} {v}" for k, v in fused.items())
    if label.startswith("ours"):
        import rewriter
        from rewriter.backends.onnx import export_onnx
        from rewriter.passes.plan.fp8_cost import Fp8Options

        overrides, fp8 = _OVERRIDES.get(label), "fp8" in label
        key = "gm:fp8" if fp8 else f"gm:{sorted(overrides.items()) if overrides else ''}"
        if key not in ctx:
            # fused_quantization=True: ONNX Runtime quantizes an activation in one QuantizeLinear kernel, as
            # inductor does in the producer; the eager estimate (several kernels per quantization, ~130 us at
            # BERT-large's 12288x1024) kept all 120 GEMMs bf16 on the H200.
            extra = dict(precision="fp8", calibration=[ctx["calib"]], fp8=Fp8Options(fused_quantization=True)) \
                if fp8 else dict(precision="fp16", overrides=overrides)
            with _timed(ctx["phases"], f"{label}: convert"):
                ctx[key] = rewriter.convert(ctx["model"], (), dict(ctx["feeds"]), **extra)
        with _quiet(), _timed(ctx["phases"], f"{label}: export_onnx"):
            report = export_onnx(ctx[key], out, target="ort-cuda" if ctx["device"] == "cuda" else "ort-cpu",
                                 optimize=not label.endswith("nofuse"), assume_right_padding=label.endswith("rpad"),
                                 dynamic_sizes=not label.endswith("fixed"),
                                 fp8_gemm="com.microsoft" if "gemmfloat8" in label else "qdq")
        note = f"fused {report.fusions}" if report.fusions else "no fusion"
        if fp8:
            from rewriter import meta

            kept = ctx[key].meta.get(meta.FP8, {}).get("kept", {})
            note = f"{report.fp8_gemms.get('count', 0)} FP8 GEMMs ({len(kept)} kept bf16 by the cost model); " + note
        skipped = [n for n in report.fusion_notes if "skipped" in n or "not applied" in n]
        if skipped:
            note += "; " + "; ".join(n[:140] for n in skipped)
        if report.fallbacks:
            note += f"; {len(report.fallbacks)} fp32 fallbacks"
        return out, note
    raise ValueError(label)


@contextlib.contextmanager
def _timed(phases: dict, name: str):
    """Add the seconds the block takes to phases[name] (where a benchmark's minutes go, printed with it)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = round(phases.get(name, 0.0) + time.perf_counter() - start, 2)


def _warm(session, feeds, warmup) -> list:
    """Bind the inputs on the device once, run `warmup` times; the outputs of the last run."""
    session.bind(**feeds)
    for _ in range(max(1, warmup)):
        session.run_bound()
    return session.bound_outputs()


def _reference(model, feeds, device) -> np.ndarray:
    """Strict fp32 PyTorch output (TF32 off)."""
    dev = torch.device(device)
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            m = model.to(dev)
            out = m(**{k: v.to(dev) for k, v in feeds.items()})
            result = out.double().cpu().numpy()
        model.to("cpu")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    return result


def _profile(path, feeds_path, args) -> dict:
    """`python -m tools.profile_onnx` on one variant in a fresh process; its summary, or {"error": ...}."""
    out = path + ".profile.json"
    cmd = [sys.executable, "-m", "tools.profile_onnx", path, "--device", args.device, "--inputs", feeds_path,
           "--runs", str(args.profile_runs), "--warmup", str(max(2, min(args.warmup, 5))), "--json", out,
           "--quiet"]
    # the child imports `tools` from this checkout whatever the working directory
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    if args.device == "cuda":
        env["CUDA_LAUNCH_BLOCKING"] = "1"
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    except subprocess.TimeoutExpired:
        return {"error": "profiling took over 600 s"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()
        return {"error": tail[-1][:300] if tail else f"exit code {done.returncode}"}
    with open(out) as f:
        return json.load(f)


def _profile_table(name: str, profiles: dict, ops: int = 14) -> str:
    """Op types (the slowest across variants) x variants: profiled ms per run, dtypes of the biggest."""
    ok = {label: p for label, p in profiles.items() if "by_op" in p}
    if not ok:
        return ""
    total: dict = {}
    for p in ok.values():
        for op, v in p["by_op"].items():
            total[op] = max(total.get(op, 0.0), v["ms"])
    chosen = sorted(total, key=lambda op: -total[op])[:ops]
    short = {"float16": "f16", "float32": "f32", "bfloat16": "bf16", "int64": "i64", "bool": "b"}
    lines = [f"\n### {name}: profiled time per op type, ms per run ({next(iter(ok.values()))['source']} time)", "",
             "| op | " + " | ".join(ok) + " |", "|---|" + "---|" * len(ok)]
    for op in chosen:
        cells = []
        for p in ok.values():
            v = p["by_op"].get(op)
            if v is None:
                cells.append("-")
                continue
            dtypes = "/".join(short.get(d, d) for d in p["by_op_dtype"][op])
            cells.append(f"{v['ms']:.3f} ({v['count']} {dtypes})")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.append("| total | " + " | ".join(f"{p['total_ms']:.3f}" for p in ok.values()) + " |")
    for label, p in profiles.items():
        if "error" in p:
            lines.append(f"\n{label}: profiling failed ({p['error']})")
    return "\n".join(lines)


def run_model(name, args, workdir) -> dict:
    from rewriter.backends.onnx import count_casts, ort_session

    phases: dict = {}
    with _timed(phases, "build"):
        model, eager, feeds, shape, opt_args = build(name, args.small, args.random_bias, args.large, args.shape)
    ctx = {"name": name, "model": model, "feeds": feeds, "opt_args": opt_args, "phases": phases,
           "calib": _calibration_batch(model, feeds), "device": args.device}
    with _timed(phases, "reference"):
        ref = _reference(model, feeds, args.device if args.device == "cuda" and torch.cuda.is_available() else "cpu")
    if any(label in _BASELINES for label in args.variants):  # ours need no fp32 export
        ctx["fp32_path"] = os.path.join(workdir, f"{name}-fp32.onnx")
        with _timed(phases, "fp32 export (baselines)"):
            ctx["exporter"] = _export_fp32(eager, feeds, ctx["fp32_path"])
    del eager
    result = {"shape": shape, "variants": {}, "phases": phases}
    np_feeds = {k: v.numpy() for k, v in feeds.items()}
    feeds_path = os.path.join(workdir, f"{name}-feeds.npz")
    if args.profile:
        np.savez(feeds_path, **np_feeds)
        result["profile"] = {}
    live = []  # (label, row, session, feeds): every variant built first, then timed round-robin
    for label in args.variants:
        row = {"ms": None, "rel_l2": None, "casts": None, "note": ""}
        result["variants"][label] = row
        start = time.perf_counter()
        try:
            with _timed(phases, f"{label}: make"):
                path, row["note"] = _make_variant(label, ctx, workdir)
            row["casts"] = count_casts(path)
            with _timed(phases, f"{label}: session"):
                session = ort_session(path, device=args.device)
            names = set(session.input_names)
            bound = {k: v for k, v in np_feeds.items() if k in names}
            with _timed(phases, f"{label}: warm-up"):
                outs = _warm(session, bound, args.warmup)
            idx = session.output_names.index("last_hidden_state") if "last_hidden_state" in \
                session.output_names else 0
            row["rel_l2"] = harness.rel_l2(ref, outs[idx])
            if session.device == "cuda":
                row["provider"] = session.session.get_providers()[0]
            live.append((label, row, session, path))
        except ImportError as exc:
            row["note"] = f"n/a: {exc.name or exc} not installed"
        except Exception as exc:
            row["note"] = f"n/a: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            if args.verbose:
                traceback.print_exc()
        print(f"  {name} {label}: ready after {time.perf_counter() - start:.1f} s ({_phase_text(phases, label)})",
              file=sys.stderr, flush=True)
    print(f"  {name} phases: {_phase_text(phases, None)}", file=sys.stderr, flush=True)
    # one block of each variant in turn: drift lands on all of them. Wall clock (device "cpu"): ONNX
    # Runtime returns when the outputs are ready, on the CUDA EP too
    harness.round_robin([(row, session.run_bound) for _, row, session, _ in live], device="cpu",
                        iters=args.iters, repeats=args.repeats)
    paths = {label: path for label, _, _, path in live}
    del live
    for label, row in result["variants"].items():
        print(f"  {name} {label}: {row['ms'] if row['ms'] is None else round(row['ms'], 3)} ms, "
              f"err {row['rel_l2']}, casts {row['casts']}  {row['note'][:120]}", file=sys.stderr, flush=True)
        if not args.profile or row["ms"] is None:
            continue
        summary = result["profile"][label] = _profile(paths[label], feeds_path, args)
        if "by_op" in summary:
            from tools.profile_onnx import format_summary

            print(format_summary(summary, f"{name} {label}", ops=10, nodes=15 if args.verbose else 5),
                  file=sys.stderr, flush=True)
        else:
            print(f"  {name} {label}: profiling failed ({summary.get('error')})", file=sys.stderr, flush=True)
    return result


def _phase_text(phases: dict, label: str | None) -> str:
    """The phases of one variant ("export_onnx 12.3 s, ..."), or with label None those of no variant."""
    if label is None:
        return ", ".join(f"{k} {v:.1f} s" for k, v in phases.items() if ": " not in k)
    prefix = f"{label}: "
    return ", ".join(f"{k[len(prefix):]} {v:.1f} s" for k, v in phases.items() if k.startswith(prefix))


def _table(results: dict) -> str:
    lines = []
    for name, res in results["models"].items():
        lines += [f"\n### {name} {res['shape']} ({results['device']}, {results['onnxruntime']})", "",
                  "| variant | ms | Cast nodes | rel. L2 error vs strict fp32 | notes |", "|---|---|---|---|---|"]
        for label, row in res["variants"].items():
            ms = "n/a" if row["ms"] is None else f"{row['ms']:.3f}"
            err = "n/a" if row["rel_l2"] is None else f"{row['rel_l2']:.1e}"
            casts = "n/a" if row["casts"] is None else str(row["casts"])
            lines.append(f"| {label} | {ms} | {casts} | {err} | {row['note'][:160]} |")
        if res.get("profile"):
            lines.append(_profile_table(name, res["profile"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_onnx", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="bert,gpt2")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--small", action="store_true", help="tiny configs for a CPU smoke run")
    p.add_argument("--large", action="store_true", help="BERT-large b32 s384 and GPT-2 medium b8 s1024")
    p.add_argument("--shape", default=None, metavar="B,S",
                   help="batch and sequence length in place of the default ones (e.g. 1,1024)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None, help="keep the .onnx files here (default: a temp folder)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--verbose", action="store_true",
                   help="print tracebacks of failed variants (and the 15 slowest nodes with --profile)")
    p.add_argument("--random-bias", action="store_true",
                   help="random biases and LayerNorm parameters (checkpoint-like; random init has zero biases)")
    p.add_argument("--profile", action="store_true",
                   help="also profile each variant with ONNX Runtime: time by op type, dtype and node")
    p.add_argument("--profile-runs", type=int, default=None,
                   help="profiled runs per variant (default 20; 5 with --small)")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if args.shape:
        try:
            args.shape = tuple(int(v) for v in args.shape.split(","))
            if len(args.shape) != 2 or min(args.shape) < 1:
                raise ValueError
        except ValueError:
            p.error(f"--shape {args.shape!r}: write the batch and the sequence length, e.g. 8,1024")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {','.join(VARIANTS)}")
    if args.small and args.warmup == 10 and args.iters == 30:
        args.warmup, args.iters, args.repeats = 2, 5, 3
    if args.profile_runs is None:
        args.profile_runs = 5 if args.small else 20

    import onnxruntime

    ort = harness.package_version("onnxruntime-gpu", "onnxruntime") or f"onnxruntime {onnxruntime.__version__}"
    results = {"device": args.device, "onnxruntime": ort, "large": args.large, "torch": torch.__version__,
               "python": platform.python_version(), "small": args.small, "random_bias": args.random_bias,
               "timing": f"round-robin: median of {args.repeats} blocks of {args.iters} runs per variant, "
                         f"after {args.warmup} warm-up runs, synchronized",
               "providers": onnxruntime.get_available_providers(), "models": {}}
    if args.device == "cuda" and torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name()
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or stack.enter_context(tempfile.TemporaryDirectory())
        os.makedirs(workdir, exist_ok=True)
        for name in [m for m in args.models.split(",") if m]:
            results["models"][name] = run_model(name, args, workdir)
    print(_table(results))
    if args.out:
        harness.write_json(args.out, results, device=args.device, argv=argv, module="tools.bench_onnx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
