"""`rewrite bench MODEL`: latency, peak memory and error of fp32, torch.autocast and the converted model.

Timing, memory and errors come from rewriter.measure (the harness tools/ uses too): every variant is
checked once, its peak memory measured over one call, then all are timed round-robin.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

from rewriter.cli.loading import Loaded, device_from, example_inputs, load_model
from rewriter.cli.options import backend_choice, backend_label, check_backend_here, recorded_backend
from rewriter.cli.ui import Ui, fit_table

__all__ = ["run"]


@dataclasses.dataclass
class _Variant:
    name: str
    fn: Callable[[], Any]
    weight_bytes: int
    note: str = ""                 # a footnote on the row (what it runs, when its name cannot say)
    converted: bool = False        # its outputs must match the reference's structure
    first_call: str = ""           # what its first (untimed) call does besides running
    cells: dict = dataclasses.field(default_factory=dict)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _reference_for(args, ui: Ui, loaded: Loaded, notes: list):
    """The fp32 model to measure a converted MODEL against: --reference, else the fp32 twin of a .pt2."""
    from rewriter.errors import InputError
    from rewriter.pipeline import is_converted
    from rewriter.programs import fp32_twin

    if args.reference:
        with ui.step(f"loading reference {args.reference}"):
            reference = load_model(args.reference, trust_pickle=args.trust_pickle).model
        if is_converted(reference):
            raise InputError(f"--reference {args.reference!r} is itself a converted model; give the original "
                             f"fp32 model that {args.model} was converted from")
        return reference
    if loaded.kind == "pt2":
        notes.append("reference: the converted graph computing in fp32 with its stored weights "
                     "(pass --reference ORIGINAL for the original fp32 model)")
        return fp32_twin(loaded.model)
    raise InputError(f"{args.model} is already converted: pass the original model with --reference")


def _expected(args, reference, b_args, b_kwargs):
    """The reference's outputs; a --reference that cannot take MODEL's inputs is the user's to fix."""
    import torch

    from rewriter.errors import InputError

    try:
        with torch.no_grad():
            return reference(*b_args, **b_kwargs)
    except Exception as exc:
        if not args.reference:
            raise
        raise InputError(f"--reference {args.reference!r} does not accept the inputs of {args.model} "
                         f"({type(exc).__name__}: {_first_line(exc)}); give the original fp32 model that "
                         f"{args.model} was converted from") from exc


def run(args, ui: Ui) -> int:
    import torch

    import rewriter
    from rewriter import meta
    from rewriter.config import Precision
    from rewriter.diff import parameter_bytes
    from rewriter.errors import InputError
    from rewriter.pipeline import is_converted

    device = device_from(args.device)
    backend, backend_opts = backend_choice(args)
    if backend is not None:
        check_backend_here(backend, device)
    notes: list[str] = []
    with ui.step(f"loading {args.model}"):
        loaded = load_model(args.model, trust_pickle=args.trust_pickle)
        ex_args, ex_kwargs = example_inputs(loaded, args.input_shape, args.input_dtype)
    if is_converted(loaded.model):
        converted = loaded.model
        done = (converted.meta.get(meta.INFO) or {}).get("config", {}).get("precision", "fp16")
        if args.precision and args.precision != done:
            raise InputError(f"{args.model} is converted to {done}; --precision {args.precision} would need "
                             "the original model: bench the original instead")
        precision = done
        reference = _reference_for(args, ui, loaded, notes)
    else:
        if args.reference:
            raise InputError(f"--reference compares a converted MODEL with its original; {args.model} is not "
                             "converted, so it is the reference itself: drop --reference")
        precision = args.precision or "fp16"
        reference = loaded.model
        with ui.step(f"converting to {precision}") as status:
            with contextlib.redirect_stderr(ui.progress(status)):
                converted = rewriter.convert(reference, ex_args, ex_kwargs, precision=precision, progress=True)
    if backend is None:  # what `rewrite convert --backend` recorded, if anything
        backend, backend_opts = recorded_backend(converted, device, notes)
    low = Precision.parse(precision).island_dtype
    b_args, b_kwargs = _to_device((ex_args, ex_kwargs), device)
    reference, converted = reference.to(device), converted.to(device)

    def autocast_run():
        with torch.autocast(device_type=device.type, dtype=low):
            return reference(*b_args, **b_kwargs)

    short = "bf16" if low == torch.bfloat16 else "fp16"
    variants = [_Variant("fp32", lambda: reference(*b_args, **b_kwargs), parameter_bytes(reference))]
    if precision == "fp8":  # autocast has no fp8: the row says what it runs
        variants.append(_Variant(f"autocast {short}", autocast_run, parameter_bytes(reference),
                                 f"torch.autocast has no FP8 mode: this row runs its {short} mode, the closest"))
    else:
        variants.append(_Variant(f"autocast {short}", autocast_run, parameter_bytes(reference)))
    variants.append(_Variant(f"converted {precision}", lambda: converted(*b_args, **b_kwargs),
                             parameter_bytes(converted), converted=True))
    if backend not in (None, "eager"):
        from rewriter.backends.torch_backend import optimize

        run_backend = optimize(converted, mode=backend, **backend_opts)
        variants.append(_Variant(f"converted {precision} + {backend_label(backend, backend_opts)}",
                                 lambda: run_backend(*b_args, **b_kwargs), parameter_bytes(converted),
                                 converted=True, first_call="compiles" if backend == "compile" else "captures"))
    expected = _expected(args, reference, b_args, b_kwargs)
    live = _check_variants(args, ui, variants, expected, device, notes)
    _time_variants(args, ui, live, device)
    _print_table(args, ui, variants, device)
    if device.type == "cpu":
        notes.append("no GPU here: latency is measured on the CPU, where fp16/bf16 kernels are often slower "
                     "than fp32, and peak memory is not tracked; the error columns are meaningful")
    for note in notes:
        ui.note(note)
    return 0


