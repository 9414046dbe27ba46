"""The argparse parser of `rewrite`: commands, flags, their types and help texts (nothing runs here)."""
from __future__ import annotations

import argparse

__all__ = ["build_parser", "PRECISIONS", "BACKENDS", "TRAIN_PRECISIONS", "TARGETS", "parse_dynamic"]

PRECISIONS = ("fp16", "bf16", "fp8")
BACKENDS = ("eager", "compile", "cuda_graphs")  # = rewriter.backends.torch_backend.MODES (tested)
TRAIN_PRECISIONS = ("fp32", "fp16", "bf16", "fp8")  # = train_demo.TRAINABLE (not imported: it imports torch)
TARGETS = ("ort-cpu", "ort-cuda", "tensorrt")

_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16",
           "fp16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float64": "float64", "int64": "int64", "long": "int64", "int32": "int32", "int": "int32",
           "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool"}


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
            f"unknown backend {text!r}: write one of {', '.join(BACKENDS)} (eager runs the converted "
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
        if name not in TRAIN_PRECISIONS:
            raise argparse.ArgumentTypeError(
                f"cannot train in {part!r}: write a comma-separated list from {', '.join(TRAIN_PRECISIONS)}, "
                "e.g. --precisions fp32,bf16 (fp32 is the unconverted model; fp8 is opt-in, not in the default "
                "fp32,fp16,bf16)")
        if name not in result:
            result.append(name)
    if not result:
        raise argparse.ArgumentTypeError("give at least one precision, e.g. --precisions fp32,fp16,bf16")
    return result


def parse_dynamic(text: str) -> dict:
    """--dynamic DIMS: which input dimensions stay symbolic, as {input: (dims...)}; once the example
    inputs are known, loading.dynamic_shapes_from makes torch.export's `dynamic_shapes` of it. An entry is DIM (that dimension of every tensor input, key "*"), or INPUT:DIM
    where INPUT is a positional index or a keyword name, e.g. "0,1" or "0:0,0:1,attention_mask:1"."""
    result: dict = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        key, _, dim = entry.rpartition(":")
        key = key.strip() or "*"
        try:
            d = int(dim)
        except ValueError:
            d = -1
        if d < 0 or (key != "*" and not (key.isdigit() or key.isidentifier())):
            raise argparse.ArgumentTypeError(
                f"--dynamic {text!r}: {entry!r} is not a dimension; write DIM (of every input) or INPUT:DIM "
                "with INPUT a position or a keyword name, comma-separated, e.g. --dynamic 0,1 or "
                "--dynamic 0:0,attention_mask:1")
        key = int(key) if key.isdigit() else key
        dims = result.setdefault(key, [])
        if d not in dims:
            dims.append(d)
    if not result:
        raise argparse.ArgumentTypeError("--dynamic needs at least one dimension, e.g. --dynamic 0")
    return {k: tuple(v) for k, v in result.items()}


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


