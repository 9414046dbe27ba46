"""Mixed-precision training with `rewriter.convert(..., mode="train")`: fp32 vs fp16 vs bf16.

A thin wrapper: the code lives in the package (rewriter/train_demo.py) and the command is
`rewrite demo --train`, which works from any `pip install -e .` without this folder. This script
takes the same flags and re-exports the package's names (DigitsCNN, Reverser, digits_task,
reverse_task, train, report, ...) for scripts and tests that load it from here.

    python tools/train_demo.py                                # = rewrite demo --train
    python tools/train_demo.py --task digits --steps 400 --log-every 50
    python tools/train_demo.py --precisions fp32,bf16 --json out/train_demo.json --device cuda

`python tools/train_demo.py --help` lists every flag.
"""
from __future__ import annotations

import sys
from pathlib import Path

try:
    import rewriter  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewriter.train_demo import *  # noqa: E402,F401,F403  (the package's names, re-exported)
from rewriter.train_demo import __all__ as _package_names  # noqa: E402

__all__ = [*_package_names, "main"]


def main(argv: list[str] | None = None) -> int:
    """`rewrite demo --train ARGV...`; returns its exit code."""
    from rewriter.cli import main as rewrite

    return rewrite(["demo", "--train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