def _to_device(value, device):
    import torch
    import torch.utils._pytree as pytree

    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, value)


def _check_variants(args, ui: Ui, variants: list[_Variant], expected, device, notes: list) -> list:
    """One call of each variant: its error against the reference and its peak memory. A variant that
    fails gets a 'failed' row and a note; the converted model's outputs must match --reference's."""
    import torch

    from rewriter.diff import format_bytes
    from rewriter.errors import InputError
    from rewriter.measure import compare, peak_memory

    live = []
    for v in variants:
        first = f" (the first call {v.first_call}, untimed)" if v.first_call else ""
        with ui.step(f"checking {v.name} on {device}{first}"), torch.no_grad():
            try:
                out = v.fn()
                with peak_memory(device) as mem:
                    v.fn()
            except Exception as exc:
                v.cells = {"ms": "failed", "peak": "", "rel": type(exc).__name__, "max": ""}
                notes.append(f"{v.name} failed: {type(exc).__name__}: {_first_line(exc)}")
                continue
        err = compare(expected, out)
        if args.reference and v.converted and err.mismatch:
            raise InputError(f"--reference {args.reference!r} does not match {args.model}: {err.reason}. Give "
                             f"the original fp32 model that {args.model} was converted from")
        if err.reason:
            notes.append(f"{v.name}: error n/a: {err.reason}")
        v.cells = {"peak": format_bytes(mem.bytes) if mem.bytes is not None else "n/a",
                   "rel": _fmt(err.rel_l2), "max": _fmt(err.max_abs)}
        live.append(v)
    return live


def _time_variants(args, ui: Ui, live: list[_Variant], device) -> None:
    from rewriter.measure import round_robin

    if not live:
        return
    label = f"timing {len(live)} variants round-robin, {args.repeat} rounds"
    with ui.step(label) as status:
        times = round_robin([(v.name, v.fn) for v in live], device=device, warmup=args.warmup,
                            repeats=args.repeat,
                            on_round=lambda i: status.update(f"{label}: round {i + 1}/{args.repeat}"))
    for v in live:
        v.cells["ms"] = f"{times[v.name].median_ms:.3f}"


def _fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.2e}"


def _print_table(args, ui: Ui, variants: list[_Variant], device) -> None:
    import torch

    from rewriter.diff import format_bytes

    where = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    rows = [(v.name + (" *" if v.note else ""), v.cells.get("ms", ""), v.cells.get("peak", ""),
             format_bytes(v.weight_bytes), v.cells.get("rel", ""), v.cells.get("max", "")) for v in variants]
    ui.out.print(fit_table(("variant", "ms", "peak", "weights", "rel L2", "max abs"), rows, ui.width,
                           title=f"{args.model} on {where}"), markup=False, highlight=False)
    ui.print(f"ms: median per call over {args.repeat} round-robin rounds; rel L2, max abs: error vs the fp32 "
             "reference; peak: memory above the inputs during one call")
    for v in variants:
        if v.note:
            ui.print(f"* {v.note}")
