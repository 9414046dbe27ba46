"""What `rewrite` prints: results on stdout, progress and errors on stderr, everything within the width.

The width is the terminal's; when stdout is not a terminal (a pipe, a log, a test) it is $COLUMNS, else 80,
so what a user pastes into an issue or a CI log is not cut or wrapped by the viewer.
"""
from __future__ import annotations

import contextlib
import io as _stdio
import os
import shutil
import sys
import textwrap
import time
from typing import Any, Iterator, Sequence

__all__ = ["Ui", "width_of", "esc", "ProgressStream", "fit_table", "DEFAULT_WIDTH"]

DEFAULT_WIDTH = 80


def width_of(stream) -> int:
    """Columns to fit: the terminal's width, else $COLUMNS, else 80."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        if stream.isatty():
            return shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    except (AttributeError, ValueError):
        pass
    return DEFAULT_WIDTH


def esc(text: str) -> str:
    from rich.markup import escape

    return escape(text)


class Ui:
    """Rich consoles: results on stdout, progress and errors on stderr.

    quiet: no progress lines and no notes (results and errors only); verbose: progress lines from the
    library are printed as they come, not folded into a spinner.
    """

    def __init__(self, *, quiet: bool = False, verbose: bool = False):
        from rich.console import Console

        self.quiet, self.verbose = quiet, verbose
        self.width = width_of(sys.stdout)
        self.out = Console(file=sys.stdout, width=self.width, soft_wrap=False)
        self.err = Console(file=sys.stderr, width=width_of(sys.stderr), soft_wrap=False,
                           quiet=quiet)

    def print(self, text: str) -> None:
        """A result line on stdout, wrapped to the width (continuation lines indented)."""
        self.out.print(self.wrap(text), markup=False, highlight=False)

    def wrap(self, text: str, indent: str = "  ") -> str:
        return "\n".join(textwrap.fill(line, self.width, subsequent_indent=indent, break_on_hyphens=False,
                                       break_long_words=False) if len(line) > self.width else line
                         for line in text.splitlines() or [""])

    def fields(self, rows: Sequence[tuple[str, str]], label_width: int = 15) -> None:
        """`label  value` lines on stdout, values wrapped under themselves within the width."""
        pad = " " * (label_width + 1)
        for label, value in rows:
            text = textwrap.fill(str(value), max(20, self.width - len(pad)), break_on_hyphens=False,
                                 break_long_words=False) or "-"
            lines = text.splitlines()
            self.out.print(f"{label:<{label_width}} {lines[0]}" + "".join(f"\n{pad}{x}" for x in lines[1:]),
                           markup=False, highlight=False)

    def error(self, message: str) -> None:
        # one line: the terminal wraps it, and a log keeps it greppable
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()

    def note(self, message: str) -> None:
        """A note under the results (stdout); --quiet drops it."""
        if not self.quiet:
            self.print(f"note: {message}")

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[Any]:
        start = time.perf_counter()
        if self.quiet:
            yield _NoStatus()
            return
        with self.err.status(esc(text)) as status:
            yield status
        self.err.print(f"[green]\u2713[/green] {esc(text)} [dim]({time.perf_counter() - start:.1f}s)[/dim]",
                       highlight=False)

    def progress(self, status) -> "ProgressStream":
        """A stand-in for stderr while the library prints '[rewrite] ...' progress lines."""
        return ProgressStream(status, sys.stderr, echo=self.verbose and not self.quiet)


class _NoStatus:
    def update(self, *args, **kwargs) -> None:
        pass


class ProgressStream(_stdio.TextIOBase):
    """Stands in for stderr during convert(progress=True): '[rewrite] step: ...' lines update the
    spinner (or are printed with --verbose), anything else goes to the real stderr."""

    def __init__(self, status, passthrough, echo: bool = False):
        self.status, self.passthrough, self.echo, self.buffer_ = status, passthrough, echo, ""

    def write(self, text: str) -> int:
        self.buffer_ += text
        while "\n" in self.buffer_:
            line, self.buffer_ = self.buffer_.split("\n", 1)
            if line.startswith("[rewrite] "):
                if self.echo:
                    self.passthrough.write(line + "\n")
                self.status.update(f"converting: {esc(line[10:][:100])}")
            elif line.strip():
                self.passthrough.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.passthrough.flush()


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(1, width - 1)] + "\u2026"


def fit_table(header: Sequence[str], rows: Sequence[Sequence[str]], width: int, *,
              right: Sequence[bool] | None = None, shrink: int = 0, title: str | None = None) -> str:
    """A plain-text table within `width` columns: columns two spaces apart; when too wide, column
    `shrink` (the names) is cut with an ellipsis, and if that is not enough, each row's trailing
    columns move to an indented second line. Header cells that are wider than their column wrap."""
    n = len(header)
    right = list(right) if right is not None else [i != 0 for i in range(n)]
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(n)]
    gap = 2

    def total(ws):
        return sum(ws) + gap * (len(ws) - 1)

    over = total(widths) - width
    if over > 0:
        widths[shrink] = max(12, widths[shrink] - over)
    lines = [title] if title else []
    split = n
    while total(widths[:split]) > width and split > 2:
        split -= 1  # columns from `split` on go to a second line

    def render(row, cols, ws) -> str:
        parts = []
        for i, w in zip(cols, ws):
            text = _cut(row[i], w)
            parts.append(text.rjust(w) if right[i] else text.ljust(w))
        return (" " * gap).join(parts).rstrip()

    first, second = list(range(split)), list(range(split, n))
    for k, row in enumerate(cells):
        lines.append(render(row, first, widths[:split]))
        if second:
            ws = [widths[i] for i in second]
            lines.append("    " + render(row, second, ws))
        if k == 0:
            lines.append("-" * min(width, total(widths[:split])))
    return "\n".join(lines)
