"""The `rewrite` command line: convert saved models, show what changed, measure, demo.

    rewrite convert model.pt2 --precision fp16 -o model-fp16.pt2 --report diff.html
    rewrite convert torchvision.models:resnet18 --input-shape 2,3,64,64 --precision bf16 -o r18.pt2
    rewrite convert model.pt --trust-pickle --precision fp16 -o model-fp16.onnx
    rewrite diff model.pt2 model-fp16.pt2 --html diff.html --json diff.json
    rewrite convert model.pt2 --precision bf16 --backend compile --compile-mode max-autotune -o m.pt2
    rewrite bench model-fp16.pt2 --reference model.pt2
    rewrite bench model-fp16.pt2 --backend compile --compile-mode reduce-overhead
    rewrite demo --precision bf16
    rewrite demo --train                  # fp32 vs fp16 vs bf16 training: digits CNN, small transformer
    rewrite demo --train --task reverse --precisions bf16,fp8     # FP8 training GEMMs (opt-in)

MODEL is a `.pt2` file (torch.export.save), a factory spec `package.module:callable` (called with no
arguments; needs --input-shape), or a pickled full module (`.pt`/`.pth`) with --trust-pickle.
Example inputs of a `.pt2` come from the shapes recorded in its placeholders; --input-shape (one per
tensor input) overrides them.

--backend eager|compile|cuda_graphs (and --compile-mode) choose how the converted graph runs
(backends/torch_backend.py). It is a run-time choice: a .pt2 stores the converted graph, not compiled
code, so `convert --backend` checks the choice, records it in the file's conversion record and `bench`
applies the recorded backend (in Python: rewriter.backends.torch_backend.optimize(rewriter.load(path), mode=...)).

Exit codes: 0 success; 2 bad usage or bad input (missing or corrupt file, unknown precision, shape
that does not fit, an existing output without --force: every `RewriterError`); 1 internal failure.
Outputs are written atomically (temporary file in the same folder, then rename): an output is
complete or absent. Inputs are only read. Progress goes to stderr, results to stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io as _stdio
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_INTERNAL", "EXIT_USAGE"]

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2
_PRECISIONS = ("fp16", "bf16", "fp8")
_BACKENDS = ("eager", "compile", "cuda_graphs")  # = rewriter.backends.torch_backend.MODES (not imported: --help stays fast)
_TRAIN_PRECISIONS = ("fp32", "fp16", "bf16", "fp8")  # = train_demo.TRAINABLE (not imported: it imports torch)
_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


# ---------------------------------------------------------------------- argument parsing


def _shape(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape: write positive integers separated by commas, e.g. 8,3,224,224")
    return dims


_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16",
           "fp16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float64": "float64", "int64": "int64", "long": "int64", "int32": "int32", "int": "int32",
           "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool"}


def _dtype(text: str) -> str:
    key = text.strip().lower().replace("torch.", "")
    if key not in _DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}: use one of float32, float16, "
                                         "bfloat16, float64, int64, int32, int8, uint8, bool")
    return _DTYPES[key]


def _backend(text: str) -> str:
    """--backend: a mode of rewriter.backends.torch_backend.optimize (aliases such as 'cuda-graphs' accepted)."""
    from rewriter.backends.torch_backend import check_options
    from rewriter.errors import ConfigError

    try:
        return check_options(text)
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"unknown backend {text!r}: write one of {', '.join(_BACKENDS)} (eager runs the converted "
            "GraphModule as it is, compile runs it through torch.compile, cuda_graphs replays CUDA "
            "graphs and needs a CUDA GPU)") from None


def _compile_mode(text: str) -> str:
    """--compile-mode: a torch.compile mode that inductor knows."""
    from rewriter.backends.torch_backend import check_options
    from rewriter.errors import ConfigError

    try:
        check_options("compile", {"compile_mode": text})
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (torch.compile's mode=...)") from None
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def _train_precisions(text: str) -> list[str]:
    """--precisions: a comma-separated list from fp32, fp16, bf16, fp8 (order kept, duplicates dropped)."""
    aliases = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16",
               "float8": "fp8"}
    result: list[str] = []
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        name = aliases.get(part, part)
        if name not in _TRAIN_PRECISIONS:
            raise argparse.ArgumentTypeError(
                f"cannot train in {part!r}: write a comma-separated list from {', '.join(_TRAIN_PRECISIONS)}, "
                "e.g. --precisions fp32,bf16 (fp32 is the unconverted model; fp8 is opt-in, not in the default "
                "fp32,fp16,bf16)")
        if name not in result:
            result.append(name)
    if not result:
        raise argparse.ArgumentTypeError("give at least one precision, e.g. --precisions fp32,fp16,bf16")
    return result


def _add_backend(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--backend", type=_backend, default=None, metavar="{eager,compile,cuda_graphs}",
                   help=help_text)
    p.add_argument("--compile-mode", type=_compile_mode, default=None, metavar="MODE",
                   help="torch.compile mode for --backend compile (implied when --backend is not given): "
                        "default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs")


def _add_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", type=_shape, default=[], metavar="SHAPE",
                   help="shape of one tensor input, e.g. 8,3,224,224; repeat for several inputs")
    p.add_argument("--input-dtype", action="append", type=_dtype, default=[], metavar="DTYPE",
                   help="dtype of the inputs (one for all, or one per --input-shape); default: as "
                        "recorded in a .pt2, else float32")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled .pt/.pth module (unpickling runs code from the file)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `rewrite` (exits with code 2 on bad usage, as argparse does)."""
    parser = argparse.ArgumentParser(
        prog="rewrite", description="Rewrite PyTorch models for FP16, BF16 and FP8, and show what changed.")
    parser.add_argument("--debug", action="store_true", help="show warnings and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("convert", help="convert a model and save it as .pt2 or .onnx",
                       description="Convert MODEL to lower precision and write OUT (.pt2 or .onnx).")
    p.add_argument("model", metavar="MODEL", help="a .pt2 file, a factory spec package.module:callable, "
                                                  "or a pickled .pt/.pth with --trust-pickle")
    p.add_argument("--precision", choices=_PRECISIONS, default="fp16", help="target precision (fp16)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file: .pt2 or .onnx")
    p.add_argument("--report", metavar="REPORT.html", help="also write the HTML diff report")
    p.add_argument("--override", action="append", default=[], metavar="KEY=PRECISION",
                   help="force an op ('softmax=fp16'), module regex ('re:encoder\\..*=fp32') or module "
                        "path ('classifier=fp32'); repeatable")
    p.add_argument("--calibration", metavar="FILE",
                   help="torch.save'd list of input tuples for measured decisions")
    p.add_argument("--tolerance", type=float, metavar="T", help="output error budget (needs --calibration)")
    p.add_argument("--force", action="store_true", help="overwrite OUT and REPORT if they exist")
    _add_backend(p, "how the converted model is to run: eager (the GraphModule as it is; the default), "
                    "compile (torch.compile) or cuda_graphs (captured and replayed; needs a CUDA GPU). A "
                    ".pt2 holds the converted graph, not compiled code: the choice is checked here, "
                    "recorded in the file, and applied when it runs (`rewrite bench` applies it; in "
                    "Python rewriter.backends.torch_backend.optimize(rewriter.load(OUT), mode=...)). .pt2 only")
    p.add_argument("--optimize", action="store_true",
                   help=".onnx only: apply ONNX Runtime fusions (attention, skip layer norm, GELU, BERT "
                        "embeddings) where they keep the precision decisions; the report says what was fused")
    p.add_argument("--assume-right-padding", action="store_true",
                   help=".onnx with --optimize only: attention reads the valid length of each row of a key "
                        "padding mask input (ONNX Runtime's faster 1-D mask_index, as its transformers "
                        "optimizer builds); wrong for left-padded rows, so off by default")
    _add_inputs(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("diff", help="show what a conversion changed, node by node",
                       description="Compare BEFORE (the original model) with AFTER (its conversion).")
    p.add_argument("before", metavar="BEFORE", help="the original model (.pt2, factory spec or pickle)")
    p.add_argument("after", metavar="AFTER", help="the converted .pt2 written by `rewrite convert`")
    p.add_argument("--html", metavar="FILE", help="write the HTML report")
    p.add_argument("--json", metavar="FILE", help="write the changed nodes as JSON")
    p.add_argument("--all", action="store_true", help="print every changed node, not the first 60")
    p.add_argument("--force", action="store_true", help="overwrite the --html/--json files if they exist")
    p.add_argument("--trust-pickle", action="store_true", help="allow a pickled BEFORE model")
    p.set_defaults(func=_cmd_diff)

    p = sub.add_parser("bench", help="latency, peak memory and error: fp32 vs autocast vs converted",
                       description="Measure MODEL in fp32, under torch.autocast and converted, on "
                                   "this machine's accelerator (or CPU).")
    p.add_argument("model", metavar="MODEL", help="a .pt2 (original or converted), factory spec or pickle")
    p.add_argument("--precision", choices=_PRECISIONS, default=None,
                   help="precision to convert to (default: the one MODEL was converted to, else fp16)")
    p.add_argument("--reference", metavar="MODEL",
                   help="the original fp32 model when MODEL is already converted")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--repeat", type=int, default=20, help="timed runs per variant (20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (3)")
    _add_backend(p, "also time the converted model run through this backend "
                    "(rewriter.backends.torch_backend.optimize): compile (torch.compile; the first call compiles, "
                    "untimed) or cuda_graphs (needs a CUDA GPU and --device cuda); eager times the "
                    "converted GraphModule only. Default: the backend recorded by `rewrite convert "
                    "--backend`, else eager")
    _add_inputs(p)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "demo", help="the whole flow on a built-in model, no files needed; --train: mixed-precision training",
        description="Convert a built-in transformer and compare it with fp32, torch.autocast and a blanket "
                    "cast. With --train: train a small CNN on scikit-learn's digits and a small transformer "
                    "on a synthetic task (reversing sequences) in fp32, fp16 and bf16 with "
                    "rewriter.convert(mode='train'), from the same initial weights on the same batches, and "
                    "print the loss curves, the fp16 loss scale over time, final accuracy and step time. "
                    "--precisions ...,fp8 adds FP8 training GEMMs (every eligible linear, emulated without "
                    "an FP8 GPU). The default --train run takes about a minute on a CPU; the digits task "
                    "needs scikit-learn (pip install scikit-learn).")
    p.add_argument("--precision", choices=_PRECISIONS, default=None,
                   help="precision of the conversion demo (fp16); with --train use --precisions")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    g = p.add_argument_group("training demo (--train)")
    g.add_argument("--train", action="store_true",
                   help="run the mixed-precision training demo instead of the conversion demo")
    g.add_argument("--task", choices=("digits", "reverse", "all"), default=None,
                   help="digits (CNN on scikit-learn's digits), reverse (transformer, synthetic) or all, "
                        "the default")
    g.add_argument("--precisions", type=_train_precisions, default=None, metavar="LIST",
                   help="precisions to train in, comma-separated from fp32,fp16,bf16,fp8 (default "
                        "fp32,fp16,bf16; fp32 is the unconverted model; fp8 puts every eligible linear in FP8 "
                        "GEMMs, emulated on a CPU or a GPU before sm_89)")
    g.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                   help="optimizer steps per run (digits 200, reverse 150)")
    g.add_argument("--log-every", type=_positive_int, default=None, metavar="N",
                   help="one loss-curve row every N steps, the mean of those steps (25)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the initial weights, the batches and dropout (0)")
    g.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads while training (on the CPU: 1, the fastest for these small models; "
                        "else torch's default)")
    g.add_argument("--growth-interval", type=_positive_int, default=None, metavar="N",
                   help="clean fp16 steps before the loss scale doubles (50; GradScaler's default, 2000, "
                        "would not move the scale within a short run)")
    g.add_argument("--verbose", action="store_true", help="print every training step (to stderr)")
    g.add_argument("--json", metavar="FILE", help="also write the settings and every run (losses, "
                                                   "accuracy, step time, loss scale history) as JSON")
    g.add_argument("--force", action="store_true", help="overwrite the --json file if it exists")
    p.set_defaults(func=_cmd_demo)
    return parser


