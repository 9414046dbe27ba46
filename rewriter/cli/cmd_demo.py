"""`rewrite demo`: the conversion demo (rewriter/demo.py) or, with --train, the mixed-precision training
demo (rewriter/train_demo.py: tasks, training, report and notes live there; this module runs and prints)."""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

from rewriter.cli.loading import device_from
from rewriter.cli.outputs import staged
from rewriter.cli.ui import Ui, esc

__all__ = ["run"]

_GROWTH_INTERVAL = 50   # the training demo's fp16 loss-scale growth interval (GradScaler's default: 2000)
_LOG_EVERY = 25


def run(args, ui: Ui) -> int:
    from rewriter.errors import InputError

    training = {"--task": args.task, "--precisions": args.precisions, "--steps": args.steps,
                "--log-every": args.log_every, "--seed": args.seed, "--threads": args.threads,
                "--growth-interval": args.growth_interval, "--json": args.json, "--force": args.force or None,
                "--adaptive": args.adaptive, "--picture": args.picture}
    if args.generate:
        if args.train:
            raise InputError("--generate and --train are two demos: run one at a time")
        from rewriter import generation_demo

        return int(generation_demo.main(["--kv8"] if args.kv8 else []) or 0)
    if args.kv8:
        raise InputError("--kv8 only applies to the generation demo: rewrite demo --generate --kv8")
    if args.train:
        if args.precision is not None:
            raise InputError(f"--precision {args.precision} picks the conversion demo's precision; the "
                             "training demo trains in several: give them with --precisions, e.g. "
                             "rewrite demo --train --precisions fp32,bf16")
        if args.adaptive:
            from rewriter.cli.cmd_demo_adaptive import adaptive_demo

            return adaptive_demo(args, ui)
        if args.picture:
            raise InputError("--picture is the adaptive-precision demo's picture: add --adaptive "
                             "(rewrite demo --train --adaptive --picture precision.svg)")
        return _train_demo(args, ui)
    given = [flag for flag, value in training.items() if value is not None]
    if given:
        raise InputError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to the training "
                         f"demo: add --train (rewrite demo --train {given[0]} ...)")
    try:
        from rewriter.demo import run_demo
    except ImportError as exc:
        ui.error(f"the demo is not available in this installation ({exc})")
        return 1
    code = run_demo(precision=args.precision or "fp16", device=args.device)
    return 0 if code is None else int(code)


def _train_demo(args, ui: Ui) -> int:
    """`rewrite demo --train`: rewriter/train_demo.py's tasks, trained per precision, reported."""
    import json

    import torch

    from rewriter import train_demo as td
    from rewriter.files import check_writable

    device = device_from(args.device)
    names = list(td.TASKS) if args.task in (None, "all") else [args.task]
    precisions = args.precisions or list(td.PRECISIONS)
    if "digits" in names:
        td.require_sklearn()  # before any work: the error names the package and the pip command
    json_path = Path(args.json) if args.json else None
    if json_path is not None:
        check_writable(json_path, force=args.force, what="--json file")
    seed = 0 if args.seed is None else args.seed
    log_every = args.log_every or _LOG_EVERY
    growth = args.growth_interval or _GROWTH_INTERVAL
    threads = args.threads or (1 if device.type == "cpu" else None)
    old_threads = torch.get_num_threads()
    where = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    ui.print(f"rewrite demo --train: {' vs '.join(precisions)} training with rewriter.convert(mode='train') on "
             f"{where}, torch {torch.__version__}"
             + (f", {threads} CPU thread{'s' if threads != 1 else ''}" if threads else "")
             + "; every precision starts from the same weights and sees the same batches\n")
    all_runs: list = []
    fp8_warnings: list[str] = []
    try:
        if threads:
            torch.set_num_threads(threads)
        for name in names:
            with ui.step(f"{name}: preparing the data"):
                task = td.make_task(name, seed=seed)
            steps = args.steps or td.TASKS[name][1]
            runs = [_train_one(ui, td, task, precision, steps, device, seed, growth, fp8_warnings)
                    for precision in precisions]
            sys.stdout.write(td.report(runs, log_every, task.title) + "\n\n")
            sys.stdout.flush()
            all_runs += runs
    finally:
        torch.set_num_threads(old_threads)
    for note in td.notes(all_runs, device, growth_interval=growth, fp8_warnings=fp8_warnings):
        ui.note(note)
    if json_path is not None:
        payload = {"device": str(device), "torch": torch.__version__, "threads": threads, "seed": seed,
                   "growth_interval": growth, "precisions": precisions,
                   "runs": [dataclasses.asdict(r) for r in all_runs]}
        with staged(json_path, args.force, "--json file") as tmp:
            tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
        ui.print(f"wrote {json_path}")
    finite = all(all(v == v and abs(v) != float("inf") for v in r.losses[-1:]) for r in all_runs)
    return 0 if finite else 1


@contextlib.contextmanager
def _fp8_warnings_caught(into: list[str]) -> Iterator[None]:
    """Record Fp8EmulationWarning messages into `into` instead of printing them in the middle of the
    progress lines (the notes say it once, at the end); other warnings are re-issued as they were."""
    from rewriter.runtime.fp8_ops import Fp8EmulationWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Fp8EmulationWarning)  # `main` ignores warnings without --verbose
        yield
    for w in caught:
        if issubclass(w.category, Fp8EmulationWarning):
            into.append(str(w.message).removeprefix("rewriter: "))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def _train_one(ui: Ui, td, task, precision: str, steps: int, device, seed: int, growth: int,
               fp8_warnings: list[str]):
    """One training run, with a progress line on stderr (a live step counter on a terminal; every step
    with --verbose); Fp8EmulationWarning messages go to `fp8_warnings`, for the notes."""
    label = f"{task.name}: training in {precision} on {device}, {steps} step{'s' if steps != 1 else ''}"
    start = time.perf_counter()
    with ui.err.status(esc(label + " (converting)" if precision != "fp32" else label)) as status:
        def on_step(step: int, loss: float, scale: float) -> None:
            if step % 10 == 0 or step == steps - 1:
                status.update(esc(f"{label}: step {step + 1}/{steps}, loss {loss:.4f}"
                                  + (f", loss scale {scale:g}" if precision == "fp16" else "")))

        log = (lambda line: ui.err.print(line, markup=False, highlight=False)) if ui.verbose else None
        caught = _fp8_warnings_caught(fp8_warnings) if precision == "fp8" else contextlib.nullcontext()
        with caught:
            run = td.train(task, precision, steps=steps, device=device, seed=seed, growth_interval=growth,
                           log=log, on_step=on_step)
    ui.err.print(f"[green]\u2713[/green] {esc(label)}: final loss {run.losses[-1]:.4f}, accuracy "
                 f"{100 * run.accuracy:.1f}% [dim]({time.perf_counter() - start:.1f}s)[/dim]", highlight=False)
    return run
