"""`rewrite convert MODEL -o OUT`: convert, check against fp32, write .pt2 or .onnx (and a report)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

from rewriter.cli.loading import dynamic_shapes_from, example_inputs, load_calibration, load_model
from rewriter.cli.options import backend_choice, backend_label, check_backend_here, pass_through
from rewriter.cli.outputs import check_outputs, staged, staged_dir
from rewriter.cli.ui import Ui

__all__ = ["run"]


def _onnx_exporter() -> Callable:
    """rewriter.export_onnx (the public name: wherever the ONNX backend lives in this installation)."""
    import rewriter
    from rewriter.errors import InputError

    try:
        return getattr(rewriter, "export_onnx")
    except (ImportError, AttributeError) as exc:
        raise InputError(f"cannot write .onnx: rewriter.export_onnx is not available in this installation "
                         f"({exc}). Write a .pt2 instead (-o model.pt2), or install the ONNX extras "
                         "(pip install onnx onnxscript onnxruntime)") from exc


def _check_flags(args, suffix: str, out: Path, backend: "str | None") -> None:
    from rewriter.errors import InputError

    if suffix not in (".pt2", ".onnx"):
        raise InputError(f"output {str(out)!r}: unknown file type {suffix or '(no suffix)'!r}; name it "
                         "'*.pt2' (torch.export program) or '*.onnx'")
    if backend is not None and suffix == ".onnx":
        raise InputError(f"--backend {backend} chooses how PyTorch runs a .pt2; {str(out)!r} is an ONNX file, "
                         "which ONNX Runtime runs with its own execution providers: drop --backend, or "
                         "write a .pt2")
    if backend is not None:
        check_backend_here(backend)  # cuda_graphs without a GPU: refused before any work
    onnx_only = [f for f, on in (("--optimize", args.optimize), ("--assume-right-padding", args.assume_right_padding),
                                 (f"--target {args.target}", args.target)) if on]
    if onnx_only and suffix != ".onnx":
        raise InputError(f"{' and '.join(onnx_only)}: these flags shape an ONNX export; {str(out)!r} is a "
                         ".pt2: drop them, or write a .onnx")
    if args.assume_right_padding and not args.optimize:
        raise InputError("--assume-right-padding rewrites ONNX Runtime's fused Attention nodes: add --optimize")


def run(args, ui: Ui) -> int:
    import rewriter
    from rewriter import meta
    from rewriter.diff import diff
    from rewriter.errors import InputError
    from rewriter.files import writing
    from rewriter.io import prepare
    from rewriter.measure import compare
    from rewriter.pipeline import is_converted
    from rewriter.programs import program_name

    out = Path(args.output)
    suffix = out.suffix.lower()
    report = Path(args.report) if args.report else None
    backend, backend_opts = backend_choice(args)
    _check_flags(args, suffix, out, backend)
    check_outputs([args.model], [(out, "output"), (report, "report")], args.force)
    exporter = _onnx_exporter() if suffix == ".onnx" else None
    shape_options = pass_through(rewriter.convert, "rewriter.convert", {
        "dynamic_shapes": ("--dynamic", args.dynamic), "static": ("--static", args.static)})  # checked early
    if args.capture_time_limit is not None:  # 0: no limit
        shape_options["capture_time_limit"] = args.capture_time_limit or None
    export_options = pass_through(exporter, "rewriter.export_onnx", {"target": ("--target", args.target)}) \
        if exporter is not None else {}
    calibration = load_calibration(args.calibration) if args.calibration else None

    with ui.step(f"loading {args.model}"):
        loaded = load_model(args.model, trust_pickle=args.trust_pickle)
        if is_converted(loaded.model):
            done = (loaded.model.meta.get(meta.INFO) or {}).get("config", {}).get("precision", "?")
            raise InputError(f"{args.model} is already converted (to {done}); convert the original fp32 "
                             "model instead")
        ex_args, ex_kwargs = example_inputs(loaded, args.input_shape, args.input_dtype)
        if "dynamic_shapes" in shape_options:
            shape_options["dynamic_shapes"] = dynamic_shapes_from(args.dynamic, loaded.model, ex_args, ex_kwargs)

    with ui.step(f"converting to {args.precision} (capture, analysis, rewrite)") as status:
        with contextlib.redirect_stderr(ui.progress(status)):
            gm = rewriter.convert(loaded.model, ex_args, ex_kwargs, precision=args.precision,
                                  overrides=args.override or None, calibration=calibration,
                                  tolerance=args.tolerance, progress=True, backend=backend or "eager",
                                  backend_options=backend_opts or None, **shape_options,
                                  **({"budget_lowering": False} if args.no_budget_lowering else {}))
    if backend not in (None, "eager"):
        from rewriter.backends.torch_backend import graph_module_of

        # the record (gm.meta["rewriter"]["config"]) names the backend; the checks, the diff and the
        # file use the converted graph itself (compiling it here would only cost time)
        gm = graph_module_of(gm)

    if loaded.kind == "pt2" and isinstance(gm.meta.get(meta.INFO), dict):
        gm.meta[meta.INFO]["model"] = program_name(loaded.model) or loaded.path.stem
    with ui.step("checking the converted model against fp32 on the example inputs"):
        import torch

        with torch.no_grad():
            errors = compare(loaded.model(*ex_args, **ex_kwargs), gm(*ex_args, **ex_kwargs))

    with ui.step("comparing before and after" + (" (report)" if report else "")):
        d = diff(loaded.model, gm, capture_before=report is not None)
        html = d.to_html() if report is not None else None

    prepared, exported = None, None
    if suffix == ".pt2":
        with ui.step(f"exporting the converted program for {out.name}"):
            prepared = prepare(gm, where=repr(str(out)))
    with ui.step(f"writing {out}" + (f" and {report}" if report else "")):
        staged_out = staged(out, args.force, "output") if prepared is not None \
            else staged_dir(out, args.force, "output")
        with staged_out as tmp_out, staged(report, args.force, "report") as tmp_report:
            with writing(tmp_out):  # a disk-full error names the file it happened to
                if prepared is not None:
                    prepared.write(tmp_out)
                else:
                    exported = exporter(gm, str(tmp_out), optimize=args.optimize,
                                        assume_right_padding=args.assume_right_padding, **export_options)
            if tmp_report is not None:
                with writing(tmp_report):
                    tmp_report.write_text(html, encoding="utf-8")
    _print_summary(ui, args, d, out, report, errors, exported, backend, backend_opts)
    return 0


def _fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.2e}"


def _print_summary(ui: Ui, args, d, out: Path, report, errors, exported, backend, backend_opts) -> None:
    from rewriter.diff import format_bytes, short_dtype

    s = d.summary
    rows = [("converted", f"{s.model} -> {args.precision} ({s.capture}"
                          f"{', dynamic batch' if s.dynamic_batch else ''})"),
            ("output", f"{out} ({format_bytes(out.stat().st_size)})")]
    if report is not None:
        rows.append(("report", str(report)))
    per = ", ".join(f"{short_dtype(k)} {v}" for k, v in sorted(s.precision_after.items()))
    rows.append(("compute nodes", f"{s.compute_nodes}: {per}"))
    rows.append(("casts", f"+{s.casts_added} added" + (f", -{s.casts_removed} removed" if report else "")))
    pct = 100.0 * s.param_bytes_saved / s.param_bytes_before if s.param_bytes_before else 0.0
    rows.append(("parameters", f"{format_bytes(s.param_bytes_before)} -> {format_bytes(s.param_bytes_after)} "
                               f"(saved {pct:.0f}%)"))
    error = f"relative L2 {_fmt(errors.rel_l2)}, max abs {_fmt(errors.max_abs)} (example inputs)"
    rows.append(("error vs fp32", error + (f"; n/a: {errors.reason}" if errors.reason else "")))
    if exported is not None and args.optimize:
        rows.append(("onnx fusions", ", ".join(f"{k} {v}" for k, v in exported.fusions.items()) or "none"))
        for note in exported.fusion_notes:
            if any(w in note for w in ("skipped", "not applied", "right_padding", "raised", "fp32")):
                rows.append(("", note))
    if backend not in (None, "eager"):
        kwargs = "".join(f", {k}={v!r}" for k, v in backend_opts.items())
        rows.append(("backend", f"{backend_label(backend, backend_opts)}, recorded in {out.name} and applied "
                                f"when the model runs: `rewrite bench {out}`, or in Python "
                                f"rewriter.backends.torch_backend.optimize(rewriter.load({str(out)!r}), "
                                f"mode={backend!r}{kwargs})"))
    if not ui.quiet:
        rows += [("note", note) for note in s.notes]
    ui.fields(rows)
