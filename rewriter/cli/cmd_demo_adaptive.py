"""`rewrite demo --train --adaptive [fp8|fp16]`: adaptive precision on a planted instability
(rewriter/adaptive_demo.py trains; this module checks the options, runs and prints, within 80 columns)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from rewriter.cli.outputs import staged
from rewriter.cli.ui import Ui

__all__ = ["adaptive_demo"]

_NOT_HERE = ("--task", "--precisions", "--log-every", "--growth-interval")


def adaptive_demo(args, ui: Ui) -> int:
    """Train the planted model in bf16, static `args.adaptive` and adaptive; print losses, the timeline."""
    import json

    import torch

    from rewriter import adaptive_demo as ad
    from rewriter.errors import InputError
    from rewriter.files import check_writable

    given = [flag for flag in _NOT_HERE if getattr(args, flag[2:].replace("-", "_")) is not None]
    if given:
        raise InputError(f"{', '.join(given)} belong{'s' if len(given) == 1 else ''} to the training demo's "
                         "tasks; the adaptive demo trains its own planted model: drop "
                         f"{'it' if len(given) == 1 else 'them'} or drop --adaptive")
    if args.device not in (None, "cpu"):
        raise InputError(f"--device {args.device}: the adaptive demo trains a small model on the CPU (FP8 "
                         "emulated); drop --device")
    precision, steps = args.adaptive, args.steps or ad.STEPS
    seed = 0 if args.seed is None else args.seed
    json_path = Path(args.json) if args.json else None
    if json_path is not None:
        check_writable(json_path, force=args.force, what="--json file")
    from rewriter.adaptive_plot import picture_path, write_picture

    if args.picture:  # checked as the file really written (.svg for a .png without matplotlib)
        picture = check_writable(picture_path(args.picture), force=args.force, what="--picture file")
    else:  # the default is the demo's own file: replaced on every run
        picture = Path(picture_path(str(Path(tempfile.gettempdir()) / f"rewrite-adaptive-{precision}.png")))
    threads = args.threads or 1
    old_threads = torch.get_num_threads()
    ui.print(f"rewrite demo --train --adaptive {precision}: a planted instability trained {steps} steps in "
             f"bf16, static {precision} and adaptive {precision} on the CPU, torch {torch.__version__}\n")
    try:
        torch.set_num_threads(threads)
        with ui.step(f"training bf16, static {precision}, adaptive {precision} ({steps} steps each)"):
            result = ad.run_demo(precision, steps=steps, seed=seed)
    finally:
        torch.set_num_threads(old_threads)
    _print_result(ui, result)
    written = write_picture(result["timeline"], str(picture))
    ui.out.print(f"picture: {written}", markup=False, highlight=False, soft_wrap=True)  # a path stays whole
    if json_path is not None:
        with staged(json_path, args.force, "--json file") as tmp:
            tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
        ui.print(f"wrote {json_path}")
    return 0


def _print_result(ui: Ui, result: dict) -> None:
    from rewriter.adaptive_demo import timeline_text

    p, loss, skipped = result["precision"], result["loss"], result.get("skipped")
    ui.print(f"{'run':<16}{'eval loss':>10}{'vs bf16':>9}" + (f"{'skipped steps':>15}" if skipped else ""))
    for label, key in (("bf16", "bf16"), (f"static {p}", p), (f"adaptive {p}", "adaptive")):
        rel = "" if key == "bf16" else f"{loss[key] / loss['bf16'] - 1:+.1%}"
        count = "-" if key == "bf16" else str(len(skipped[key])) if skipped else ""
        ui.print(f"{label:<16}{loss[key]:>10.4f}{rel:>9}" + (f"{count:>15}" if skipped else ""))
    timeline = result["timeline"]
    ui.print(f"\n{p.upper()} share of the adaptive run's GEMM FLOPs: {timeline['low_flop_fraction']:.1%}; "
             "per-layer precision:")
    for line in timeline_text(timeline, width=min(ui.width, 80)):
        ui.out.print(line, markup=False, highlight=False, soft_wrap=True)
    if not timeline["events"]:
        ui.print("(no switch)")
