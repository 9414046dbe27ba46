"""Mixed-precision training with `rewriter.convert(..., mode="train")`: fp32 vs fp16 vs bf16 (vs fp8).

`rewrite demo --train` runs it (tools/train_demo.py is a thin wrapper around that command). Two tasks,
each trained once per precision from the same initial weights, on the same batches and with the same
dropout seed, so the loss curves can be compared line by line:

  digits   a small CNN (conv-BN-ReLU x2, max-pool, dropout, linear) on scikit-learn's 8x8 digits
           (bundled with scikit-learn, no download)
  reverse  a 2-layer pre-norm transformer encoder that outputs its input sequence reversed (synthetic)

fp16 runs with dynamic loss scaling (`rewriter.loss_scale.make_scaler`); bf16 needs none and says so.
`report` prints the loss curve (window means), the fp16 loss scale over time, final accuracy on
held-out data (in eval mode: dropout off, batch-norm running statistics), median step time and
conversion time.

fp8 is opt-in (TRAINABLE, not PRECISIONS): precision="fp8" with `Fp8Options.always()`, so every eligible
linear trains with FP8 GEMMs (e4m3 forward, e5m2 gradients, fp32 master weights). The cost model alone
would keep all of them in bf16: these models' GEMMs are far below the size where FP8 is faster, so the
run shows FP8's numerics, not its speed (python -m tools.bench_train times realistic sizes). Without FP8 GEMMs
(CPU, GPUs before sm_89) they are emulated: same quantization, fp32 matmul. `Run.fp8_gemms` says how
many linears ran in FP8, why the others did not, and whether they were emulated. The digits CNN has one
linear, whose 10 outputs are not a multiple of 16: its fp8 run computes as bf16 and says so.

    >>> from rewriter.train_demo import digits_task, reverse_task, train, report
    >>> runs = [train(digits_task(), p, steps=200) for p in ("fp32", "fp16", "bf16")]
    >>> print(report(runs, every=25))
    >>> print(report([train(reverse_task(), p, steps=150) for p in ("bf16", "fp8")], every=25))
"""
from __future__ import annotations

import dataclasses
import importlib
import statistics
import sys
import time
from collections import Counter
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from rewriter import meta
from rewriter.errors import RewriterError
from rewriter.fp8_options import Fp8Options
from rewriter.loss_scale import make_scaler
from rewriter.pipeline import convert
from rewriter.runtime.fp8_ops import emulation_reason, fp8_gemm_supported

__all__ = ["DigitsCNN", "Reverser", "Task", "Run", "TASKS", "PRECISIONS", "TRAINABLE",
           "MissingDependencyError", "require_sklearn", "digits_task", "reverse_task", "make_task", "train",
           "report", "scale_at", "fp8_summary", "notes"]

#: Precisions the demo trains in by default ("fp32" = the unconverted model).
PRECISIONS = ("fp32", "fp16", "bf16")
#: Every precision `train` accepts. fp8 is opt-in: on these small models it forces FP8 GEMMs that the
#: cost model would not choose, and without an FP8 GPU it is emulated (several times slower).
TRAINABLE = PRECISIONS + ("fp8",)


class MissingDependencyError(RewriterError):
    """An optional package the demo needs is not installed (the CLI exits with code 2)."""


def require_sklearn() -> None:
    """Raise MissingDependencyError, naming the package and the pip command, without scikit-learn."""
    try:
        importlib.import_module("sklearn")  # not `import sklearn`: pyflakes reports an unused name
    except ImportError as exc:
        raise MissingDependencyError(
            "the training demo's digits task needs scikit-learn, which is not installed in this Python "
            f"({sys.executable}); it provides the 8x8 digits data set (bundled with it, no download). "
            "Install it with `python -m pip install scikit-learn` (in a checkout, `python -m pip install "
            "-e \".[test]\"` installs it too), or run only the synthetic transformer task with "
            "`rewrite demo --train --task reverse`.") from exc


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
    title: str = ""


def digits_task(batch_size: int = 32, seed: int = 0) -> Task:
    """scikit-learn's digits (1797 8x8 images, bundled, no download): 70 % train, 30 % test."""
    require_sklearn()
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
                lambda logits, y: (logits.argmax(-1) == y).float().mean().item(), lr=2e-3,
                title=f"small CNN on scikit-learn's 8x8 digits ({len(tr_x)} train / {len(te_x)} test "
                      f"images, batch {batch_size}); accuracy = test images classified right")


