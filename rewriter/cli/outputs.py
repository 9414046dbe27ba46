"""Output files of `rewrite`: checked before any work, written atomically, never over an input."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

__all__ = ["check_outputs", "staged", "staged_dir"]


def check_outputs(inputs: list[str], outputs: list[tuple["Path | None", str]], force: bool) -> None:
    """Refuse, before any work, an output that is an input, two outputs on one file, an existing
    output without --force, a missing or read-only folder (InputError: exit 2)."""
    from rewriter.errors import InputError
    from rewriter.files import check_writable, same_file

    from rewriter.cli.loading import is_factory

    given = [(p, w) for p, w in outputs if p is not None]
    models = [Path(m) for m in inputs if not is_factory(m)]
    for i, (path, what) in enumerate(given):
        for model in models:
            if same_file(path, model):
                raise InputError(f"{what} {str(path)!r} is the input model; the input is never overwritten "
                                 "(not even with --force), choose another output path")
        for other, other_what in given[i + 1:]:
            if same_file(path, other):
                raise InputError(f"{what} and {other_what} are the same file {str(path)!r}; choose two paths")
        check_writable(path, force=force, what=what)


@contextlib.contextmanager
def staged(path: "Path | None", force: bool, what: str) -> Iterator["Path | None"]:
    """rewriter.files.atomic_write, or nothing when the output was not asked for (path None)."""
    if path is None:
        yield None
        return
    from rewriter.files import atomic_write

    with atomic_write(path, force=force, what=what) as tmp:
        yield tmp


def staged_dir(path: Path, force: bool, what: str):
    """rewriter.files.atomic_write_dir: for exporters that may write side files (ONNX external data)."""
    from rewriter.files import atomic_write_dir

    return atomic_write_dir(path, force=force, what=what)
