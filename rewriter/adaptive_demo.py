"""A planted training instability and the three runs that show adaptive precision at work, in FP8 or fp16.

`Planted` is x -> fc1 -> relu -> fc2 -> relu -> (+ spike) -> head. The spike plants an attention-sink-like
massive activation: one channel of every 8th row (the sink rows, left out of the loss) grows from 0 to 1e6
between 30% and 60% of training. fc1 + fc2 hold 95% of the GEMM FLOPs.
  FP8:  bf16 keeps the other values of the head's input exactly; FP8's per-tensor scale (amax / 448) flushes
        them to zero, so static FP8 loses the head.
  fp16: the spike passes fp16's max (65504) at about 53% of training (step 163 of 300): the head's input
        overflows, its weight gradient turns NaN and the loss scaler skips every step from there on; the
        adaptive run moves the head to bf16 one doubling before (amax above 65504 / 2), skipping nothing.

    python -m rewriter.adaptive_demo --out adaptive_demo.json --picture precision.svg
    python -m rewriter.adaptive_demo --precision fp16 --picture precision.svg

`rewrite demo --train --adaptive` runs the same (rewriter/cli/cmd_demo.py) and prints the timeline with
`timeline_text`.
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Planted", "B", "D", "H", "C", "STEPS", "task_batch", "spike", "train_planted", "run_demo",
           "timeline_text", "main"]

B, D, H, C = 64, 32, 256, 16  # batch, input, hidden, classes
STEPS = 300
TEACHER_SEED = 0
_SYMBOL = {"fp8": "8", "fp16": "h", "bf16": "b", "fp32": "F"}


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
                  steps: int = STEPS, controller_options: dict | None = None, info: dict | None = None):
    """Train `Planted` converted to `precision` (mode="train"; fp16 with rewriter's dynamic loss scaler);
    returns (eval loss on 2048 fresh rows, the AdaptivePrecision controller or None). `info`, when given,
    receives "skipped": the steps the loss scaler skipped (fp16), and "scale": its last scale."""
    import rewriter
    from rewriter.adaptive import AdaptivePrecision
    from rewriter.fp8_options import Fp8Options
    from rewriter.loss_scale import make_scaler

    torch.manual_seed(seed)
    gm = rewriter.convert(Planted(), (torch.randn(B, D), torch.zeros(B, H)), precision=precision, mode="train",
                          fp8=Fp8Options.always())
    ctl = AdaptivePrecision(gm, **{"patience": 20, **(controller_options or {})}) if adaptive else None
    opt = torch.optim.AdamW(gm.parameters(), lr=3e-3)
    scaler = make_scaler(gm) if precision == "fp16" else None
    gen = torch.Generator().manual_seed(seed + 1)
    keep = torch.arange(B) % 8 != 0
    for step in range(steps):
        x, y = task_batch(B, gen)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(gm(x, spike(step, planted, steps=steps)).float()[keep], y[keep])
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.backward(loss)
            scaler.step(opt)
        if ctl is not None:
            ctl.step()
    if info is not None and scaler is not None:
        info.update(skipped=list(scaler.skipped), scale=scaler.scale)
    xe, ye = task_batch(2048, torch.Generator().manual_seed(99))
    keep = torch.arange(2048) % 8 != 0
    gm.eval()
    with torch.no_grad():
        loss = F.cross_entropy(gm(xe, spike(steps, planted, 2048, steps)).float()[keep], ye[keep]).item()
    return loss, ctl


def run_demo(precision: str = "fp8", steps: int = STEPS, seed: int = 0) -> dict:
    """The three runs on the planted instability: bf16, static `precision` and adaptive `precision`.

    Returns:
        {"precision", "steps", "loss": {"bf16", <precision>, "adaptive"}, "skipped": {run: [steps]} (fp16),
        "timeline": the adaptive controller's timeline}.
    """
    import warnings

    from rewriter.runtime.fp8_ops import Fp8EmulationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Fp8EmulationWarning)
        infos = {"bf16": {}, precision: {}, "adaptive": {}}
        bf16, _ = train_planted("bf16", seed=seed, steps=steps, info=infos["bf16"])
        static, _ = train_planted(precision, seed=seed, steps=steps, info=infos[precision])
        ada, ctl = train_planted(precision, adaptive=True, seed=seed, steps=steps, info=infos["adaptive"])
    result = {"precision": precision, "steps": steps, "loss": {"bf16": bf16, precision: static, "adaptive": ada},
              "timeline": ctl.timeline()}
    if precision == "fp16":
        result["skipped"] = {k: v.get("skipped", []) for k, v in infos.items()}
    return result


def timeline_text(timeline: dict, width: int = 80) -> list[str]:
    """The timeline as terminal lines no wider than `width`: one bar per layer (a character per bucket of
    steps: 8 fp8, h fp16, b bf16, F fp32, the highest precision of the bucket), then each switch with its
    reason, wrapped."""
    layers, steps = timeline["layers"], max(int(timeline["steps"]), 1)
    name_w = min(max((len(n) for n in layers), default=4), 16)
    bar_w = max(min(width - name_w - 3, steps), 1)
    order = ["fp8", "fp16", "bf16", "fp32"]
    lines = []
    for name in layers:
        cells = []
        for k in range(bar_w):
            lo, hi = k * steps // bar_w, max((k + 1) * steps // bar_w, k * steps // bar_w + 1)
            here = [s["precision"] for s in timeline["segments"].get(name, []) if s["start"] < hi and s["end"] > lo]
            cells.append(_SYMBOL[max(here, key=order.index)] if here else " ")
        lines.append(f"{name[:name_w]:>{name_w}} |{''.join(cells)}|")
    ticks = f"step 0{'':{max(bar_w - 6 - len(str(steps)), 1)}}{steps}"
    lines.append(f"{'':{name_w}}  {ticks}"[:width])
    kinds = [timeline.get("kind", "fp8"), "bf16", "fp32"]
    lines.append(f"{'':{name_w}}  {', '.join(f'{_SYMBOL[k]} {k}' for k in kinds)}"[:width])
    for ev in timeline["events"]:
        text = f"step {ev['step']}: {ev['layer']} {ev['from']} -> {ev['to']}: {ev['reason']}"
        lines += textwrap.wrap(text, width, subsequent_indent="    ", break_on_hyphens=False)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewriter.adaptive_demo", description=__doc__.split("\n")[0])
    parser.add_argument("--precision", choices=("fp8", "fp16"), default="fp8",
                        help="the low precision the controller watches (fp8)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON: losses of bf16, static, adaptive, and the adaptive timeline")
    parser.add_argument("--picture", help="the precision timeline (.png with matplotlib, else .svg)")
    args = parser.parse_args(argv)
    from rewriter.adaptive_plot import write_picture

    result = run_demo(args.precision, steps=args.steps, seed=args.seed)
    loss, p = result["loss"], args.precision
    print(f"eval loss: bf16 {loss['bf16']:.4f}, static {p} {loss[p]:.4f} ({loss[p] / loss['bf16'] - 1:+.1%}), "
          f"adaptive {loss['adaptive']:.4f} ({loss['adaptive'] / loss['bf16'] - 1:+.1%}); {p.upper()} share of "
          f"GEMM FLOPs {result['timeline']['low_flop_fraction']:.1%}")
    if "skipped" in result:
        print(f"steps skipped by the loss scaler: static {p} {len(result['skipped'][p])}, adaptive "
              f"{len(result['skipped']['adaptive'])}")
    for ev in result["timeline"]["events"]:
        print(f"  step {ev['step']}: {ev['layer']} {ev['from']} -> {ev['to']}: {ev['reason']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.picture:
        print(f"picture: {write_picture(result['timeline'], args.picture)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