def reverse_task(batch_size: int = 64, vocab: int = 16, length: int = 12, seed: int = 0) -> Task:
    """Random token sequences; the target is the sequence reversed. Accuracy: tokens right."""
    def sample(n: int, gen: torch.Generator):
        ids = torch.randint(1, vocab, (n, length), generator=gen)
        return ids, ids.flip(1)

    test = sample(1024, torch.Generator().manual_seed(seed + 12345))
    return Task("reverse", lambda: Reverser(vocab, length), lambda step, gen: sample(batch_size, gen), test,
                lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten()),
                lambda logits, y: (logits.argmax(-1) == y).float().mean().item(), lr=3e-3,
                title=f"2-layer transformer reversing random sequences of {length} tokens (vocabulary "
                      f"{vocab}, batch {batch_size}); accuracy = tokens right on 1024 held-out sequences")


#: name -> (task factory, default number of steps). The defaults keep a CPU run to about a minute.
TASKS: dict[str, tuple[Callable[..., Task], int]] = {"digits": (digits_task, 200), "reverse": (reverse_task, 150)}


def make_task(name: str, seed: int = 0) -> Task:
    """The task called `name` ("digits" or "reverse")."""
    return TASKS[name][0](seed=seed)


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
    fp8_gemms: str = ""  # fp8 runs: how many linears ran in FP8, why others did not, emulated or not
    fp8_linears: int = 0  # fp8 runs: the number of linears that ran in FP8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(task: Task, precision: str, *, steps: int = 300, device: "str | torch.device" = "cpu", seed: int = 0,
          max_grad_norm: float | None = 1.0, growth_interval: int | None = None,
          log: Callable[[str], None] | None = None,
          on_step: Callable[[int, float, float], None] | None = None) -> Run:
    """Train `task.make_model()` in `precision` (one of TRAINABLE; "fp32" = unconverted) and evaluate it.

    Same `seed` -> same initial weights, same batches and the same dropout seed in every precision.
    "fp8" converts with `Fp8Options.always()` (see the module docstring) and fills `Run.fp8_gemms`.
    `growth_interval`: clean fp16 steps before the loss scale doubles (None: GradScaler's 2000).
    `log(line)` gets a line per step; `on_step(step, loss, scale)` the same as numbers.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    model = task.make_model().to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    start = time.perf_counter()
    if precision != "fp32":
        x0, _ = task.batch(0, torch.Generator().manual_seed(seed + 2))
        fp8 = {"fp8": _forced_fp8(device)} if precision == "fp8" else {}
        model = convert(model, (x0.to(device),), precision=precision, mode="train", **fp8)
    convert_s = time.perf_counter() - start
    fp8_linears, fp8_gemms = fp8_summary(model, device) if precision == "fp8" else (0, "")
    scale_opts = {} if growth_interval is None else {"growth_interval": growth_interval}
    scaler = make_scaler(precision if precision != "fp32" else model, device=device, **scale_opts)
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
        if on_step is not None:
            on_step(step, losses[-1], scaler.scale)
    model.eval()
    with torch.no_grad():
        x, y = task.test
        accuracy = task.accuracy(model(x.to(device)).float(), y.to(device))
    warm = times[min(5, len(times) - 1):]
    return Run(task.name, precision, losses, accuracy, 1e3 * statistics.median(warm),
               [tuple(h) for h in scaler.history], list(scaler.skipped), repr(scaler), convert_s, fp8_gemms,
               fp8_linears)


def _forced_fp8(device: torch.device):
    """Fp8Options for the demo: every eligible GEMM in FP8, whatever its size.

    The cost model keeps GEMMs below ~8192 rows or 2^31 M*N*K in bf16, i.e. every GEMM of these models.
    Its target is the device when that has FP8 GEMMs, else an H100 (sm_90): planned for the current
    GPU, a pre-sm_89 one would keep every GEMM in bf16 ("no FP8 tensor cores") and show nothing, while
    planned for an H100 the GEMMs are emulated here with the same quantization.
    """
    return Fp8Options.always(target=None if fp8_gemm_supported(device) else "sm_90")


def fp8_summary(model: nn.Module, device: "str | torch.device") -> tuple[int, str]:
    """(linears in FP8, one line on the FP8 GEMMs) of a model converted with precision="fp8", mode="train".

    "9 of 9 linears in FP8 (...); scaled_dot_product_attention x2 stay bf16 (...); emulated: <why>",
    parts joined by "; " (`report` prints one a line). Reads the FP8 records (`rewriter.meta.FP8`) of the
    training graph, the one gradients flow through, as rewriter/loss_scale.py does; a record with rule
    "op" and no weight is a tensor-core op the FP8 rewrite does not handle (convolution, attention, bmm).
    """
    linears, others = [], Counter()
    for n in model.graph.nodes:
        r = meta.get(n, meta.FP8)
        if r and (r.get("rule") != "op" or "weight" in r):
            linears.append((n, r))
        elif r:
            others[(meta.get(n, meta.OP_CLASS) or {}).get("op", str(n.target))] += 1
    used = [r for _, r in linears if r.get("use") and r.get("training")]
    parts = [f"{len(used)} of {len(linears)} linear{'s' if len(linears) != 1 else ''} in FP8"
             + (" (e4m3 forward, e5m2 gradients, dynamic per-tensor scales), forced by Fp8Options.always() "
                "whatever their size" if used else "")]
    kept: dict[str, list[str]] = {}
    for n, r in linears:
        if not (r.get("use") and r.get("training")):
            # "kept bf16: N=10 not a multiple of 16 (torch._scaled_mm needs ...)" -> "N=10 not a multiple of 16"
            why = str(r.get("reason", "")).partition(": ")[2] or str(r.get("reason", ""))
            why = why.split(" (")[0].split("; ")[0]
            kept.setdefault(why, []).append(str(r.get("weight", n.name)).removesuffix(".weight"))
    for why, names in list(kept.items())[:3]:
        parts.append(f"{', '.join(names[:4])}{' ...' if len(names) > 4 else ''} kept bf16: {why}")
    if len(kept) > 3:
        parts.append(f"{sum(len(v) for v in list(kept.values())[3:])} more kept bf16")
    if others:
        ops = ", ".join(f"{op} x{count}" if count > 1 else op for op, count in others.items())
        parts.append(f"{ops} stay{'s' if sum(others.values()) == 1 else ''} bf16 (the FP8 rewrite "
                     "handles linears only)")
    if not used:
        parts.append("no FP8 GEMM: this run computes as bf16 does")
    else:
        reason = emulation_reason(device)
        parts.append(f"emulated: {reason}" if reason else "on FP8 tensor cores (torch._scaled_mm)")
    return len(used), "; ".join(parts)


# ---------------------------------------------------------------- report


def scale_at(run: Run, step: int) -> float:
    """The loss scale `run` used at `step` (from its history of changes)."""
    scale = run.scale_history[0][1] if run.scale_history else 1.0
    for at, value in run.scale_history:
        if at <= step:
            scale = value
    return scale


def _curve_table(runs: list[Run], every: int) -> str:
    steps = len(runs[0].losses)
    scaled = [r for r in runs if r.precision == "fp16"]
    head = "  step " + "".join(f"{r.precision:>10s}" for r in runs) + "".join(
        f"  {r.precision + ' loss scale':>16s}" for r in scaled)
    lines = [head]
    for s in list(range(0, steps, every)) + ([steps - 1] if (steps - 1) % every else []):
        # mean over the window ending at s: single-batch losses are noisy
        lo = max(0, s - every + 1)
        lines.append(f"  {s:4d} " + "".join(f"{sum(r.losses[lo:s + 1]) / (s + 1 - lo):10.4f}" for r in runs)
                     + "".join(f"  {scale_at(r, s):16g}" for r in scaled))
    return "\n".join(lines)


def _scale_text(run: Run) -> str:
    if run.precision == "fp32":
        return "none (fp32)"
    if run.precision == "fp8" and run.scaler.startswith("LossScaler(disabled"):
        # make_scaler's reason is long for fp8: bf16's and then the e5m2 gradients' own scaling
        return "none: bf16 has fp32's exponent range" + (
            "" if not run.fp8_linears else
            ", and FP8 GEMMs scale their e5m2 gradients per tensor on every call (amax / 57344)")
    if run.precision != "fp16":
        return "none: " + run.scaler.partition("; ")[2].rstrip(")")
    changes = " -> ".join(f"{v:g}" + (f" (step {s})" if s else "") for s, v in run.scale_history[:6])
    more = " ..." if len(run.scale_history) > 6 else ""
    skipped = (f"; skipped {len(run.skipped)} step(s) on inf/NaN gradients: {run.skipped[:5]}"
               if run.skipped else "; no step skipped")
    return f"dynamic: {changes}{more}{skipped}"


def report(runs: list[Run], every: int, title: str = "") -> str:
    """Loss curves (window means), fp16 loss scale, accuracy, step time, for the runs of one task;
    under the table, an fp8 run's FP8 GEMMs (`Run.fp8_gemms`)."""
    every = max(1, every)
    out = [f"== {runs[0].task}" + (f": {title}" if title else ""),
           f"  loss (mean over the last {every} steps)" if every > 1 else "  loss (per step)",
           _curve_table(runs, every), ""]
    base = next((r for r in runs if r.precision == "fp32"), runs[0])
    out.append(f"  {'precision':9s} {'accuracy':>9s} {'vs ' + base.precision:>8s} {'step ms':>8s} "
               f"{'convert s':>9s}  loss scale")
    for r in runs:
        out.append(f"  {r.precision:9s} {100 * r.accuracy:8.2f}% {100 * (r.accuracy - base.accuracy):+7.2f}pp "
                   f"{r.step_ms:8.2f} {r.convert_s:9.1f}  {_scale_text(r)}")
    for r in runs:
        if r.fp8_gemms:
            head = f"  {r.precision} GEMMs: "
            parts = r.fp8_gemms.split("; ")
            out += [(head if i == 0 else " " * len(head)) + part for i, part in enumerate(parts)]
    return "\n".join(out)


