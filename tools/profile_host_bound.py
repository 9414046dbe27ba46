"""Is an eager model bound by the host? Ours (with and without invariant hoisting) vs autocast vs fp32.

Prints, per variant: CUDA-event ms per call (median of 3 round-robin blocks), host ms per call (time to
enqueue 20 calls without waiting), and kernel time and kernel count from the profiler. A variant whose host
time equals its wall time while its kernel time is lower is waiting for Python, not for the GPU.

    python -m tools.profile_host_bound                # torchvision swin_t, b32, bf16, on cuda
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import rewriter
from rewriter import measure
from rewriter.backends import invariants

__all__ = ["main"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.profile_host_bound", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="swin_t", help="a torchvision.models constructor name")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    import torchvision

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    model = getattr(torchvision.models, args.model)().eval().to(args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    ours = rewriter.convert(model, (x,), precision=args.precision)
    hoist = invariants.hoist
    invariants.hoist = lambda graph, weights, min_ops=2: {"regions": 0, "ops": 0}
    try:
        plain = rewriter.convert(model, (x,), precision=args.precision)
    finally:
        invariants.hoist = hoist

    def autocast():
        with torch.autocast(torch.device(args.device).type, dtype=dtype):
            return model(x)

    variants = {"fp32": lambda: model(x), "autocast": autocast, "ours": lambda: ours(x),
                "ours without hoisting": lambda: plain(x)}
    times = measure.round_robin(variants, device=args.device, warmup=5, repeats=3, iters=20)
    for name, fn in variants.items():
        with torch.no_grad():
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(20):
                fn()
            host = (time.perf_counter() - start) / 20 * 1e3
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
        events = prof.key_averages()
        kernel_ms = sum(e.device_time_total for e in events) / 1e3
        kernels = sum(e.count for e in events if e.device_time_total > 0)
        print(f"{name:24s} {times[name].median_ms:8.2f} ms  host {host:8.2f} ms  kernels {kernel_ms:7.2f} ms "
              f"({kernels})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