# ---------------------------------------------------------------------- output helpers


class _Ui:
    """Rich consoles: results on stdout, progress and errors on stderr."""

    def __init__(self):
        from rich.console import Console

        self.out = Console(file=sys.stdout, soft_wrap=True, width=_width(sys.stdout))
        self.err = Console(file=sys.stderr, soft_wrap=True, width=_width(sys.stderr))

    def error(self, message: str) -> None:
        self.err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)

    def note(self, message: str) -> None:
        self.err.print(f"note: {message}", markup=False, highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[Any]:
        start = time.perf_counter()
        with self.err.status(text) as status:
            yield status
        self.err.print(f"[green]\u2713[/green] {_esc(text)} [dim]({time.perf_counter() - start:.1f}s)[/dim]",
                       highlight=False)


def _width(stream) -> int | None:
    """Terminals report their width; pipes and logs get 160 columns, so tables are not cut at 80."""
    try:
        if stream.isatty():
            return None
    except (AttributeError, ValueError):
        pass
    return int(os.environ["COLUMNS"]) if os.environ.get("COLUMNS", "").isdigit() else 160


def _esc(text: str) -> str:
    from rich.markup import escape

    return escape(text)


class _ProgressStream(_stdio.TextIOBase):
    """Stands in for stderr during convert(progress=True): '[rewrite] step: ...' lines update the
    spinner, anything else goes to the real stderr."""

    def __init__(self, status, passthrough):
        self.status, self.passthrough, self.buffer_ = status, passthrough, ""

    def write(self, text: str) -> int:
        self.buffer_ += text
        while "\n" in self.buffer_:
            line, self.buffer_ = self.buffer_.split("\n", 1)
            if line.startswith("[rewrite] "):
                self.status.update(f"converting: {_esc(line[10:][:100])}")
            elif line.strip():
                self.passthrough.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.passthrough.flush()


@contextlib.contextmanager
def _staged(path: "Path | None", force: bool, what: str) -> Iterator["Path | None"]:
    if path is None:
        yield None
        return
    from rewriter.io import atomic_write

    with atomic_write(path, force=force, what=what) as tmp:
        yield tmp


@contextlib.contextmanager
def _staged_dir(path: Path, force: bool, what: str) -> Iterator[Path]:
    """Like atomic_write, for exporters that may write side files (ONNX external data): they write
    into a private folder beside `path`; on success every file moves into place, main file last."""
    from rewriter.errors import InputError
    from rewriter.io import check_writable

    check_writable(path, force=force, what=what)
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        target = folder / path.name
        yield target
        if not target.exists() or target.stat().st_size == 0:
            raise InputError(f"the exporter wrote nothing to {what} {str(path)!r}")
        side = [f for f in folder.iterdir() if f.name != path.name]
        for f in side:
            check_writable(path.parent / f.name, force=force, what=f"{what} side file")
        for f in side + [target]:
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


# ---------------------------------------------------------------------- models and inputs


@dataclasses.dataclass
class _Loaded:
    model: Any
    spec: str
    kind: str                   # "pt2" | "factory" | "pickle"
    path: Path | None


def _is_factory(spec: str) -> bool:
    return bool(_FACTORY.match(spec)) and not Path(spec).exists()


def _importable_cwd() -> None:
    """Like `python -m`: modules in the working folder are importable (factories, pickled classes)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _load_factory(spec: str):
    import torch.nn as nn

    from rewriter.errors import InputError

    module_name, _, attr = spec.partition(":")
    _importable_cwd()
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise InputError(f"factory spec {spec!r}: cannot import module {module_name!r} "
                         f"({type(exc).__name__}: {exc}). Check the spelling and that the package is "
                         "installed or in the current folder") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"factory spec {spec!r}: module {module_name!r} has no attribute {attr!r}; "
                             "write package.module:function_that_returns_the_model")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        model = obj
    elif callable(obj):
        try:
            model = obj()
        except Exception as exc:
            raise InputError(f"factory spec {spec!r}: calling {attr}() with no arguments failed "
                             f"({type(exc).__name__}: {exc}); point the spec at a function that builds "
                             "the model without arguments") from exc
    else:
        raise InputError(f"factory spec {spec!r}: {attr!r} is a {type(obj).__name__}, not a function")
    if not isinstance(model, nn.Module):
        raise InputError(f"factory spec {spec!r}: {attr}() returned a {type(model).__name__}, not a "
                         "torch.nn.Module")
    return model.eval()


def _load_model(spec: str, *, trust_pickle: bool) -> _Loaded:
    from rewriter.io import load

    if _is_factory(spec):
        return _Loaded(_load_factory(spec), spec, "factory", None)
    path = Path(spec)
    if trust_pickle:
        _importable_cwd()
    model = load(path, trust_pickle=trust_pickle)
    kind = "pt2" if path.suffix.lower() == ".pt2" else "pickle"
    if kind == "pickle":
        model = model.eval()
    return _Loaded(model, spec, kind, path)


def _make_tensor(shape, dtype, generator, like=None):
    import torch

    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    if like is not None and tuple(like.shape) == tuple(shape) and like.dtype == dtype:
        return like.clone()
    return torch.ones(shape, dtype=dtype)


def _hint(size) -> int:
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else 2


def _example_inputs(loaded: _Loaded, shapes: list, dtypes: list) -> tuple[tuple, dict]:
    """Inputs for capture: from --input-shape, else from the shapes recorded in a .pt2."""
    from rewriter import meta
    import torch
    import torch.fx as fx
    import torch.utils._pytree as pytree

    from rewriter.errors import InputError

    generator = torch.Generator().manual_seed(0)
    if dtypes and len(dtypes) not in (1, max(1, len(shapes))):
        raise InputError(f"--input-dtype was given {len(dtypes)} times for {len(shapes)} input shapes: "
                         "give one dtype for all inputs, or one per --input-shape")

    def dtype_for(i: int, default):
        if not dtypes:
            return default
        return getattr(torch, dtypes[0] if len(dtypes) == 1 else dtypes[i])

    model = loaded.model
    if loaded.kind == "pt2" and isinstance(model, fx.GraphModule):
        placeholders = [n for n in model.graph.nodes if n.op == "placeholder"]
        recorded = model.meta.get(meta.EXAMPLE_INPUTS)
        leaves = pytree.tree_leaves(recorded) if recorded is not None else []
        if len(leaves) != len(placeholders):
            leaves = [None] * len(placeholders)
        tensors = [p for p in placeholders if isinstance(p.meta.get("val"), torch.Tensor)]
        if shapes and len(shapes) != len(tensors):
            recorded_text = ", ".join(f"{p.name}: {_shape_text(p.meta['val'].shape)}" for p in tensors)
            raise InputError(f"{loaded.spec} takes {len(tensors)} tensor input(s) ({recorded_text}) but "
                             f"--input-shape was given {len(shapes)} time(s); give one per input")
        flat, t = [], 0
        for node, leaf in zip(placeholders, leaves):
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                if leaf is None:
                    raise InputError(f"{loaded.spec}: input {node.name!r} is not a tensor and the program "
                                     "records no example value for it; export the model with example "
                                     "inputs (torch.export.save keeps them)")
                flat.append(leaf)
                continue
            if shapes:
                shape = shapes[t]
                _check_fits(loaded.spec, node.name, val.shape, shape)
            else:
                shape = tuple(_hint(s) for s in val.shape)
            flat.append(_make_tensor(shape, dtype_for(t, val.dtype), generator,
                                     leaf if isinstance(leaf, torch.Tensor) else None))
            t += 1
        spec = getattr(model, "_in_spec", None)
        if spec is not None:
            try:
                args, kwargs = pytree.tree_unflatten(flat, spec)
                return tuple(args), dict(kwargs)
            except Exception:  # a spec we cannot rebuild: positional inputs
                pass
        return tuple(flat), {}
    if not shapes:
        raise InputError(f"{loaded.spec}: give the input shape(s) with --input-shape, e.g. "
                         "--input-shape 8,3,224,224 (one per tensor input of forward)")
    return tuple(_make_tensor(s, dtype_for(i, torch.float32), generator) for i, s in enumerate(shapes)), {}


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _check_fits(spec: str, name: str, recorded, given) -> None:
    from rewriter.errors import InputError

    if len(recorded) != len(given):
        raise InputError(f"--input-shape {','.join(map(str, given))} does not fit input {name!r} of {spec}: "
                         f"it has {len(recorded)} dimensions {_shape_text(recorded)}, the shape gives "
                         f"{len(given)}")
    for i, (r, g) in enumerate(zip(recorded, given)):
        if isinstance(r, int) and r != g:
            raise InputError(f"--input-shape {','.join(map(str, given))} does not fit input {name!r} of "
                             f"{spec}: dimension {i} is fixed to {r} in the program "
                             f"{_shape_text(recorded)}, the shape gives {g}")


def _load_calibration(path_text: str) -> list[tuple]:
    import torch

    from rewriter.errors import InputError

    path = Path(path_text)
    if not path.is_file():
        raise InputError(f"calibration file {path_text!r} does not exist; write one with "
                         "torch.save([(x1,), (x2,)], 'calib.pt')")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"could not read calibration file {path_text!r} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); it must "
                         "be a torch.save'd list of input tuples of tensors, e.g. "
                         "torch.save([(x1,), (x2,)], 'calib.pt')") from exc
    if isinstance(data, torch.Tensor) or not isinstance(data, (list, tuple)) or not data:
        raise InputError(f"calibration file {path_text!r} holds a {type(data).__name__}; it must hold a "
                         "non-empty list of input tuples, e.g. torch.save([(x1,), (x2,)], 'calib.pt')")
    batches = []
    for i, item in enumerate(data):
        item = (item,) if isinstance(item, torch.Tensor) else item
        if not isinstance(item, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in item):
            raise InputError(f"calibration file {path_text!r}: entry {i} is a {type(item).__name__}, not a "
                             "tuple of tensors")
        batches.append(tuple(item))
    return batches


def _flat_floats(value) -> list:
    import torch
    import torch.utils._pytree as pytree

    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _errors(reference, candidate) -> tuple[float, float]:
    """(relative L2, max abs) of candidate's float outputs against reference's."""
    import torch

    ref, got = _flat_floats(reference), _flat_floats(candidate)
    if not ref or len(ref) != len(got):
        return float("nan"), float("nan")
    r = torch.cat([t.detach().float().reshape(-1).cpu() for t in ref])
    g = torch.cat([t.detach().float().reshape(-1).cpu() for t in got])
    rel = float((r - g).norm() / r.norm().clamp_min(1e-30))
    return rel, float((r - g).abs().max()) if r.numel() else 0.0


def _run(model, args, kwargs):
    import torch

    with torch.no_grad():
        return model(*args, **kwargs)


def _fmt_err(value: float) -> str:
    return "n/a" if value != value else f"{value:.2e}"


# ---------------------------------------------------------------------- convert


def _onnx_exporter() -> Callable:
    from rewriter.errors import InputError

    try:
        module = importlib.import_module("rewriter.backends.onnx_backend")
        return getattr(module, "export_onnx")
    except (ImportError, AttributeError) as exc:
        raise InputError(f"cannot write .onnx: the ONNX backend (rewriter.backends.onnx_backend.export_onnx) is not "
                         f"available in this installation ({exc}). Write a .pt2 instead (-o model.pt2), "
                         "or install a rewriter version with the ONNX backend") from exc


def _program_name(loaded: _Loaded) -> str:
    """The class name the program was exported from (the root of nn_module_stack), else the file."""
    for node in loaded.model.graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            if path == "" and isinstance(cls, str):
                return cls.rpartition(".")[2]
    return loaded.path.stem if loaded.path is not None else type(loaded.model).__name__


def _check_outputs(ui, args_model: str, outputs: list[tuple[Path | None, str]], force: bool) -> None:
    from rewriter.errors import InputError
    from rewriter.io import check_writable

    given = [(p, w) for p, w in outputs if p is not None]
    model_path = None if _is_factory(args_model) else Path(args_model)
    for i, (path, what) in enumerate(given):
        if model_path is not None and _same_file(path, model_path):
            raise InputError(f"{what} {str(path)!r} is the input model; the input is never overwritten, "
                             "choose another output path")
        for other, other_what in given[i + 1:]:
            if _same_file(path, other):
                raise InputError(f"{what} and {other_what} are the same file {str(path)!r}; choose two paths")
        check_writable(path, force=force, what=what)


def _cmd_convert(args, ui: _Ui) -> int:
    from rewriter import meta
    import rewriter
    from rewriter.diff import diff, format_bytes, short_dtype
    from rewriter.errors import InputError
    from rewriter.io import prepare
    from rewriter.pipeline import is_converted

    out = Path(args.output)
    suffix = out.suffix.lower()
    if suffix not in (".pt2", ".onnx"):
        raise InputError(f"output {str(out)!r}: unknown file type {suffix or '(no suffix)'!r}; name it "
                         "'*.pt2' (torch.export program) or '*.onnx'")
    report = Path(args.report) if args.report else None
    backend, backend_opts = _backend_choice(args)
    if backend is not None and suffix == ".onnx":
        raise InputError(f"--backend {backend} chooses how PyTorch runs a .pt2; {str(out)!r} is an ONNX file, "
                         "which ONNX Runtime runs with its own execution providers: drop --backend, or "
                         "write a .pt2")
    if backend is not None:
        _check_backend_here(backend)  # cuda_graphs without a GPU: refused before any work
    if (args.optimize or args.assume_right_padding) and suffix != ".onnx":
        raise InputError(f"--optimize and --assume-right-padding shape an ONNX export; {str(out)!r} is a .pt2: "
                         "drop them, or write a .onnx")
    if args.assume_right_padding and not args.optimize:
        raise InputError("--assume-right-padding rewrites ONNX Runtime's fused Attention nodes: add --optimize")
    _check_outputs(ui, args.model, [(out, "output"), (report, "report")], args.force)
    exporter = _onnx_exporter() if suffix == ".onnx" else None
    calibration = _load_calibration(args.calibration) if args.calibration else None

    with ui.step(f"loading {args.model}"):
        loaded = _load_model(args.model, trust_pickle=args.trust_pickle)
        if is_converted(loaded.model):
            done = (loaded.model.meta.get(meta.INFO) or {}).get("config", {}).get("precision", "?")
            raise InputError(f"{args.model} is already converted (to {done}); convert the original fp32 "
                             "model instead")
        ex_args, ex_kwargs = _example_inputs(loaded, args.input_shape, args.input_dtype)

    with ui.step(f"converting to {args.precision} (capture, analysis, rewrite)") as status:
        with contextlib.redirect_stderr(_ProgressStream(status, sys.stderr)):
            gm = rewriter.convert(loaded.model, ex_args, ex_kwargs, precision=args.precision,
                                  overrides=args.override or None, calibration=calibration,
                                  tolerance=args.tolerance, progress=True, backend=backend or "eager",
                                  backend_options=backend_opts or None)
    if backend not in (None, "eager"):
        from rewriter.backends.torch_backend import graph_module_of

        # the record (gm.meta["rewriter"]["config"]) names the backend; the checks, the diff and the
        # file use the converted graph itself (compiling it here would only cost time)
        gm = graph_module_of(gm)

    if loaded.kind == "pt2" and isinstance(gm.meta.get(meta.INFO), dict):
        gm.meta[meta.INFO]["model"] = _program_name(loaded)
    with ui.step("checking the converted model against fp32 on the example inputs"):
        rel, max_abs = _errors(_run(loaded.model, ex_args, ex_kwargs), _run(gm, ex_args, ex_kwargs))

    with ui.step("comparing before and after" + (" (report)" if report else "")):
        d = diff(loaded.model, gm, capture_before=report is not None)
        html = d.to_html() if report is not None else None

    prepared, exported = None, None
    if suffix == ".pt2":
        with ui.step(f"exporting the converted program for {out.name}"):
            prepared = prepare(gm, where=repr(str(out)))
    with ui.step(f"writing {out}" + (f" and {report}" if report else "")):
        staged_out = _staged(out, args.force, "output") if prepared is not None \
            else _staged_dir(out, args.force, "output")
        with staged_out as tmp_out, _staged(report, args.force, "report") as tmp_report:
            if prepared is not None:
                prepared.write(tmp_out)
            else:
                exported = exporter(gm, str(tmp_out), optimize=args.optimize,
                                    assume_right_padding=args.assume_right_padding)
            if tmp_report is not None:
                tmp_report.write_text(html, encoding="utf-8")

    s = d.summary
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("converted", f"{s.model} -> {args.precision} ({s.capture}"
                  f"{', dynamic batch' if s.dynamic_batch else ''})")
    table.add_row("output", f"{out} ({format_bytes(out.stat().st_size)})")
    if report is not None:
        table.add_row("report", str(report))
    per = ", ".join(f"{short_dtype(k)} {v}" for k, v in sorted(s.precision_after.items()))
    table.add_row("compute nodes", f"{s.compute_nodes}: {per}")
    table.add_row("casts", f"+{s.casts_added} added" + (f", -{s.casts_removed} removed" if report else ""))
    pct = 100.0 * s.param_bytes_saved / s.param_bytes_before if s.param_bytes_before else 0.0
    table.add_row("parameters", f"{format_bytes(s.param_bytes_before)} -> "
                  f"{format_bytes(s.param_bytes_after)} (saved {pct:.0f}%)")
    table.add_row("error vs fp32", f"relative L2 {_fmt_err(rel)}, max abs {_fmt_err(max_abs)} "
                  "(example inputs)")
    if exported is not None and args.optimize:
        table.add_row("onnx fusions", ", ".join(f"{k} {v}" for k, v in exported.fusions.items()) or "none")
        for note in exported.fusion_notes:
            if any(w in note for w in ("skipped", "not applied", "right_padding", "raised", "fp32")):
                table.add_row("", note)
    if backend not in (None, "eager"):
        kwargs = "".join(f", {k}={v!r}" for k, v in backend_opts.items())
        table.add_row("backend", f"{_backend_label(backend, backend_opts)}, recorded in {out.name}. A .pt2 "
                      f"holds the converted graph, not compiled code: the backend is applied when the model "
                      f"runs. `rewrite bench {out}` applies it; in Python: "
                      f"rewriter.backends.torch_backend.optimize(rewriter.load({str(out)!r}), mode={backend!r}{kwargs})")
    for note in s.notes:
        table.add_row("note", note)
    ui.out.print(table, markup=False, highlight=False)
    return EXIT_OK


# ---------------------------------------------------------------------- diff


def _cmd_diff(args, ui: _Ui) -> int:
    from rewriter.diff import diff
    from rewriter.errors import InputError
    from rewriter.pipeline import is_converted

    html_path = Path(args.html) if args.html else None
    json_path = Path(args.json) if args.json else None
    outputs = [(html_path, "--html file"), (json_path, "--json file")]
    _check_outputs(ui, args.before, outputs, args.force)
    _check_outputs(ui, args.after, outputs, args.force)
    with ui.step(f"loading {args.before} and {args.after}"):
        before = _load_model(args.before, trust_pickle=args.trust_pickle).model
        after = _load_model(args.after, trust_pickle=args.trust_pickle).model
        if not is_converted(after):
            raise InputError(f"AFTER {args.after!r} is not a converted model (it carries no rewriter "
                             "annotations); give the .pt2 written by `rewrite convert` as the second file")
    with ui.step("comparing (captures BEFORE to find removed casts)"):
        d = diff(before, after)
        html = d.to_html() if html_path else None
        text_json = d.to_json() if json_path else None
    if html_path or json_path:
        with ui.step("writing " + " and ".join(str(p) for p in (html_path, json_path) if p)):
            with _staged(html_path, args.force, "--html file") as tmp_html, \
                    _staged(json_path, args.force, "--json file") as tmp_json:
                if tmp_html is not None:
                    tmp_html.write_text(html, encoding="utf-8")
                if tmp_json is not None:
                    tmp_json.write_text(text_json, encoding="utf-8")
    sys.stdout.write(d.to_text(max_rows=None if args.all else 60) + "\n")
    sys.stdout.flush()
    return EXIT_OK


# ---------------------------------------------------------------------- bench


def _device(text: "str | None"):
    """--device: the torch.device it names (default: cuda when available, else cpu)."""
    import torch

    from rewriter.errors import InputError

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise InputError(f"--device {text!r} is not a device: write cuda, cuda:0 or cpu") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {text}: no CUDA GPU is available here; use --device cpu")
    if device.type not in ("cuda", "cpu"):
        raise InputError(f"--device {text}: only cuda and cpu are supported here")
    return device


def _backend_choice(args) -> tuple["str | None", dict]:
    """(--backend, its options) from --backend and --compile-mode; --compile-mode implies compile."""
    from rewriter.errors import InputError

    backend, mode = args.backend, args.compile_mode
    if mode is not None:
        if backend is None:
            backend = "compile"
        elif backend != "compile":
            raise InputError(f"--compile-mode {mode} is an option of --backend compile, not of --backend "
                             f"{backend}: drop --compile-mode, or use --backend compile")
    return backend, ({"compile_mode": mode} if mode is not None else {})


def _check_backend_here(backend: str, device=None) -> None:
    """Refuse a backend this machine (or --device) cannot run, saying why (BackendError/InputError)."""
    from rewriter.backends.torch_backend import check_available, no_gpu_reason
    from rewriter.errors import BackendError, InputError

    try:
        check_available(backend)
    except BackendError as exc:  # cuda_graphs without a CUDA GPU: the same reason, in CLI words
        why = no_gpu_reason()
        later = (" To prepare a model for a GPU machine, convert it without --backend and choose the "
                 "backend where it runs (rewrite bench MODEL --backend cuda_graphs)") if device is None else ""
        raise BackendError(f"--backend {backend} replays CUDA graphs and needs a CUDA GPU, but "
                           f"torch.cuda.is_available() is False here ({why}). On the CPU use --backend "
                           f"eager or --backend compile.{later}") from exc
    if backend == "cuda_graphs" and device is not None and device.type != "cuda":
        raise InputError(f"--backend cuda_graphs replays CUDA graphs, so it runs on a GPU only; "
                         f"--device {device} is not one: use --device cuda, or --backend compile on the CPU")


def _backend_label(backend: str, options: dict) -> str:
    return backend + "".join(f" {v}" if k == "compile_mode" else f" {k}={v}" for k, v in options.items())


def _fp32_twin(loaded: _Loaded):
    """The converted graph computing in fp32 with its stored weights: a reference when the original
    fp32 model is not at hand (it shows activation rounding, not weight rounding)."""
    import torch

    from rewriter.passes.graph_utils import is_cast
    from rewriter import meta
    from rewriter.io import load

    twin = load(loaded.path, trust_pickle=False)
    for node in twin.graph.nodes:
        if is_cast(node) and meta.CREATED in node.meta and meta.is_float_dtype(node.kwargs["dtype"]):
            node.kwargs = {**node.kwargs, "dtype": torch.float32}
    for module in twin.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if meta.is_float_dtype(p.dtype):
                module._parameters[name] = torch.nn.Parameter(p.detach().float(), requires_grad=False)
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and meta.is_float_dtype(b.dtype):
                module._buffers[name] = b.float()
    twin.recompile()
    return twin


def _to_device(value, device):
    import torch
    import torch.utils._pytree as pytree

    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, value)


def _time(fn, warmup: int, repeat: int, device) -> tuple[float, int | None]:
    import torch

    cuda = device.type == "cuda"
    for _ in range(max(0, warmup)):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) - base) if cuda else None
    return statistics.median(times) * 1e3, peak


def _cmd_bench(args, ui: _Ui) -> int:
    from rewriter import meta
    import torch

    import rewriter
    from rewriter.config import Precision
    from rewriter.diff import format_bytes
    from rewriter.errors import InputError
    from rewriter.pipeline import is_converted

    device = _device(args.device)
    backend, backend_opts = _backend_choice(args)
    if backend is not None:
        _check_backend_here(backend, device)
    notes = []
    with ui.step(f"loading {args.model}"):
        loaded = _load_model(args.model, trust_pickle=args.trust_pickle)
        ex_args, ex_kwargs = _example_inputs(loaded, args.input_shape, args.input_dtype)
    if is_converted(loaded.model):
        converted = loaded.model
        done = (converted.meta.get(meta.INFO) or {}).get("config", {}).get("precision", "fp16")
        if args.precision and args.precision != done:
            raise InputError(f"{args.model} is converted to {done}; --precision {args.precision} would need "
                             "the original model: bench the original instead")
        precision = done
        if args.reference:
            with ui.step(f"loading reference {args.reference}"):
                reference = _load_model(args.reference, trust_pickle=args.trust_pickle).model
        elif loaded.kind == "pt2":
            reference = _fp32_twin(loaded)
            notes.append("reference: the converted graph computing in fp32 with its stored weights "
                         "(pass --reference ORIGINAL for the original fp32 model)")
        else:
            raise InputError(f"{args.model} is already converted: pass the original model with --reference")
    else:
        precision = args.precision or "fp16"
        reference = loaded.model
        with ui.step(f"converting to {precision}") as status:
            with contextlib.redirect_stderr(_ProgressStream(status, sys.stderr)):
                converted = rewriter.convert(reference, ex_args, ex_kwargs, precision=precision,
                                             progress=True)
    if backend is None:  # what `rewrite convert --backend` recorded, if anything
        backend, backend_opts = _recorded_backend(converted, device, notes)
    low = Precision.parse(precision).island_dtype
    inputs = _to_device((ex_args, ex_kwargs), device)
    b_args, b_kwargs = inputs
    reference = reference.to(device)
    converted = converted.to(device)
    run_backend = None
    if backend not in (None, "eager"):
        from rewriter.backends.torch_backend import optimize

        run_backend = optimize(converted, mode=backend, **backend_opts)

    def autocast_run():
        with torch.autocast(device_type=device.type, dtype=low):
            return reference(*b_args, **b_kwargs)

    variants = [("fp32", lambda: reference(*b_args, **b_kwargs)),
                (f"autocast {Precision.parse(precision).value if low != torch.bfloat16 else 'bf16'}",
                 autocast_run),
                (f"converted {precision}", lambda: converted(*b_args, **b_kwargs))]
    weights = [_param_bytes(reference), _param_bytes(reference), _param_bytes(converted)]
    if run_backend is not None:
        variants.append((f"converted {precision} + {_backend_label(backend, backend_opts)}",
                         lambda: run_backend(*b_args, **b_kwargs)))
        weights.append(_param_bytes(converted))
    rows = []
    with torch.no_grad():
        expected = reference(*b_args, **b_kwargs)
        for i, ((name, fn), wbytes) in enumerate(zip(variants, weights)):
            first = " (the first call compiles, untimed)" if i == 3 and backend == "compile" else \
                " (the first call captures, untimed)" if i == 3 else ""
            with ui.step(f"measuring {name} on {device}{first}"):
                try:
                    out = fn()
                except Exception as exc:
                    rows.append((name, "failed", "", format_bytes(wbytes), f"{type(exc).__name__}", ""))
                    notes.append(f"{name} failed: {type(exc).__name__}: "
                                 f"{(str(exc).strip().splitlines() or [''])[0][:400]}")
                    continue
                rel, max_abs = _errors(expected, out)
                ms, peak = _time(fn, args.warmup, args.repeat, device)
                rows.append((name, f"{ms:.3f}", format_bytes(peak) if peak is not None else "n/a",
                             format_bytes(wbytes), _fmt_err(rel), _fmt_err(max_abs)))
    from rich.table import Table

    table = Table(title=f"{args.model} on {device}" + (f" ({torch.cuda.get_device_name(device)})"
                                                      if device.type == "cuda" else ""))
    for col in ("variant", "ms (median)", "peak mem", "weights", "rel L2 err", "max abs err"):
        table.add_column(col, justify="left" if col == "variant" else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    ui.out.print(table, markup=False, highlight=False)
    if device.type == "cpu":
        notes.append("no GPU here: latency is measured on the CPU, where fp16/bf16 kernels are often slower "
                     "than fp32, and peak memory is not tracked; the error columns are meaningful")
    for note in notes:
        ui.out.print(f"note: {note}", markup=False, highlight=False)
    return EXIT_OK


def _recorded_backend(converted, device, notes: list) -> tuple["str | None", dict]:
    """The backend a converted model's record names (`rewrite convert --backend`), if it can run here."""
    from rewriter import meta
    from rewriter.backends.torch_backend import check_options
    from rewriter.errors import RewriterError

    config = ((getattr(converted, "meta", None) or {}).get("rewriter") or {}).get("config") or {}
    backend, options = config.get("backend"), dict(config.get("backend_options") or {})
    if not backend or backend == "eager":
        return None, {}
    try:
        backend = check_options(backend, options)
        _check_backend_here(backend, device)
    except RewriterError as exc:
        notes.append(f"the model records backend {backend!r}, which cannot run here ({exc}); timed "
                     "without it (choose one with --backend)")
        return None, {}
    notes.append(f"backend {_backend_label(backend, options)}: recorded by `rewrite convert --backend` "
                 "(pass --backend eager to time the converted GraphModule only)")
    return backend, options


def _param_bytes(module) -> int:
    from rewriter.diff import parameter_bytes

    return parameter_bytes(module)


# ---------------------------------------------------------------------- demo


def _cmd_demo(args, ui: _Ui) -> int:
    from rewriter.errors import InputError

    training = {"--task": args.task, "--precisions": args.precisions, "--steps": args.steps,
                "--log-every": args.log_every, "--seed": args.seed, "--threads": args.threads,
                "--growth-interval": args.growth_interval, "--json": args.json,
                "--verbose": args.verbose or None, "--force": args.force or None}
    if args.train:
        if args.precision is not None:
            raise InputError(f"--precision {args.precision} picks the conversion demo's precision; the "
                             "training demo trains in several: give them with --precisions, e.g. "
                             "rewrite demo --train --precisions fp32,bf16")
        return _cmd_train_demo(args, ui)
    given = [flag for flag, value in training.items() if value is not None]
    if given:
        raise InputError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to the training "
                         f"demo: add --train (rewrite demo --train {given[0]} ...)")
    try:
        from rewriter.demo import run_demo
    except ImportError as exc:
        ui.error(f"the demo is not available in this installation ({exc})")
        return EXIT_INTERNAL
    code = run_demo(precision=args.precision or "fp16", device=args.device)
    return EXIT_OK if code is None else int(code)