def notes(runs: list[Run], device: "str | torch.device", *, growth_interval: int,
          fp8_warnings: "list[str] | None" = None) -> list[str]:
    """The explanations printed under the tables of a training-demo run: fp16 loss scaling, why fp8 is
    forced and emulated, what step times on this device mean, runs whose loss is not finite.
    `fp8_warnings` are Fp8EmulationWarning messages caught during the runs (said once here)."""
    import math

    device = torch.device(device)
    precisions = {r.precision for r in runs}
    out = []
    if "fp16" in precisions:
        out.append(f"fp16 loss scale: dynamic (torch.amp.GradScaler through rewriter.loss_scale): it starts "
                   f"at 65536, doubles after {growth_interval} clean steps (--growth-interval; GradScaler's "
                   "default, 2000, would not move within a short run) and halves on an inf/NaN gradient, whose "
                   "step is skipped. bf16 and fp32 need no scaling.")
    if "fp8" in precisions:
        out += _fp8_notes(device, fp8_warnings or [], runs)
    if device.type == "cpu":
        out.append("step times are measured on the CPU, where 16-bit kernels (fp16 above all) are often "
                   "slower than fp32. Loss curves and accuracy are meaningful on any device.")
    else:
        out.append("these models are tiny: their steps are bound by kernel launches, not arithmetic, so "
                   "16-bit steps are not faster here; python -m tools.bench_train times realistic sizes.")
    for r in runs:
        if not all(math.isfinite(v) for v in r.losses[-1:]):
            out.append(f"{r.task} {r.precision}: the final loss is not finite ({r.losses[-1]})")
    return out


