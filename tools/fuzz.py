"""Fuzz rewriter.convert with random small graphs over the ops the op table knows.

    python -m tools.fuzz --graphs 1000 --out tools/results/fuzz.json

Each graph is a chain of ops on (batch, seq, 16) tensors with a few skip connections (binary ops
read an earlier value), built as an nn.Module. Half the graphs call a numpy helper wrapped for
torch.fx, which torch.export cannot trace, so they take the symbolic_trace fallback. Each is converted
to fp16, bf16 and fp8 and checked (see `check`):

  refused      convert raised a RewriterError (clear refusal: allowed)
  crash        convert raised anything else (a bug)
  mutation     the input model's weights, buffers or train/eval flags changed
  run_crash    the converted model raised on the example input or on another batch size
  nonfinite    the converted output has NaN/Inf where the fp32 output is finite
  dtype        an output's dtype differs from the fp32 model's (keep_io_types)
  too_wrong    relative L2 error beyond the budget: max(4 x torch.autocast's error, a floor per precision)
  not_idempotent  convert(convert(m)) changed the graph or its output
  ok           none of the above
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FuzzNet", "random_spec", "check", "run", "main", "UNARY", "BINARY"]

D = 16  # feature width: a multiple of 16 so FP8 GEMMs are eligible

UNARY = ("linear", "relu", "gelu", "silu", "tanh", "sigmoid", "softmax", "log_softmax", "layer_norm",
         "exp_small", "scale", "shift", "square", "sqrt_abs", "rsqrt_abs", "sum_keep", "mean_keep",
         "transpose_twice", "reshape_round", "bmm_self", "neg", "abs", "max_keep", "cumsum", "erf",
         "dropout", "softplus", "clamp", "group_linear")
BINARY = ("add", "mul", "sub", "div_safe", "maximum", "where_pos", "cat_split", "matmul_t")


def _numpy_scale(x: torch.Tensor) -> torch.Tensor:
    """torch.export cannot trace numpy: graphs that call this take the symbolic_trace fallback."""
    return torch.from_numpy(x.detach().float().numpy() * np.float32(0.5)).to(x.dtype)


torch.fx.wrap("_numpy_scale")


class FuzzNet(nn.Module):
    """A random graph: `spec` is a list of (op, index of the earlier value a binary op reads, flag)."""

    def __init__(self, spec: list, fallback: bool, seed: int):
        super().__init__()
        self.spec = [tuple(s) for s in spec]
        self.fallback = fallback
        gen = torch.Generator().manual_seed(seed)
        self.linears = nn.ModuleList()
        self.norms = nn.ModuleList()
        for op, _, _ in self.spec:
            if op in ("linear", "group_linear"):
                layer = nn.Linear(D, D)
                with torch.no_grad():
                    layer.weight.copy_(torch.randn(D, D, generator=gen) / D ** 0.5)
                    layer.bias.copy_(torch.randn(D, generator=gen) * 0.1)
                self.linears.append(layer)
            if op == "layer_norm":
                self.norms.append(nn.LayerNorm(D))

    def forward(self, x):
        values = [x]
        li = ni = 0
        for i, (op, ref, flag) in enumerate(self.spec):
            h = values[-1]
            other = values[ref % len(values)]
            if op == "linear":
                h = self.linears[li](h); li += 1
            elif op == "group_linear":
                h = self.linears[li](h).relu() + h; li += 1
            elif op == "layer_norm":
                h = self.norms[ni](h); ni += 1
            elif op == "relu": h = torch.relu(h)
            elif op == "gelu": h = F.gelu(h, approximate="tanh" if flag else "none")
            elif op == "silu": h = F.silu(h)
            elif op == "tanh": h = torch.tanh(h)
            elif op == "sigmoid": h = torch.sigmoid(h)
            elif op == "softmax": h = torch.softmax(h, dim=-1)
            elif op == "log_softmax": h = torch.log_softmax(h, dim=-1)
            elif op == "exp_small": h = torch.exp(torch.tanh(h))
            elif op == "scale": h = h * (3.0 if flag else 0.25)
            elif op == "shift": h = h + (1.5 if flag else -0.5)
            elif op == "square": h = h * h
            elif op == "sqrt_abs": h = torch.sqrt(h.abs() + 1e-3)
            elif op == "rsqrt_abs": h = torch.rsqrt(h.abs() + 1e-2)
            elif op == "sum_keep": h = h - h.sum(-1, keepdim=True) / D
            elif op == "mean_keep": h = h - h.mean(-1, keepdim=True)
            elif op == "max_keep": h = h - h.amax(-1, keepdim=True)
            elif op == "transpose_twice": h = h.transpose(1, 2).contiguous().transpose(1, 2)
            elif op == "reshape_round": h = h.reshape(h.shape[0], -1).reshape(h.shape)
            elif op == "bmm_self": h = torch.bmm(torch.bmm(h, h.transpose(1, 2)).softmax(-1), h)
            elif op == "neg": h = -h
            elif op == "abs": h = h.abs()
            elif op == "cumsum": h = torch.cumsum(h, dim=1) / h.shape[1]
            elif op == "erf": h = torch.erf(h)
            elif op == "dropout": h = F.dropout(h, p=0.1, training=self.training)
            elif op == "softplus": h = F.softplus(h)
            elif op == "clamp": h = h.clamp(-2.0, 2.0)
            elif op == "add": h = h + other
            elif op == "mul": h = h * other
            elif op == "sub": h = h - other
            elif op == "div_safe": h = h / (other.abs() + 1.0)
            elif op == "maximum": h = torch.maximum(h, other)
            elif op == "where_pos": h = torch.where(other > 0, h, other)
            elif op == "cat_split": h = torch.cat([h, other], dim=-1).split(D, dim=-1)[1 if flag else 0]
            elif op == "matmul_t": h = torch.matmul(h, other.transpose(-1, -2)).softmax(-1) @ other
            if self.fallback and i == len(self.spec) // 2:
                h = _numpy_scale(h)
            values.append(h)
        return values[-1]


def random_spec(rng: random.Random, length: int) -> list:
    ops = []
    for _ in range(length):
        op = rng.choice(UNARY + BINARY) if rng.random() < 0.8 else rng.choice(("linear", "layer_norm"))
        ops.append((op, rng.randrange(0, 64), rng.random() < 0.5))
    return ops


def _state(model: nn.Module):
    return ({k: (v.dtype, v.detach().clone()) for k, v in model.state_dict().items()},
            [m.training for m in model.modules()])


def _same_state(model: nn.Module, saved) -> bool:
    tensors, flags = saved
    now = model.state_dict()
    if set(now) != set(tensors) or [m.training for m in model.modules()] != flags:
        return False
    return all(type(now[k]) in (torch.Tensor, nn.Parameter) and now[k].dtype == d and torch.equal(now[k], v)
               for k, (d, v) in tensors.items())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


_FLOOR = {"fp16": 1e-2, "bf16": 6e-2, "fp8": 0.25}
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


def _autocast_error(model, x, ref, precision) -> float:
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=_AUTOCAST[precision]):
            out = model(x)
        return _rel(out.float(), ref)
    except Exception:  # autocast on the CPU does not cover every op: no autocast reference then
        return 0.0


def check(model: nn.Module, x: torch.Tensor, precision: str) -> tuple[str, str]:
    """Convert `model` and check it; returns (outcome, detail), outcome one of the module docstring's."""
    import rewriter

    saved = _state(model)
    with torch.no_grad():
        ref = model(x)
    try:
        fast = rewriter.convert(model, (x,), precision=precision)
    except rewriter.RewriterError as exc:
        return ("mutation" if not _same_state(model, saved) else "refused"), str(exc).splitlines()[0][:200]
    except Exception as exc:
        return "crash", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    if not _same_state(model, saved):
        return "mutation", "the input model's state changed"
    try:
        with torch.no_grad():
            out = fast(x)
            other = fast(torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(1)))
    except Exception as exc:
        return "run_crash", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    if out.dtype != ref.dtype or other.dtype != ref.dtype:
        return "dtype", f"output {out.dtype}, fp32 model {ref.dtype}"
    if bool(torch.isfinite(ref).all()) and not bool(torch.isfinite(out).all()):
        return "nonfinite", "NaN/Inf in the converted output where fp32 is finite"
    if bool(torch.isfinite(ref).all()):
        err = _rel(out.float(), ref)
        budget = max(4 * _autocast_error(model, x, ref, precision), _FLOOR[precision])
        if err > budget:
            return "too_wrong", f"relative L2 {err:.3g} > budget {budget:.3g}"
    graph = str(fast.graph)
    try:
        again = rewriter.convert(fast, (x,), precision=precision)
        with torch.no_grad():
            same = torch.equal(again(x), out)
    except Exception as exc:
        return "not_idempotent", f"{type(exc).__name__}: {str(exc)[:200]}"
    if str(again.graph) != graph or not same:
        return "not_idempotent", "a second convert changed the graph or its output"
    if not _same_state(model, saved):
        return "mutation", "the input model's state changed after running the conversion"
    return "ok", ""


