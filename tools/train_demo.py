"""Mixed-precision training with `rewriter.convert(..., mode="train")`: fp32 vs fp16 vs bf16.

Two tasks, each trained once per precision from the same initial weights, on the same batches and the
same dropout masks, so the loss curves can be compared line by line:

  digits   a small CNN (conv-BN-ReLU x2, max-pool, dropout, linear) on scikit-learn's 8x8 digits
  reverse  a 2-layer pre-norm transformer encoder that outputs its input sequence reversed (synthetic)

fp16 runs with dynamic loss scaling (`rewriter.loss_scale.make_scaler`); bf16 needs none and says so.
Printed: the loss every --log-every steps, final accuracy on held-out data (in eval mode: dropout off,
batch-norm running statistics), median step time and the loss scale over time.

    python tools/train_demo.py                                # both tasks; --device cuda on a GPU
    python tools/train_demo.py --task digits --steps 400 --log-every 50 --threads 1
    python tools/train_demo.py --precisions fp32,bf16 --json out/train_demo.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import rewriter
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import rewriter
from rewriter.loss_scale import make_scaler

__all__ = ["DigitsCNN", "Reverser", "Run", "digits_task", "reverse_task", "train", "main"]


# ---------------------------------------------------------------- models


class DigitsCNN(nn.Module):
    """conv-BN-ReLU, conv-BN-ReLU, max-pool, dropout, linear: 8x8 grey digits -> 10 classes."""

    def __init__(self, width: int = 16, dropout: float = 0.25):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * width * 16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(self.drop(x.flatten(1)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.p = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # a Python branch on self.training: one captured graph could not honour .eval() here
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.down(F.gelu(self.up(self.ln2(x)))))


class Reverser(nn.Module):
    """Token + position embedding, pre-norm transformer blocks, per-position vocabulary logits."""

    def __init__(self, vocab: int = 16, length: int = 12, dim: int = 64, depth: int = 2, heads: int = 4,
                 dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(length, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.embed(ids) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# ---------------------------------------------------------------- tasks


@dataclasses.dataclass
class Task:
    """What `train` needs: a model factory, batches, a loss and an accuracy."""

    name: str
    make_model: Callable[[], nn.Module]
    batch: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]  # (step, gen) -> (x, y)
    test: tuple[torch.Tensor, torch.Tensor]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    accuracy: Callable[[torch.Tensor, torch.Tensor], float]
    lr: float


def digits_task(batch_size: int = 32, seed: int = 0) -> Task:
    """scikit-learn's digits (1797 8x8 images, bundled, no download): 70 % train, 30 % test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    tr_x, te_x, tr_y, te_y = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    mean, std = tr_x.mean(), tr_x.std()
    tr_x, te_x = (tr_x - mean) / std, (te_x - mean) / std

    def batch(step: int, gen: torch.Generator):
        idx = torch.randint(0, len(tr_x), (batch_size,), generator=gen)
        return tr_x[idx], tr_y[idx]

    return Task("digits", DigitsCNN, batch, (te_x, te_y), F.cross_entropy,
                lambda logits, y: (logits.argmax(-1) == y).float().mean().item(), lr=2e-3)


def reverse_task(batch_size: int = 64, vocab: int = 16, length: int = 12, seed: int = 0) -> Task:
    """Random token sequences; the target is the sequence reversed. Accuracy: tokens right."""
    def sample(n: int, gen: torch.Generator):
        ids = torch.randint(1, vocab, (n, length), generator=gen)
        return ids, ids.flip(1)

    test = sample(1024, torch.Generator().manual_seed(seed + 12345))
    return Task("reverse", lambda: Reverser(vocab, length), lambda step, gen: sample(batch_size, gen), test,
                lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten()),
                lambda logits, y: (logits.argmax(-1) == y).float().mean().item(), lr=3e-3)


# ---------------------------------------------------------------- training