_GROWTH_INTERVAL = 50   # the training demo's fp16 loss-scale growth interval (GradScaler's default: 2000)
_LOG_EVERY = 25


def _cmd_train_demo(args, ui: _Ui) -> int:
    """`rewrite demo --train`: rewriter/train_demo.py's tasks, trained per precision, reported."""
    import json
    import math

    import torch

    from rewriter import train_demo as td
    from rewriter.io import check_writable

    device = _device(args.device)
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
    sys.stdout.write(f"rewrite demo --train: {' vs '.join(precisions)} training with "
                     f"rewriter.convert(mode='train') on {where}, torch {torch.__version__}"
                     + (f", {threads} CPU thread{'s' if threads != 1 else ''}" if threads else "")
                     + "; every precision starts from the same weights and sees the same batches\n\n")
    sys.stdout.flush()
    all_runs: list = []
    fp8_warnings: list[str] = []
    try:
        if threads:
            torch.set_num_threads(threads)
        for name in names:
            with ui.step(f"{name}: preparing the data"):
                task = td.make_task(name, seed=seed)
            steps = args.steps or td.TASKS[name][1]
            runs = [_train_one(ui, td, task, precision, steps, device, seed, growth, args.verbose, fp8_warnings)
                    for precision in precisions]
            sys.stdout.write(td.report(runs, log_every, task.title) + "\n\n")
            sys.stdout.flush()
            all_runs += runs
    finally:
        torch.set_num_threads(old_threads)
    notes = []
    if "fp16" in precisions:
        notes.append(f"fp16 loss scale: dynamic (torch.amp.GradScaler through rewriter.loss_scale): it starts "
                     f"at 65536, doubles after {growth} clean steps (--growth-interval; GradScaler's "
                     "default, 2000, would not move within a short run) and halves on an inf/NaN "
                     "gradient, whose step is skipped. bf16 and fp32 need no scaling.")
    if "fp8" in precisions:
        notes += _fp8_notes(device, fp8_warnings, all_runs)
    if device.type == "cpu":
        notes.append("step times are measured on the CPU, where 16-bit kernels (fp16 above all) are often "
                     "slower than fp32. Loss curves and accuracy are meaningful on any device.")
    else:
        notes.append("these models are tiny: their steps are bound by kernel launches, not arithmetic, so "
                     "16-bit steps are not faster here; tools/bench_train.py times realistic sizes.")
    bad = [r for r in all_runs if not all(math.isfinite(v) for v in r.losses[-1:])]
    for r in bad:
        notes.append(f"{r.task} {r.precision}: the final loss is not finite ({r.losses[-1]})")
    for note in notes:
        ui.out.print(f"note: {note}", markup=False, highlight=False)
    if json_path is not None:
        payload = {"device": str(device), "torch": torch.__version__, "threads": threads, "seed": seed,
                   "growth_interval": growth, "precisions": precisions,
                   "runs": [dataclasses.asdict(r) for r in all_runs]}
        with _staged(json_path, args.force, "--json file") as tmp:
            tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
        ui.out.print(f"wrote {json_path}", markup=False, highlight=False)
    return EXIT_INTERNAL if bad else EXIT_OK