def _common() -> argparse.ArgumentParser:
    """Flags every command takes, before or after its name. Defaults are SUPPRESSed so that a
    subcommand does not reset a flag given before it; read them with getattr(args, name, False)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="print results and errors only (no progress lines, no notes)")
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="print every step: the conversion's progress lines, warnings, every training step")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="--verbose, and full tracebacks on errors")
    return p


def _version() -> str:
    import platform

    import torch

    import rewriter

    return f"rewrite {rewriter.__version__} (torch {torch.__version__}, Python {platform.python_version()})"


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import sys

        sys.stdout.write(_version() + "\n")  # stdout, as `--version` of most tools
        parser.exit()


def _add_convert(sub, common) -> None:
    p = sub.add_parser("convert", parents=[common], help="convert a model and save it as .pt2 or .onnx",
                       description="Convert MODEL to lower precision and write OUT (.pt2 or .onnx).")
    p.add_argument("model", metavar="MODEL", help="a .pt2 file, a factory spec package.module:callable, "
                                                  "or a pickled .pt/.pth with --trust-pickle")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16", help="target precision (fp16)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file: .pt2 or .onnx")
    p.add_argument("--report", metavar="REPORT.html", help="also write the HTML diff report")
    p.add_argument("--override", action="append", default=[], metavar="KEY=PRECISION",
                   help="force an op ('softmax=fp16'), module regex ('re:encoder\\..*=fp32') or module "
                        "path ('classifier=fp32'); repeatable")
    p.add_argument("--calibration", metavar="FILE",
                   help="torch.save'd list of input tuples for measured decisions")
    p.add_argument("--tolerance", type=float, metavar="T", help="output error budget (needs --calibration)")
    p.add_argument("--no-budget-lowering", action="store_true",
                   help="with --tolerance, only keep nodes fp32; never run the policy's fp32 norms and "
                        "residual adds in 16-bit (convert's budget_lowering=False)")
    p.add_argument("--force", action="store_true", help="replace OUT and REPORT if they exist (the input "
                                                        "model is never replaced)")
    shapes = p.add_mutually_exclusive_group()
    shapes.add_argument("--dynamic", type=parse_dynamic, default=None, metavar="DIMS",
                        help="input dimensions that stay symbolic, passed to convert as torch.export's "
                             "dynamic_shapes (Dim.DYNAMIC): DIM for that dimension of every tensor input, or "
                             "INPUT:DIM (INPUT a position or keyword name), comma-separated, e.g. --dynamic "
                             "0,1 (batch and sequence) or --dynamic 0:0,attention_mask:1. Default: the "
                             "library's (the dimensions the model allows stay dynamic)")
    p.add_argument("--capture-time-limit", type=float, default=None, metavar="SECONDS",
                   help="seconds the capture with every dimension dynamic may take; past it only the "
                        "batch stays dynamic and the capture notes say so (convert's capture_time_limit; "
                        "default 120, 0 for no limit). --dynamic states the dynamic dimensions instead")
    shapes.add_argument("--static", action="store_true",
                        help="capture every input dimension as fixed to the example shapes (convert's "
                             "static=True): the converted model then accepts those shapes only")
    _add_backend(p, "how the converted model is to run: eager (the GraphModule as it is; the default), "
                    "compile (torch.compile) or cuda_graphs (captured and replayed; needs a CUDA GPU). A "
                    ".pt2 holds the converted graph, not compiled code: the choice is checked here, "
                    "recorded in the file, and applied when it runs (`rewrite bench` applies it; in "
                    "Python rewriter.backends.torch_backend.optimize(rewriter.load(OUT), mode=...)). .pt2 only")
    p.add_argument("--target", choices=TARGETS, default=None,
                   help=".onnx only: the ONNX Runtime execution provider the file is for (export_onnx's "
                        "target): ort-cpu (CPU EP: no bf16 Conv/MatMul kernels, such ops are kept in a "
                        "dtype that runs or refused), ort-cuda (CUDA EP) or tensorrt (TensorRT EP). "
                        "Default: the library's")
    p.add_argument("--optimize", action="store_true",
                   help=".onnx only: apply ONNX Runtime fusions (attention, skip layer norm, GELU, BERT "
                        "embeddings) where they keep the precision decisions; the report says what was fused")
    p.add_argument("--assume-right-padding", action="store_true",
                   help=".onnx with --optimize only: attention reads the valid length of each row of a key "
                        "padding mask input (ONNX Runtime's faster 1-D mask_index, as its transformers "
                        "optimizer builds); wrong for left-padded rows, so off by default")
    _add_inputs(p)
    p.set_defaults(command_module="cmd_convert")


def _add_diff(sub, common) -> None:
    p = sub.add_parser("diff", parents=[common], help="show what a conversion changed, node by node",
                       description="Compare BEFORE (the original model) with AFTER (its conversion). The text "
                                   "fits the terminal (80 columns when output is not a terminal; set "
                                   "COLUMNS to change it); --json and --html have every field.")
    p.add_argument("before", metavar="BEFORE", help="the original model (.pt2, factory spec or pickle)")
    p.add_argument("after", metavar="AFTER", help="the converted .pt2 written by `rewrite convert`")
    p.add_argument("--html", metavar="FILE", help="write the HTML report")
    p.add_argument("--json", metavar="FILE", help="write the changed nodes as JSON")
    p.add_argument("--all", action="store_true", help="print every changed node, not the first 60")
    p.add_argument("--force", action="store_true", help="overwrite the --html/--json files if they exist")
    p.add_argument("--trust-pickle", action="store_true", help="allow a pickled BEFORE model")
    p.set_defaults(command_module="cmd_diff")


def _add_bench(sub, common) -> None:
    p = sub.add_parser("bench", parents=[common], help="latency, peak memory and error: fp32 vs autocast vs "
                                                       "converted",
                       description="Measure MODEL in fp32, under torch.autocast and converted, on "
                                   "this machine's accelerator (or CPU). Variants are timed round-robin "
                                   "(rewriter.measure); errors are relative L2 against the fp32 reference.")
    p.add_argument("model", metavar="MODEL", help="a .pt2 (original or converted), factory spec or pickle")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="precision to convert to (default: the one MODEL was converted to, else fp16)")
    p.add_argument("--reference", metavar="MODEL",
                   help="the original fp32 model when MODEL is already converted (it must take the same "
                        "inputs and return the same outputs)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--repeat", type=_positive_int, default=20, help="timed rounds per variant (20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs of each variant first (3)")
    _add_backend(p, "also time the converted model run through this backend "
                    "(rewriter.backends.torch_backend.optimize): compile (torch.compile; the first call compiles, "
                    "untimed) or cuda_graphs (needs a CUDA GPU and --device cuda); eager times the "
                    "converted GraphModule only. Default: the backend recorded by `rewrite convert "
                    "--backend`, else eager")
    _add_inputs(p)
    p.set_defaults(command_module="cmd_bench")


def _add_demo(sub, common) -> None:
    p = sub.add_parser(
        "demo", parents=[common],
        help="the whole flow on a built-in model, no files needed; --train: mixed-precision training",
        description="Convert a built-in transformer and compare it with fp32, torch.autocast and a blanket "
                    "cast. With --train: train a small CNN on scikit-learn's digits and a small transformer "
                    "on a synthetic task (reversing sequences) in fp32, fp16 and bf16 with "
                    "rewriter.convert(mode='train'), from the same initial weights on the same batches, and "
                    "print the loss curves, the fp16 loss scale over time, final accuracy and step time. "
                    "--precisions ...,fp8 adds FP8 training GEMMs (every eligible linear, emulated without "
                    "an FP8 GPU). The default --train run takes about a minute on a CPU; the digits task "
                    "needs scikit-learn (pip install scikit-learn). --verbose prints every training step.")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="precision of the conversion demo (fp16); with --train use --precisions")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--generate", action="store_true",
                   help="the generation demo instead: a tiny Llama-style LM trained in seconds to reverse digits "
                        "generates side by side in fp32, autocast and converted bf16/fp16, with tokens/s")
    p.add_argument("--kv8", action="store_true", help="with --generate: also bf16 with an FP8 KV cache")
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
    g.add_argument("--adaptive", nargs="?", const="fp8", choices=("fp8", "fp16"), default=None,
                   help="adaptive precision instead: a planted instability trained in bf16, static fp8 (or "
                        "fp16) and with rewriter.AdaptivePrecision, which moves the troubled layer to bf16; "
                        "prints the per-layer precision timeline and writes its picture (about 10 s on a CPU)")
    g.add_argument("--picture", metavar="FILE",
                   help="with --adaptive: where the timeline picture goes (.png with matplotlib, else .svg; "
                        "default: rewrite-adaptive-<precision>.png in the system's temporary folder)")
    g.add_argument("--json", metavar="FILE", help="also write the settings and every run (losses, "
                                                   "accuracy, step time, loss scale history) as JSON")
    g.add_argument("--force", action="store_true", help="overwrite the --json file if it exists")
    p.set_defaults(command_module="cmd_demo")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `rewrite` (exits with code 2 on bad usage, as argparse does)."""
    common = _common()
    parser = argparse.ArgumentParser(
        prog="rewrite", parents=[common],
        description="Rewrite PyTorch models for FP16, BF16 and FP8, and show what changed.",
        epilog="Exit codes: 0 success; 2 bad usage or input, or an output that cannot be written (missing "
               "or corrupt file, disk full, read-only folder, an existing output without --force); "
               "1 an internal error (a bug: run again with --debug and report it).")
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_convert(sub, common)
    _add_diff(sub, common)
    _add_bench(sub, common)
    _add_demo(sub, common)
    return parser