def _fp8_notes(device: torch.device, fp8_warnings: list[str], runs: list[Run]) -> list[str]:
    import math

    from rewriter.passes.plan.fp8_cost import FP8_MIN_MNK, FP8_MIN_ROWS
    from rewriter.runtime.fp8_ops import emulation_reason

    out = [f"fp8 forces every eligible linear into FP8 GEMMs (Fp8Options.always()): the demo's GEMMs (under "
           f"a thousand rows of batch x sequence) are far below the size where FP8 pays, and the cost model "
           f"alone would keep them all in bf16 (it wants at least {FP8_MIN_ROWS} rows and M*N*K >= "
           f"2^{int(math.log2(FP8_MIN_MNK))}). The fp8 rows show FP8's numerics, not its speed; "
           "python -m tools.bench_train --device cuda --compile --models llama_mlp,gpt2_medium --variants bf16,fp8 "
           "times FP8 training at realistic sizes."]
    reason = emulation_reason(device)
    if reason is not None and any(r.fp8_linears for r in runs):
        where = "the CPU" if device.type == "cpu" else f"{device} ({reason.partition(': ')[0]})"
        out.append(f"on {where} the FP8 GEMMs are emulated: quantized to e4m3 and e5m2 as on an FP8 GPU, then "
                   "multiplied in fp32. Same numerics, no speed-up: fp8 step times here say nothing about FP8's.")
    for message in dict.fromkeys(fp8_warnings):  # e.g. torch._scaled_mm refused a GEMM on an FP8 GPU
        if message != reason:
            out.append(f"fp8: {message}")
    return out