def _fp8_notes(device, fp8_warnings: list[str], runs: list) -> list[str]:
    """The notes of a run with --precisions ...,fp8: why every linear was forced into FP8, emulation (when
    some run had FP8 GEMMs), and the Fp8EmulationWarning messages `_train_one` caught that say more."""
    import math

    from rewriter.passes.plan.fp8_cost import FP8_MIN_MNK, FP8_MIN_ROWS
    from rewriter.runtime.fp8_ops import emulation_reason

    notes = [f"fp8 forces every eligible linear into FP8 GEMMs (Fp8Options.always()): the demo's GEMMs (under "
             f"a thousand rows of batch x sequence) are far below the size where FP8 pays, and the cost model "
             f"alone would keep them all in bf16 (it wants at least {FP8_MIN_ROWS} rows and M*N*K >= "
             f"2^{int(math.log2(FP8_MIN_MNK))}). The fp8 rows show FP8's numerics, not its speed; "
             "tools/bench_train.py --device cuda --compile --models llama_mlp,gpt2_medium --variants bf16,fp8 "
             "times FP8 training at realistic sizes."]
    reason = emulation_reason(device)
    if reason is not None and any(r.fp8_linears for r in runs):
        where = "the CPU" if device.type == "cpu" else f"{device} ({reason.partition(': ')[0]})"
        notes.append(f"on {where} the FP8 GEMMs are emulated: quantized to e4m3 "
                     "and e5m2 as on an FP8 GPU, then multiplied in fp32. Same numerics, no speed-up: fp8 step "
                     "times here say nothing about FP8's.")
    for message in dict.fromkeys(fp8_warnings):  # e.g. torch._scaled_mm refused a GEMM on an FP8 GPU
        if message != reason:
            notes.append(f"fp8: {message}")
    return notes


