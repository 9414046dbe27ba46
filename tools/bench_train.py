"""Training step time and loss curves: fp32 vs TF32 vs autocast(+GradScaler) vs rewriter mode="train".

One training step = zero_grad, forward with the loss inside the model, backward, AdamW step (fused on
CUDA), with loss scaling for fp16 (torch.amp.GradScaler for autocast, rewriter.loss_scale for ours).
"rewriter fp8" is ours with precision="fp8": FP8 training GEMMs (e4m3 forward, e5m2 gradients, fp32
master weights; rewriter/runtime/fp8_train_ops.py) where the cost model says they pay, bf16 elsewhere;
its compiled variant is judged with Fp8Options(fused_quantization=True), and --fp8-always rewrites every
eligible GEMM whatever the estimate. Its rows add "fp8_gemms" (rewritten / judged) and the speed-up over
ours bf16 in the same mode. Models are built from their configs with random weights (no download):

  bert         BertForMaskedLM (BERT-base: 12 layers, 768 wide), 15 % of tokens masked, batch 32 x 128
  gpt2         GPT2LMHeadModel (GPT-2 small: 12 layers, 768 wide), next-token loss, batch 8 x 512
  gpt2_medium  GPT2LMHeadModel (GPT-2 medium: 24 layers, 1024 wide), next-token loss, batch 8 x 1024
  llama_mlp    Llama-style MLP (tools/harness.py: hidden 4096, gate/up 14336, SiLU), MSE to a random
               target, batch 8 x 1024

Every variant starts from the same initial weights and sees the same batches and dropout masks (the
seed is set before each step), so its first --curve-steps losses can be compared with fp32's line by
line. Step time: median over --repeats blocks of --iters steps after --warmup steps, timed with CUDA
events around synchronised blocks (wall clock on CPU). All variants stay alive and their blocks are
timed round-robin, so machine noise spreads over every variant instead of landing on one.

    python -m tools.bench_train --device cuda --out out/bench_train.json     # H100: the real numbers
    python -m tools.bench_train --device cuda --compile                      # + torch.compile variants
    python -m tools.bench_train --device cuda --compile --models llama_mlp,gpt2_medium --variants bf16,fp8
    python -m tools.bench_train --device cpu --small                         # smoke run, no GPU
    python -m tools.bench_train --device cuda --compile --fp8-always --adaptive --observe-every 1,10 \
        --models llama_mlp --variants "fp8 + compile,fp8 adaptive + compile,fp8 adaptive 1/10 + compile"
                                                                             # adaptive FP8's overhead
The compiled adaptive variants warm up until every step kind (bare, observed, sampled: one graph each) has
run, and their rows report "compiled_graphs" and the timeline's configurations: none is compiled while timed.
"""
from __future__ import annotations

import argparse
import gc
import copy
import dataclasses
import itertools
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import rewriter
from rewriter import meta
from rewriter.loss_scale import make_scaler
from rewriter.passes.plan.fp8_cost import Fp8Options
from tools import harness

__all__ = ["WithLoss", "MSELoss", "build", "VARIANTS", "bench_model", "main"]

MODELS = ("bert", "gpt2", "gpt2_medium", "llama_mlp")

TARGET = 1.1  # the target: ours at least 1.1x faster than autocast at equal loss curves


class WithLoss(nn.Module):
    """A Hugging Face LM head model called as `loss = model(input_ids, labels)`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels):
        return self.model(input_ids=input_ids, labels=labels).loss


class MSELoss(nn.Module):
    """A model called as `loss = model(x, target)`: mean squared error of model(x)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, target):
        return F.mse_loss(self.model(x), target)


