"""`rewrite demo`: the whole flow on a built-in model, no files and no network.

The built-in model is a small transformer encoder written in plain PyTorch with an L2-normalised
pooled embedding. Its sum of squares exceeds fp16's 65504 on ordinary inputs: under a blanket
`.half()` it overflows to inf, `rsqrt(inf)` gives 0 and the output is silently wrong (about 58% relative
error), while the converted model keeps pow/sum/rsqrt in fp32 and matches autocast.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import rewriter
from rewriter import meta, measure
from rewriter.config import Precision

__all__ = ["DemoEncoder", "demo_inputs", "run_demo"]


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) * (d // self.heads) ** -0.5
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DemoEncoder(nn.Module):
    """Token embedding -> N pre-norm transformer blocks -> sum pooling -> L2 norm -> classifier."""

    def __init__(self, vocab: int = 1000, dim: int = 128, depth: int = 4, heads: int = 4, classes: int = 10):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        pooled = self.norm(x).sum(1) * 4.0            # sum pooling: values grow with sequence length
        energy = pooled.pow(2).sum(-1, keepdim=True)   # > 65504 for ordinary inputs: fp16 overflows
        return self.head(pooled * energy.rsqrt())


def demo_inputs(batch: int = 16, seq: int = 128, vocab: int = 1000, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


def _time(fn, device, repeats: int = 10) -> float:
    return measure.measure(fn, device=device, warmup=3, repeats=repeats).median_ms


def _param_bytes(module: nn.Module) -> int:
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run_demo(precision: str = "fp16", device: str | None = None) -> int:
    """Convert the built-in model, run it beside fp32, autocast and a blanket cast, print a report.

    Returns:
        0 when the converted model is finite and no less accurate than autocast, else 1.
    """
    from collections import Counter

    from rich.console import Console
    from rich.table import Table

    console = Console()
    prec = Precision.parse(precision)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = prec.island_dtype
    torch.manual_seed(0)
    model = DemoEncoder().eval().to(dev)
    ids = demo_inputs(device=dev)
    console.print(f"[bold]rewrite demo[/]: DemoEncoder ({sum(p.numel() for p in model.parameters()):,} "
                  f"parameters), input {tuple(ids.shape)}, precision {prec.value}, device {dev}")
    start = time.perf_counter()
    fast = rewriter.convert(model, (ids,), precision=prec.value, progress=False)
    console.print(f"converted in {time.perf_counter() - start:.2f}s "
                  f"({fast.meta['rewriter']['capture']})")

    with torch.no_grad():
        ref = model(ids).float()
        with torch.autocast(dev.type, dtype=dtype):
            auto = model(ids).float()
        blanket_model = DemoEncoder().eval().to(dev)
        blanket_model.load_state_dict(model.state_dict())
        blanket_model = blanket_model.to(dtype)
        blanket = blanket_model(ids).float()
        ours = fast(ids).float()

    # What ran in which precision.
    per_dtype: Counter = Counter()
    casts = 0
    for node in fast.graph.nodes:
        if meta.get(node, meta.CREATED):
            casts += node.op == "call_function"
            continue
        decision = meta.get(node, meta.DECISION)
        if decision:
            op = meta.get(node, meta.OP_CLASS)["op"]
            per_dtype[(decision["dtype"], op)] += 1
    table = Table(title="what runs in which precision (converted graph)")
    table.add_column("dtype")
    table.add_column("ops")
    for name in sorted({d for d, _ in per_dtype}):
        ops = sorted(((op, n) for (d, op), n in per_dtype.items() if d == name), key=lambda t: -t[1])
        table.add_row(name, ", ".join(f"{op}×{n}" for op, n in ops))
    console.print(table)

    timing = dev.type == "cuda"
    results = Table(title=f"fp32 vs {prec.value} on {dev}" + ("" if timing else
                    " (CPU: timings omitted, they say nothing about GPU speed)"))
    for col in ("variant", "rel. L2 error vs fp32", "finite", "param MB") + (("ms",) if timing else ()):
        results.add_column(col, justify="right" if col != "variant" else "left")
    rows = [("fp32", ref, model, lambda: model(ids)),
            # autocast knows fp16 and bf16 only: with fp8 the row is its closest mode, named as what it runs
            (f"torch.autocast {'bf16' if dtype == torch.bfloat16 else 'fp16'}"
             + (" (has no fp8)" if prec.value == "fp8" else ""), auto, model, None),
            (f"blanket .to({meta.dtype_name(dtype)})", blanket, blanket_model, lambda: blanket_model(ids)),
            (f"rewriter {prec.value} ({casts} casts)", ours, fast, lambda: fast(ids))]
    for name, out, module, fn in rows:
        finite = bool(torch.isfinite(out).all())
        err = measure.rel_l2(ref, out) if finite else float("nan")
        row = [name, f"{err:.2e}" if finite else "inf/NaN", "yes" if finite else "[red]no[/]",
               f"{_param_bytes(module) / 2**20:.2f}"]
        if timing:
            def autocast_call():
                with torch.autocast(dev.type, dtype=dtype):
                    model(ids)
            with torch.no_grad():
                row.append(f"{_time(fn or autocast_call, dev):.2f}")
        results.add_row(*row)
    console.print(results)
    ok = bool(torch.isfinite(ours).all()) and measure.rel_l2(ref, ours) <= measure.rel_l2(ref, auto) * 1.05 + 1e-6
    console.print("[green]converted model is finite and as accurate as autocast[/]" if ok else
                  "[red]converted model is less accurate than autocast[/]")
    console.print("next: rewriter.diff(model, fast) shows every decision and why; "
                  "`rewrite convert --help` converts saved models")
    return 0 if ok else 1
