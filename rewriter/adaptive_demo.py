"""A planted FP8 training instability and the three runs that show adaptive precision at work.

`Planted` is x -> fc1 -> relu -> fc2 -> relu -> (+ spike) -> head. The spike plants an attention-sink-like
massive activation: one channel of every 8th row (the sink rows, left out of the loss) grows from 0 to 1e6
between 30% and 60% of training. bf16 keeps the other values of the head's input exactly; FP8's per-tensor
scale (amax / 448) flushes them to zero, so static FP8 loses the head. fc1 + fc2 hold 95% of the GEMM FLOPs.

    python -m rewriter.adaptive_demo --out adaptive_demo.json --picture precision.svg
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Planted", "B", "D", "H", "C", "STEPS", "task_batch", "spike", "train_planted", "main"]

B, D, H, C = 64, 32, 256, 16  # batch, input, hidden, classes
STEPS = 300
TEACHER_SEED = 0


class Planted(nn.Module):
    """The three-linear classifier whose head input carries the planted outlier (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(D, H), nn.Linear(H, H), nn.Linear(H, C)

    def forward(self, x, spike):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))) + spike)


def task_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n Gaussian inputs and their class under a fixed random linear teacher (argmax of x @ T)."""
    teacher = torch.randn(D, C, generator=torch.Generator().manual_seed(TEACHER_SEED))
    x = torch.randn(n, D, generator=gen)
    return x, (x @ teacher).argmax(1)


def spike(step: int, planted: bool, n: int = B, steps: int = STEPS) -> torch.Tensor:
    """The planted activation [n, H]: channel 0 of every 8th row, 10**(6 t), t ramping 0 -> 1 over 30-60%."""
    s = torch.zeros(n, H)
    if planted:
        t = min(max((step - steps * 0.3) / (steps * 0.3), 0.0), 1.0)
        s[torch.arange(n) % 8 == 0, 0] = 10 ** (6 * t)
    return s


def train_planted(precision: str, planted: bool = True, adaptive: bool = False, seed: int = 0,
                  steps: int = STEPS, controller_options: dict | None = None):
    """Train `Planted` converted to `precision` (mode="train"); returns (eval loss on 2048 fresh rows,
    the AdaptivePrecision controller or None)."""
    import rewriter
    from rewriter.adaptive import AdaptivePrecision
    from rewriter.fp8_options import Fp8Options

    torch.manual_seed(seed)
    gm = rewriter.convert(Planted(), (torch.randn(B, D), torch.zeros(B, H)), precision=precision, mode="train",
                          fp8=Fp8Options.always())
    ctl = AdaptivePrecision(gm, **{"patience": 20, **(controller_options or {})}) if adaptive else None
    opt = torch.optim.AdamW(gm.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    keep = torch.arange(B) % 8 != 0
    for step in range(steps):
        x, y = task_batch(B, gen)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(gm(x, spike(step, planted, steps=steps)).float()[keep], y[keep]).backward()
        opt.step()
        if ctl is not None:
            ctl.step()
    xe, ye = task_batch(2048, torch.Generator().manual_seed(99))
    keep = torch.arange(2048) % 8 != 0
    gm.eval()
    with torch.no_grad():
        loss = F.cross_entropy(gm(xe, spike(steps, planted, 2048, steps)).float()[keep], ye[keep]).item()
    return loss, ctl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewriter.adaptive_demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON: losses of bf16, static fp8, adaptive, and the adaptive timeline")
    parser.add_argument("--picture", help="the precision timeline (.png with matplotlib, else .svg)")
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message=".*FP8 GEMMs are emulated.*")
    bf16, _ = train_planted("bf16", seed=args.seed, steps=args.steps)
    fp8, _ = train_planted("fp8", seed=args.seed, steps=args.steps)
    ada, ctl = train_planted("fp8", adaptive=True, seed=args.seed, steps=args.steps)
    result = {"loss": {"bf16": bf16, "fp8": fp8, "adaptive": ada}, "timeline": ctl.timeline()}
    print(f"eval loss: bf16 {bf16:.4f}, static fp8 {fp8:.4f} ({fp8 / bf16 - 1:+.1%}), adaptive {ada:.4f} "
          f"({ada / bf16 - 1:+.1%}); FP8 share of GEMM FLOPs {ctl.fp8_flop_fraction():.1%}")
    for ev in ctl.timeline()["events"]:
        print(f"  step {ev['step']}: {ev['layer']} {ev['from']} -> {ev['to']}: {ev['reason']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.picture:
        print(f"picture: {ctl.plot(args.picture)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
