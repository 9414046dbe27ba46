"""The `rewrite` command line: convert saved models, show what changed, measure, demo.

    rewrite convert model.pt2 --precision fp16 -o model-fp16.pt2 --report diff.html
    rewrite convert torchvision.models:resnet18 --input-shape 2,3,64,64 --precision bf16 -o r18.pt2
    rewrite convert model.pt --trust-pickle --precision fp16 -o model-fp16.onnx --target ort-cuda
    rewrite diff model.pt2 model-fp16.pt2 --html diff.html --json diff.json
    rewrite convert model.pt2 --precision bf16 --backend compile --compile-mode max-autotune -o m.pt2
    rewrite bench model-fp16.pt2 --reference model.pt2
    rewrite demo --precision bf16
    rewrite demo --train --task reverse --precisions bf16,fp8     # FP8 training GEMMs (opt-in)
    rewrite --version;  python -m rewriter --help

Modules: parser (flags and help), loading (MODEL specs, inputs, devices), options (flags passed to the
library), outputs (atomic output files), ui (what is printed, within the terminal's width), one
cmd_<name> module per command with `run(args, ui) -> exit code`. The CLI calls the library; it does not
edit or inspect graphs itself.

Exit codes: 0 success; 2 bad usage or bad input, or an output that cannot be written (missing or corrupt
file, shape that does not fit, disk full, read-only folder, an existing output without --force, a
--reference that does not match: every `RewriterError`); 1 internal failure (a bug); 130 interrupted.
Outputs are written atomically (temporary file in the same folder, then rename): an output is complete
or absent, and an input is never overwritten. Progress goes to stderr, results to stdout; --quiet keeps
results and errors only, --verbose adds the library's progress lines and warnings, --debug tracebacks.
"""
from __future__ import annotations

import importlib
import logging
import sys
import traceback
import warnings

from rewriter.cli.parser import BACKENDS, build_parser

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_INTERNAL", "EXIT_USAGE", "BACKENDS"]

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    """Run `rewrite` with `argv` (default sys.argv[1:]); returns the exit code.

    Example:
        >>> main(["convert", "model.pt2", "--precision", "bf16", "-o", "model-bf16.pt2"])
        0
    """
    from rewriter.cli.ui import Ui
    from rewriter.errors import RewriterError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help / --version (0) or bad usage (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    debug = getattr(args, "debug", False)
    quiet = getattr(args, "quiet", False)
    verbose = getattr(args, "verbose", False) or debug
    if quiet and verbose:
        sys.stderr.write("error: --quiet and --verbose (or --debug) contradict each other; give one\n")
        return EXIT_USAGE
    ui = Ui(quiet=quiet, verbose=verbose)
    command = importlib.import_module(f"rewriter.cli.{args.command_module}")
    torch_logger = logging.getLogger("torch")
    old_level = torch_logger.level
    with warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")
            torch_logger.setLevel(logging.ERROR)
        try:
            return command.run(args, ui)
        except RewriterError as exc:
            if debug:
                traceback.print_exc()
            ui.error(str(exc))
            return EXIT_USAGE
        except KeyboardInterrupt:
            ui.error("interrupted; no output was written")
            return 130
        except Exception as exc:  # a bug: say so, and how to get the details
            if debug:
                traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            ui.error(f"internal error in rewrite {args.command}: {type(exc).__name__}: {first}. This is a "
                     "bug in rewriter, not a problem with your input; no partial output is left behind. Run "
                     "again with --debug for the traceback and report it.")
            return EXIT_INTERNAL
        finally:
            torch_logger.setLevel(old_level)
