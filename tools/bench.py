"""Side-by-side latency and accuracy of fp32, TF32, autocast, blanket casts and rewriter on one GPU.

Every variant runs in the same process on the same inputs; errors are relative L2 against strict fp32
(TF32 off), computed in float64. Latency: CUDA events, median of --repeats x --iters after --warmup.

    python tools/bench.py --device cuda --out bench.json                 # the README table
    python tools/bench.py --device cpu --small --models bert,resnet50      # smoke run without a GPU
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
import torch.nn as nn

__all__ = ["main", "build_model", "rel_l2"]


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _tensor_of(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find the output tensor in {type(out).__name__}")


def build_model(name: str, small: bool, device: torch.device, batch: int | None = None):
    """(model, args, kwargs) for a named model, random-init, fp32, eval mode, on `device`."""
    g = torch.Generator().manual_seed(0)
    if name in ("resnet50", "vit_b_16"):
        import torchvision

        if name == "resnet50":
            model = torchvision.models.resnet50() if not small else torchvision.models.resnet18()
            b, hw = (batch or (128 if not small else 4)), (224 if not small else 64)
        else:
            model = (torchvision.models.vit_b_16() if not small else torchvision.models.VisionTransformer(
                image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128))
            model.heads = nn.Identity()  # torchvision zero-initialises the head: compare features
            b, hw = (batch or (64 if not small else 4)), (224 if not small else 32)
        x = torch.randn(b, 3, hw, hw, generator=g)
        return model.eval().to(device), (x.to(device),), {}
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    if name == "bert":
        cfg = BertConfig() if not small else BertConfig(hidden_size=64, num_hidden_layers=2,
                                                        num_attention_heads=4, intermediate_size=128)
        model, b, s = BertModel(cfg), (batch or (32 if not small else 4)), (128 if not small else 32)
    elif name == "gpt2":
        cfg = GPT2Config(use_cache=False) if not small else GPT2Config(n_embd=64, n_layer=2, n_head=4,
                                                                       use_cache=False)
        model, b, s = GPT2Model(cfg), (batch or (8 if not small else 4)), (512 if not small else 32)
    else:
        raise SystemExit(f"unknown model {name!r}: choose resnet50, vit_b_16, bert, gpt2")
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    kwargs = {"input_ids": ids.to(device)}
    if name == "bert":
        kwargs["attention_mask"] = torch.ones_like(ids).to(device)
    return model.eval().to(device), (), kwargs


def _timer(device: torch.device, warmup: int, iters: int, repeats: int):
    def run(fn) -> float:
        with torch.no_grad():
            for _ in range(warmup):
                fn()
            samples = []
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(iters):
                        fn()
                    end.record()
                    torch.cuda.synchronize()
                    samples.append(start.elapsed_time(end) / iters)
                else:
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        fn()
                    samples.append((time.perf_counter() - t0) * 1e3 / iters)
        return statistics.median(samples)
    return run


def _set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def _param_bytes(module: nn.Module) -> int:
    seen = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in seen.values())


def _cast_inputs(args, kwargs, dtype):
    cast = lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def variants(model, args, kwargs, dtypes, modes):
    """Yield (name, dtype, callable, module) for every variant to measure."""
    import rewriter

    yield "fp32 strict", None, lambda: model(*args, **kwargs), model
    yield "tf32", None, lambda: model(*args, **kwargs), model
    for dtype in dtypes:
        short = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]

        def autocast_call(dtype=dtype):
            with torch.autocast(args[0].device.type if args else next(iter(kwargs.values())).device.type,
                                dtype=dtype):
                return model(*args, **kwargs)
        yield f"autocast {short}", dtype, autocast_call, model
        blanket = copy.deepcopy(model).to(dtype)
        bargs, bkwargs = _cast_inputs(args, kwargs, dtype)
        yield f".to({short})", dtype, (lambda b=blanket, a=bargs, k=bkwargs: b(*a, **k)), blanket
        t0 = time.perf_counter()
        fast = rewriter.convert(model, args, kwargs, precision=short)
        convert_s = time.perf_counter() - t0
        yield f"rewriter {short}", dtype, (lambda f=fast: f(*args, **kwargs)), fast
        print(f"  converted {short} in {convert_s:.1f}s", file=sys.stderr)
        for mode in modes:
            from backends.torch_backend import optimize

            opt = optimize(fast, mode=mode)
            yield f"rewriter {short} {mode}", dtype, (lambda o=opt: o(*args, **kwargs)), fast
        if "compile" in modes:
            compiled = torch.compile(copy.deepcopy(model).to(dtype))
            yield f"torch.compile(.to({short}))", dtype, (lambda c=compiled, a=bargs, k=bkwargs: c(*a, **k)), blanket


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,vit_b_16,bert,gpt2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="fp16,bf16")
    p.add_argument("--modes", default="", help="extra backend modes of ours: compile,cuda_graphs")
    p.add_argument("--batch", type=int, default=None, help="override every model's batch size (e.g. 1)")
    p.add_argument("--small", action="store_true", help="tiny configs for a CPU smoke run")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtypes = [{"fp16": torch.float16, "bf16": torch.bfloat16}[d] for d in a.dtypes.split(",") if d]
    modes = [m for m in a.modes.split(",") if m]
    time_it = _timer(device, a.warmup, a.iters, a.repeats)
    results = []
    for name in a.models.split(","):
        print(f"== {name}", file=sys.stderr, flush=True)
        model, args, kwargs = build_model(name, a.small, device, a.batch)
        _set_tf32(False)
        with torch.no_grad():
            ref = _tensor_of(model(*args, **kwargs)).float()
        rows = []
        for vname, dtype, fn, module in variants(model, args, kwargs, dtypes, modes):
            _set_tf32(vname == "tf32")
            with torch.no_grad():
                out = _tensor_of(fn()).float()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            ms = time_it(fn)
            peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
            rows.append({"model": name, "variant": vname, "ms": ms, "rel_l2": rel_l2(out, ref),
                         "finite": bool(torch.isfinite(out).all()), "peak_mb": peak / 2**20,
                         "param_mb": _param_bytes(module) / 2**20})
            print(f"  {vname:28s} {ms:8.2f} ms  err {rows[-1]['rel_l2']:.2e}", file=sys.stderr, flush=True)
        _set_tf32(False)
        for r in rows:
            base = next((x for x in rows if x["variant"] == "fp32 strict"), None)
            same = [x for x in rows if x["variant"].startswith("autocast") and x["variant"][-4:] in r["variant"]]
            r["vs_fp32"] = base["ms"] / r["ms"] if base else None
            r["vs_autocast"] = same[0]["ms"] / r["ms"] if same else None
        results.extend(rows)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\ndevice: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print("| model | variant | ms | x fp32 | x autocast | rel. L2 vs fp32 | finite | peak MB | param MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        f = lambda v: "-" if v is None else f"{v:.2f}"
        print(f"| {r['model']} | {r['variant']} | {r['ms']:.2f} | {f(r['vs_fp32'])} | {f(r['vs_autocast'])} | "
              f"{r['rel_l2']:.1e} | {'yes' if r['finite'] else 'NO'} | {r['peak_mb']:.0f} | {r['param_mb']:.0f} |")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"device": str(device), "torch": torch.__version__, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
