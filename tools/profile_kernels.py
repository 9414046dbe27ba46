"""Where the GPU time goes: the top CUDA kernels of each benchmark variant, side by side.

Builds the same variants as `python -m tools.bench` (same models, inputs and names), runs each a few times under
torch.profiler and prints, per variant, the kernels that took the most device time in one forward, so a
gap between two variants can be read as "these kernels, this many microseconds". Use it to find out
why one variant is slower before changing a pass.

    python -m tools.profile_kernels --models gpt2,vit_b_16 --variants "autocast bf16,rewriter bf16"
    python -m tools.profile_kernels --device cpu --small --models bert --top 5      # smoke run
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

from tools import harness
from tools.bench import variants

__all__ = ["kernel_table", "main"]


def kernel_table(fn, device: torch.device, steps: int = 5,
                 grad: bool = False) -> tuple[float, list[tuple[str, float, int]]]:
    """(device µs per step, [(kernel name, µs per step, calls per step)]) of `fn`, warm; `grad=True`
    keeps autograd on (training steps)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.set_grad_enabled(grad):
        for _ in range(3):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
    times: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.Counter()
    for evt in prof.events():
        kernel = device.type == "cuda" and evt.device_type == torch.autograd.DeviceType.CUDA
        if kernel or (device.type != "cuda" and evt.name.startswith("aten::") and not evt.cpu_parent):
            us = evt.device_time if kernel else evt.cpu_time_total
            times[evt.name] += us / steps
            calls[evt.name] += 1
    rows = sorted(((n, t, calls[n] // steps) for n, t in times.items()), key=lambda r: -r[1])
    return sum(times.values()), rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.profile_kernels", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2,vit_b_16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--modes", default="compile", help="rewriter backend modes to include")
    p.add_argument("--variants", default="", help="comma-separated substrings of variant names to keep")
    p.add_argument("--batch", type=int)
    p.add_argument("--small", action="store_true")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", type=Path, help="JSON with every kernel row")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    keep = [s for s in args.variants.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    report = []
    for name in args.models.split(","):
        model, margs, mkwargs = harness.build_model(name, small=args.small, device=device, batch=args.batch)
        for vname, vdtype, build in variants(model, margs, mkwargs, [dtype], modes):
            if vdtype is None or (keep and not any(k in vname for k in keep)):
                continue
            try:
                fn, _ = build()
                total, rows = kernel_table(fn, device)
            except Exception as exc:  # one variant failing must not hide the others
                print(f"\n{name} | {vname}: failed: {type(exc).__name__}: {exc}")
                continue
            print(f"\n{name} | {vname}: {total / 1e3:.2f} ms of kernels per forward, {len(rows)} kinds")
            for kname, us, n in rows[:args.top]:
                print(f"  {us:9.1f} us  x{n:<4d} {kname[:110]}")
            report.append({"model": name, "variant": vname, "total_us": total,
                           "kernels": [{"name": k, "us": us, "calls": n} for k, us, n in rows]})
            del fn
            torch.cuda.empty_cache() if device.type == "cuda" else None
    if args.out:
        harness.write_json(args.out, {"variants": report}, device=device, argv=argv, module="tools.profile_kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
