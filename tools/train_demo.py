"""Mixed-precision training with `rewriter.convert(..., mode="train")`: fp32 vs fp16 vs bf16.

A thin wrapper: the code lives in the package (rewriter/train_demo.py) and the command is
`rewrite demo --train`, which works from any `pip install -e .` without this folder. This script
takes the same flags and re-exports the package's names (DigitsCNN, Reverser, digits_task,
reverse_task, train, report, ...) for scripts and tests that load it from here.

    python -m tools.train_demo                                # = rewrite demo --train
    python -m tools.train_demo --task digits --steps 400 --log-every 50
    python -m tools.train_demo --precisions fp32,bf16 --json out/train_demo.json --device cuda

`python -m tools.train_demo --help` lists every flag.
"""
from __future__ import annotations

import sys

from rewriter.train_demo import *  # noqa: F401,F403  (the package's names, re-exported)
from rewriter.train_demo import __all__ as _package_names

__all__ = [*_package_names, "main"]


def main(argv: list[str] | None = None) -> int:
    """`rewrite demo --train ARGV...`; returns its exit code."""
    from rewriter.cli import main as rewrite

    return rewrite(["demo", "--train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