@contextlib.contextmanager
def _fp8_warnings_caught(into: list[str]) -> Iterator[None]:
    """Record Fp8EmulationWarning messages into `into` instead of printing them in the middle of the
    progress lines (the notes say it once, at the end); other warnings are re-issued as they were."""
    from rewriter.runtime.fp8_ops import Fp8EmulationWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Fp8EmulationWarning)  # `main` ignores warnings without --debug
        yield
    for w in caught:
        if issubclass(w.category, Fp8EmulationWarning):
            into.append(str(w.message).removeprefix("rewriter: "))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def _train_one(ui: _Ui, td, task, precision: str, steps: int, device, seed: int, growth: int,
               verbose: bool, fp8_warnings: list[str]):
    """One training run, with a progress line on stderr (a live step counter on a terminal);
    Fp8EmulationWarning messages go to `fp8_warnings`, for the notes."""
    label = f"{task.name}: training in {precision} on {device}, {steps} step{'s' if steps != 1 else ''}"
    start = time.perf_counter()
    with ui.err.status(_esc(label + " (converting)" if precision != "fp32" else label)) as status:
        def on_step(step: int, loss: float, scale: float) -> None:
            if step % 10 == 0 or step == steps - 1:
                status.update(_esc(f"{label}: step {step + 1}/{steps}, loss {loss:.4f}"
                                   + (f", loss scale {scale:g}" if precision == "fp16" else "")))

        log = (lambda line: ui.err.print(line, markup=False, highlight=False)) if verbose else None
        caught = _fp8_warnings_caught(fp8_warnings) if precision == "fp8" else contextlib.nullcontext()
        with caught:
            run = td.train(task, precision, steps=steps, device=device, seed=seed, growth_interval=growth,
                           log=log, on_step=on_step)
    ui.err.print(f"[green]\u2713[/green] {_esc(label)}: final loss {run.losses[-1]:.4f}, accuracy "
                 f"{100 * run.accuracy:.1f}% [dim]({time.perf_counter() - start:.1f}s)[/dim]", highlight=False)
    return run


# ---------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Run `rewrite` with `argv` (default sys.argv[1:]); returns the exit code.

    Example:
        >>> main(["convert", "model.pt2", "--precision", "bf16", "-o", "model-bf16.pt2"])
        0
    """
    from rewriter.errors import RewriterError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or bad usage (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    ui = _Ui()
    torch_logger = logging.getLogger("torch")
    old_level = torch_logger.level
    with warnings.catch_warnings():
        if not args.debug:
            warnings.simplefilter("ignore")
            torch_logger.setLevel(logging.ERROR)
        try:
            return args.func(args, ui)
        except RewriterError as exc:
            if args.debug:
                traceback.print_exc()
            ui.error(str(exc))
            return EXIT_USAGE
        except KeyboardInterrupt:
            ui.error("interrupted; no output was written")
            return 130
        except Exception as exc:  # a bug: say so, and how to get the details
            if args.debug:
                traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            ui.error(f"internal error in rewrite {args.command}: {type(exc).__name__}: {first}. This is a "
                     "bug in rewriter, not a problem with your input; no partial output is left behind. Run "
                     "again with --debug for the traceback and report it.")
            return EXIT_INTERNAL
        finally:
            torch_logger.setLevel(old_level)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