@dataclasses.dataclass
class Run:
    """The record of one training run."""

    task: str
    precision: str
    losses: list[float]
    accuracy: float
    step_ms: float
    scale_history: list[tuple[int, float]]
    skipped: list[int]
    scaler: str
    convert_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(task: Task, precision: str, *, steps: int = 300, device: str = "cpu", seed: int = 0,
          max_grad_norm: float | None = 1.0, log: Callable[[str], None] | None = None) -> Run:
    """Train `task.make_model()` in `precision` ("fp32" = unconverted) and evaluate it.

    Same `seed` -> same initial weights, same batches and the same dropout masks in every precision.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    model = task.make_model().to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    start = time.perf_counter()
    if precision != "fp32":
        x0, _ = task.batch(0, torch.Generator().manual_seed(seed + 2))
        model = rewriter.convert(model, (x0.to(device),), precision=precision, mode="train")
    convert_s = time.perf_counter() - start
    scaler = make_scaler(precision if precision != "fp32" else model, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=task.lr, total_steps=steps, pct_start=0.1)
    torch.manual_seed(seed + 3)  # dropout masks: the same sequence in every precision
    losses, times = [], []
    model.train()
    for step in range(steps):
        x, y = (t.to(device) for t in task.batch(step, gen))
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model(x).float(), y)
        scaler.backward(loss)
        scaler.step(opt, max_grad_norm=max_grad_norm)
        sched.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if log is not None:
            log(f"{task.name:8s} {precision:5s} step {step:4d}  loss {losses[-1]:.4f}  scale {scaler.scale:g}")
    model.eval()
    with torch.no_grad():
        x, y = task.test
        accuracy = task.accuracy(model(x.to(device)).float(), y.to(device))
    warm = times[min(5, len(times) - 1):]
    return Run(task.name, precision, losses, accuracy, 1e3 * statistics.median(warm),
               [tuple(h) for h in scaler.history], list(scaler.skipped), repr(scaler), convert_s)


# ---------------------------------------------------------------- report


def _curve_table(runs: list[Run], every: int) -> str:
    steps = len(runs[0].losses)
    head = "  step " + "".join(f"{r.precision:>10s}" for r in runs)
    lines = [head]
    for s in list(range(0, steps, every)) + ([steps - 1] if (steps - 1) % every else []):
        # mean over the window ending at s: single-batch losses are noisy
        lo = max(0, s - every + 1)
        lines.append(f"  {s:4d} " + "".join(f"{sum(r.losses[lo:s + 1]) / (s + 1 - lo):10.4f}" for r in runs))
    return "\n".join(lines)


def report(runs: list[Run], every: int) -> str:
    """Loss curves (window means), accuracy, step time, loss scale, for one task."""
    out = [f"== {runs[0].task}: loss (mean of the last {every} steps)", _curve_table(runs, every), ""]
    base = next((r for r in runs if r.precision == "fp32"), runs[0])
    out.append(f"  {'precision':9s} {'accuracy':>9s} {'vs fp32':>8s} {'step ms':>8s} {'convert s':>9s}  loss scale")
    for r in runs:
        scale = ("off" if not r.scale_history or r.precision != "fp16" else
                 ", ".join(f"step {s}: {v:g}" for s, v in r.scale_history[:6])
                 + (" ..." if len(r.scale_history) > 6 else "")
                 + (f"; skipped {len(r.skipped)} steps {r.skipped[:5]}" if r.skipped else "; no step skipped"))
        out.append(f"  {r.precision:9s} {100 * r.accuracy:8.2f}% {100 * (r.accuracy - base.accuracy):+7.2f}pp "
                   f"{r.step_ms:8.2f} {r.convert_s:9.1f}  {scale}")
    for r in runs:
        if r.precision != "fp16" and r.precision != "fp32":
            out.append(f"  {r.precision}: {r.scaler}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=["digits", "reverse", "all"], default="all")
    parser.add_argument("--precisions", default="fp32,fp16,bf16")
    parser.add_argument("--steps", type=int, default=None, help="default: digits 200, reverse 300")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (1 is fastest for these small models on a busy machine)")
    parser.add_argument("--verbose", action="store_true", help="print every step")
    parser.add_argument("--json", type=Path, help="write all runs here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    tasks = {"digits": (digits_task, 200), "reverse": (reverse_task, 300)}
    names = list(tasks) if args.task == "all" else [args.task]
    all_runs = []
    for name in names:
        make, default_steps = tasks[name]
        task = make(seed=args.seed)
        runs = []
        for precision in precisions:
            print(f"[train_demo] {name}: training in {precision} on {args.device} ...", flush=True)
            runs.append(train(task, precision, steps=args.steps or default_steps, device=args.device,
                              seed=args.seed, log=print if args.verbose else None))
            if not math.isfinite(runs[-1].losses[-1]):
                print(f"[train_demo] {name} {precision}: the loss is not finite", file=sys.stderr)
        print(report(runs, args.log_every), flush=True)
        print()
        all_runs += runs
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in all_runs], indent=1))
        print(f"[train_demo] wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