def run(graphs: int, seed: int = 0, precisions=("fp16", "bf16", "fp8"), max_len: int = 8,
        log=None) -> dict:
    rng = random.Random(seed)
    counts: Counter = Counter()
    by_path: Counter = Counter()
    failures = []
    start = time.time()
    for g in range(graphs):
        spec = random_spec(rng, rng.randint(1, max_len))
        fallback = rng.random() < 0.5
        model = FuzzNet(spec, fallback, seed=rng.randrange(1 << 30)).eval()
        x = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(g))
        for precision in precisions:
            outcome, detail = check(model, x, precision)
            counts[outcome] += 1
            by_path[(("symbolic_trace" if fallback else "export"), outcome)] += 1
            if outcome not in ("ok", "refused"):
                failures.append({"graph": g, "spec": spec, "fallback": fallback, "precision": precision,
                                 "outcome": outcome, "detail": detail})
        if log and (g + 1) % 25 == 0:
            log(f"{g + 1}/{graphs} graphs, {dict(counts)}, {time.time() - start:.0f}s")
    return {"graphs": graphs, "seed": seed, "max_len": max_len, "precisions": list(precisions), "conversions": sum(counts.values()),
            "counts": dict(counts), "by_capture": {f"{p}:{o}": n for (p, o), n in sorted(by_path.items())},
            "failures": failures[:200], "seconds": round(time.time() - start, 1),
            "torch": torch.__version__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--graphs", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precisions", default="fp16,bf16,fp8")
    p.add_argument("--max-len", type=int, default=8, help="most ops per graph")
    p.add_argument("--out", default=None, help="write the counts and failures as JSON here")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    result = run(args.graphs, args.seed, tuple(args.precisions.split(",")), max_len=args.max_len,
                 log=lambda s: print(s, file=sys.stderr, flush=True))
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(json.dumps({"graphs": result["graphs"], "counts": result["counts"]}))
    bad = sum(n for k, n in result["counts"].items() if k not in ("ok", "refused"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
