"""Pass infrastructure: one contract for every pass, one manager that runs them.

Contract: `Pass.call(gm) -> PassResult(graph_module, modified)`. `modified` is True only when the pass
changed the graph or its parameters. Analysis passes write node.meta only and must leave the graph as
it was (checked). Passes never recompile: the manager lints and recompiles after each pass that
modified, and wraps any failure in a `PassError` naming the pass and what ran before it.

Example:
    >>> pm = PassManager([Classify(config), Assign(config), InsertCasts(config)])
    >>> result = pm(gm)
    >>> result.modified
    True
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import torch.fx as fx

from rewriter.errors import PassError, RewriterError

__all__ = ["PassResult", "Pass", "AnalysisPass", "PassManager", "graph_signature"]


@dataclasses.dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


class Pass:
    """Base class: subclasses implement `call` and set `name` (defaults to the class name)."""

    name: str = ""

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        result = self.call(gm)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {self.pass_name} returned {type(result).__name__}, not PassResult")
        if result.graph_module is not gm:
            raise TypeError(f"pass {self.pass_name} works in place but returned another GraphModule")
        return result

    @property
    def pass_name(self) -> str:
        return self.name or type(self).__name__

    def call(self, gm: fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError


def graph_signature(gm: fx.GraphModule) -> tuple:
    """Cheap structural fingerprint used to check that analysis passes left the graph alone."""
    return tuple((n.name, n.op, str(n.target), tuple(map(str, n.args))) for n in gm.graph.nodes)


class AnalysisPass(Pass):
    """An analysis pass annotates node.meta; it reports modified=False and may not edit the graph."""

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        before = graph_signature(gm)
        result = super().__call__(gm)
        if graph_signature(gm) != before:
            raise PassError(f"analysis pass {self.pass_name} edited the graph; analysis passes may only "
                            "write node.meta (this is a bug in the pass)")
        return PassResult(gm, False)


class PassManager:
    """Runs passes in order; lints and recompiles after each modifying pass.

    Args:
        passes: the passes, run in this order.
        on_pass: optional callback `on_pass(name, seconds, modified)` for progress display.
    """

    def __init__(self, passes: Sequence[Pass], on_pass: Callable[[str, float, bool], None] | None = None):
        self.passes = list(passes)
        self.on_pass = on_pass

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        ran: list[str] = []
        for p in self.passes:
            start = time.perf_counter()
            try:
                result = p(gm)
                if result.modified:
                    gm.graph.lint()
                    gm.recompile()
            except RewriterError as exc:
                if isinstance(exc, PassError):
                    raise
                raise type(exc)(f"{exc} [in pass {p.pass_name}]") from exc
            except Exception as exc:
                before = ", ".join(ran) or "nothing"
                raise PassError(
                    f"pass {p.pass_name} failed after [{before}]: {type(exc).__name__}: {exc}. "
                    "This is a bug in the rewriter; please report it with the model, or keep the "
                    "failing module in fp32 with an override while it is fixed."
                ) from exc
            modified |= result.modified
            ran.append(p.pass_name)
            if self.on_pass is not None:
                self.on_pass(p.pass_name, time.perf_counter() - start, result.modified)
        return PassResult(gm, modified)