def build(name: str, small: bool, device: torch.device, batch: int | None = None, seq: int | None = None,
          n_batches: int = 4, seed: int = 0):
    """(model on device in train mode, list of input batches) for a name of MODELS: (input_ids, labels)
    for the language models, (x, target) for llama_mlp."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
    b, s = harness.default_shape(name, small)
    b, s = batch or b, seq or s
    if name == "llama_mlp":
        model = harness.llama_mlp(small)
        hidden = model.gate_proj.in_features
        batches = [tuple(torch.randn(b, s, hidden, generator=g).to(device) for _ in range(2))
                   for _ in range(n_batches)]
        return MSELoss(model).to(device).train(), batches
    from transformers import BertForMaskedLM, GPT2LMHeadModel

    cfg = harness.hf_config(name, small)
    model = (BertForMaskedLM if name == "bert" else GPT2LMHeadModel)(cfg)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
        if name == "bert":  # MLM: 15 % of positions masked and predicted, the rest ignored
            masked = torch.rand(b, s, generator=g) < 0.15
            labels = torch.where(masked, ids, torch.full_like(ids, -100))
            ids = torch.where(masked, torch.full_like(ids, 103), ids)  # [MASK]
        else:
            labels = ids.clone()
        batches.append((ids.to(device), labels.to(device)))
    return WithLoss(model).to(device).train(), batches


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    kind: str                    # "eager" | "autocast" | "ours"
    dtype: torch.dtype | None    # compute dtype of autocast / ours
    tf32: bool = False
    compile: bool = False
    fp8: bool = False            # ours with precision="fp8" (bf16 islands, FP8 training GEMMs)
    adaptive: bool = False       # fp8 + rewriter.AdaptivePrecision (per-layer statistics and switch)
    observe_every: int = 1       # the adaptive controller observes one step in this many


VARIANTS = [
    Variant("fp32", "eager", None),
    Variant("tf32", "eager", None, tf32=True),
    Variant("autocast fp16 + GradScaler", "autocast", torch.float16),
    Variant("autocast bf16", "autocast", torch.bfloat16),
    Variant("rewriter fp16 + LossScaler", "ours", torch.float16),
    Variant("rewriter bf16", "ours", torch.bfloat16),
    Variant("rewriter fp8", "ours", torch.bfloat16, fp8=True),
]


ADAPTIVE = Variant("rewriter fp8 adaptive", "ours", torch.bfloat16, fp8=True, adaptive=True)


def _adaptive_variants(observe: str) -> list[Variant]:
    """One adaptive variant per K of --observe-every (comma-separated): 'rewriter fp8 adaptive' for K = 1,
    'rewriter fp8 adaptive 1/K' for the others, so one run times all of them round-robin."""
    try:
        ks = sorted({int(k) for k in str(observe).split(",") if k.strip()})
    except ValueError:
        raise SystemExit(f"--observe-every {observe!r}: give whole numbers, e.g. 1 or 1,10") from None
    if not ks or min(ks) < 1:
        raise SystemExit(f"--observe-every {observe!r}: give whole numbers >= 1, e.g. 1 or 1,10")
    return [dataclasses.replace(ADAPTIVE, name=ADAPTIVE.name + ("" if k == 1 else f" 1/{k}"), observe_every=k)
            for k in ks]


def _compiled(v: Variant) -> Variant:
    return dataclasses.replace(v, name=v.name + " + compile", compile=True)


def _make_step(v: Variant, model: nn.Module, example: tuple, device: torch.device,
               lr: float, fp8_always: bool = False) -> tuple[Callable, dict]:
    """step(batch) -> loss tensor, and what was built (conversion time, scaler, FP8 GEMMs)."""
    info: dict = {}
    short = "fp8" if v.fp8 else {torch.float16: "fp16", torch.bfloat16: "bf16", None: "fp32"}[v.dtype]
    if v.kind == "ours":
        t0 = time.perf_counter()
        fp8 = None
        if v.fp8:  # judged for the mode it runs in: compiled quantization is fused into its producer
            fp8 = (Fp8Options.always if fp8_always else Fp8Options)(fused_quantization=v.compile)
        model = rewriter.convert(model, example, precision=short, mode="train", fp8=fp8)
        info["convert_s"] = time.perf_counter() - t0
        if v.fp8:
            records = [meta.get(n, meta.FP8) for n in model.graph.nodes if meta.get(n, meta.FP8)]
            info["fp8_gemms"] = f"{sum(r['use'] for r in records)}/{len(records)}"
    controller = rewriter.AdaptivePrecision(model, observe_every=v.observe_every) if v.adaptive else None
    if controller is not None:
        info["controller"] = controller
        info["steps_to_every_variant"] = (controller.sample_every or 0) + controller.observe_every + 1
    run = torch.compile(model) if v.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda")
    if v.kind == "autocast" and v.dtype == torch.float16:
        scaler = torch.amp.GradScaler(device.type)
    elif v.kind == "ours":
        scaler = make_scaler(model, device=device)
    else:
        scaler = None
    info["scaler"] = repr(scaler) if scaler is not None else "none"

    def step(batch):
        opt.zero_grad(set_to_none=True)
        if v.kind == "autocast":
            with torch.autocast(device.type, dtype=v.dtype):
                loss = run(*batch)
        else:
            loss = run(*batch)
        if isinstance(scaler, torch.amp.GradScaler):
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        elif scaler is not None:  # rewriter.loss_scale.LossScaler (a pass-through for bf16)
            scaler.backward(loss)
            scaler.step(opt)
        else:
            loss.backward()
            opt.step()
        if controller is not None:
            controller.step()
        return loss

    info["model"] = model
    info["scaler_obj"] = scaler
    return step, info


def _cycling(step, batches) -> Callable[[], torch.Tensor]:
    """A call of `step` on the next batch (round and round), for timing blocks of steps."""
    index = itertools.count()
    return lambda: step(batches[next(index) % len(batches)])


def _print_kernels(name: str, step, batch, device: torch.device, top: int) -> None:
    """The `top` kernels of one training step (tools/profile_kernels.py), to see where the time goes."""
    from tools.profile_kernels import kernel_table

    total, rows = kernel_table(lambda: step(batch), device, steps=3, grad=True)
    print(f"  {name}: {total / 1e3:.2f} ms of kernels per step, {len(rows)} kinds", file=sys.stderr)
    for kname, us, n in rows[:top]:
        print(f"    {us:9.1f} us  x{n:<4d} {kname[:100]}", file=sys.stderr)


def bench_model(name: str, args, variants: list[Variant]) -> dict:
    """Build every variant (loss curve first), then time them in interleaved blocks.

    The device CPU and GPU are shared and noisy, and a training step is partly CPU-bound, so timing one
    variant after another lets drift land on a single variant. Blocks of --iters steps are therefore
    taken round-robin (v1, v2, ..., v1, v2, ...) --repeats times, and each variant's median is used:
    the ratios compare steps measured side by side in time.
    """
    device = torch.device(args.device)
    base, batches = build(name, args.small, device, args.batch, args.seq, seed=args.seed)
    init = {k: v.detach().clone() for k, v in base.state_dict().items()}
    rows, live = [], []
    for v in variants:
        if v.kind == "autocast" and v.dtype == torch.bfloat16 and device.type == "cuda" \
                and not torch.cuda.is_bf16_supported():
            continue
        print(f"[bench_train] {name}: {v.name}", file=sys.stderr, flush=True)
        harness.set_tf32(v.tf32)
        row = {"variant": v.name}
        try:
            # each variant trains its own copy from the same initial weights
            model = copy.deepcopy(base)
            model.load_state_dict(init)
            step, info = _make_step(v, model, batches[0], device, args.lr, args.fp8_always)
            losses, t0 = [], time.perf_counter()
            for s in range(args.curve_steps):  # the loss curve: same batches, same dropout masks
                torch.manual_seed(args.seed + s)
                losses.append(float(step(batches[s % len(batches)])))
            # an adaptive variant compiles one graph per step kind (bare, observed, sampled): warm up until
            # each has run, so that no compilation lands in the timed blocks
            for i in range(max(args.warmup, info.get("steps_to_every_variant", 0) - args.curve_steps)):
                step(batches[i % len(batches)])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            # the untimed steps, compilations included (a compiled variant's compile cost shows here)
            row.update(losses=losses, convert_s=info.get("convert_s"), scaler=info["scaler"],
                       untimed_steps_s=time.perf_counter() - t0)
            if "fp8_gemms" in info:
                row["fp8_gemms"] = info["fp8_gemms"]
            live.append((v, row, step, info))
        except Exception as exc:  # report and go on with the other variants
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            print(f"  failed: {row['error']}", file=sys.stderr)
        rows.append(row)
    harness.set_tf32(False)

    def progress(i: int) -> None:
        print(f"[bench_train] {name}: timing round {i + 1}/{args.repeats}", file=sys.stderr, flush=True)

    graphs_before = _dynamo_graphs()
    # The compiles leave a large Python heap: a full collection in a timed block cost one block ~70 ms
    # (H200, 2026-12-03, whichever variant it hit). Frozen objects are never scanned again.
    gc.collect()
    gc.freeze()
    harness.round_robin([(row, _cycling(step, batches)) for v, row, step, info in live], device=device,
                        iters=args.iters, repeats=args.repeats, key="step_ms", no_grad=False, on_round=progress)
    compiled_while_timed = _dynamo_graphs() - graphs_before  # 0: no variant recompiled in the timed blocks
    for v, row, step, info in live:
        if "controller" in info:
            tl = info["controller"].timeline()
            row["adaptive"] = {"switches": len(tl["events"]), "configurations": tl["configurations"],
                               "refused": len(tl["refused"]), "steps": tl["steps"]}
    for v, row, step, info in live:
        scaler = info.get("scaler_obj")
        row["scale_history"] = (getattr(scaler, "history", None)
                                or ([(0, float(scaler.get_scale()))]
                                    if isinstance(scaler, torch.amp.GradScaler) else None))
        if args.profile:
            harness.set_tf32(v.tf32)
            _print_kernels(v.name, step, batches[0], device, args.profile)
    harness.set_tf32(False)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
        print(f"[bench_train] {name}: peak memory of all variants alive together {peak:.1f} GiB",
              file=sys.stderr)
    live.clear()
    harness.free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _compare(rows)
    from torch._dynamo.utils import counters

    return {"model": name, "batch": list(batches[0][0].shape), "rows": rows,
            "graphs_compiled_while_timed": compiled_while_timed,
            "graph_breaks_so_far": int(sum(counters["graph_break"].values()))}


def _dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _compare(rows: list[dict]) -> None:
    """Speed-ups and loss-curve deviations: against fp32, and ours against autocast of its dtype."""
    ok = [r for r in rows if "error" not in r]
    fp32 = next((r for r in ok if r["variant"] == "fp32"), None)
    by_name = {r["variant"]: r for r in ok}
    for r in ok:
        if fp32 is not None:
            r["speedup_vs_fp32"] = fp32["step_ms"] / r["step_ms"]
            r["max_rel_loss_dev_vs_fp32"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], fp32["losses"]))
        if r["variant"].startswith("rewriter"):
            dtype = "fp16" if "fp16" in r["variant"] else "bf16"
            suffix = " + compile" if r["variant"].endswith("+ compile") else ""
            amp = by_name.get(("autocast fp16 + GradScaler" if dtype == "fp16" else "autocast bf16") + suffix)
            if amp is not None:
                r["speedup_vs_autocast"] = amp["step_ms"] / r["step_ms"]
                r["max_rel_loss_dev_vs_autocast"] = max(abs(a - b) / abs(b)
                                                        for a, b in zip(r["losses"], amp["losses"]))
                r["meets_target"] = r["speedup_vs_autocast"] >= TARGET
            ours_bf16 = by_name.get("rewriter bf16" + suffix)
            if "fp8" in r["variant"] and ours_bf16 is not None:
                r["speedup_vs_ours_bf16"] = ours_bf16["step_ms"] / r["step_ms"]
            static = by_name.get("rewriter fp8" + suffix)
            if "adaptive" in r["variant"] and static is not None:  # the statistics' cost (issue 21: <= 3%)
                r["overhead_vs_static_fp8"] = r["step_ms"] / static["step_ms"] - 1


def _table(result: dict) -> str:
    lines = [f"== {result['model']} (batch {result['batch']}; graphs compiled while timed: "
             f"{result.get('graphs_compiled_while_timed', 0)}, graph breaks in the process so far: "
             f"{result.get('graph_breaks_so_far', 0)})",
             f"  {'variant':32s} {'step ms':>9s} {'vs fp32':>8s} {'vs amp':>7s} {'loss[0]':>8s} "
             f"{'loss[-1]':>9s} {'dev fp32':>9s} {'dev amp':>8s}"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"  {r['variant']:32s} failed: {r['error']}")
            continue
        amp = r.get("speedup_vs_autocast")
        dev_amp = r.get("max_rel_loss_dev_vs_autocast")
        lines.append(
            f"  {r['variant']:32s} {r['step_ms']:9.2f} {r.get('speedup_vs_fp32', float('nan')):7.2f}x "
            f"{(f'{amp:6.2f}x' if amp else '      -')} {r['losses'][0]:8.4f} {r['losses'][-1]:9.4f} "
            f"{100 * r.get('max_rel_loss_dev_vs_fp32', float('nan')):8.3f}% "
            f"{(f'{100 * dev_amp:7.3f}%' if dev_amp is not None else '       -')}")
    for r in result["rows"]:
        if "speedup_vs_ours_bf16" in r:
            lines.append(f"  {r['variant']}: {r['speedup_vs_ours_bf16']:.2f}x ours bf16, FP8 GEMMs "
                         f"{r['fp8_gemms']}")
    for r in result["rows"]:
        if "overhead_vs_static_fp8" in r:
            lines.append(f"  {r['variant']}: step time {100 * r['overhead_vs_static_fp8']:+.1f}% vs static FP8 "
                         "(the adaptive statistics' overhead; issue 21 asks <= 3%)")
    for r in result["rows"]:
        if "meets_target" in r:
            lines.append(f"  target ours >= {TARGET}x autocast: {r['variant']}: {r['speedup_vs_autocast']:.2f}x "
                         f"-> {'met' if r['meets_target'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="bert,gpt2", help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--small", action="store_true", help="tiny configs for a CPU smoke run")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--curve-steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=None, help="default 10 (small: 1)")
    parser.add_argument("--iters", type=int, default=None, help="steps per timed block, default 10 (small: 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed blocks, default 5 (small: 2)")
    parser.add_argument("--variants", default="", help="comma-separated substrings to keep, e.g. 'fp32,fp16'")
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd autocast and ours")
    parser.add_argument("--fp8-always", action="store_true",
                        help="rewriter fp8: every eligible GEMM in FP8, whatever the cost model estimates")
    parser.add_argument("--adaptive", action="store_true",
                        help="add 'rewriter fp8 adaptive' (AdaptivePrecision: statistics + per-layer switch), "
                             "compiled too with --compile; compare it with 'rewriter fp8' for the overhead")
    parser.add_argument("--observe-every", default="1", metavar="K[,K...]",
                        help="the adaptive variant observes one step in K (AdaptivePrecision(observe_every=K)); "
                             "several, e.g. 1,10: one adaptive variant each, timed in the same rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N kernels that take the most time in one step of each variant")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 10)
    args.iters = args.iters or (2 if args.small else 10)
    args.repeats = args.repeats or (2 if args.small else 5)
    if args.small and args.curve_steps == 20:
        args.curve_steps = 5
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu --small for a smoke run")
    variants = list(VARIANTS) + (_adaptive_variants(args.observe_every) if args.adaptive else [])
    if args.compile:
        variants += [_compiled(v) for v in variants if v.kind != "eager"]
    if args.variants:
        keep = [k.strip() for k in args.variants.split(",") if k.strip()]
        variants = [v for v in variants if v.name == "fp32" or any(k in v.name for k in keep)]
    env = {"torch": torch.__version__, "device": args.device, "python": platform.python_version(),
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
           "small": args.small, "warmup": args.warmup, "iters": args.iters, "repeats": args.repeats,
           "curve_steps": args.curve_steps, "lr": args.lr}
    results = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        result = bench_model(name, args, variants)
        print(_table(result), flush=True)
        results.append(result)
    if args.out:
        harness.write_json(args.out, {"env": env, "results": results}, device=args.device, argv=argv,
                           module="tools.bench_train")
        print(f"[bench_train] wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
