"""rewriter.diff(model, fast) for a GenerativeLM: one Diff per step graph (prefill and decode).

    >>> fast = rewriter.convert(lm, {"input_ids": ids}, precision="fp8", generate=True)
    >>> d = rewriter.diff(lm, fast)
    >>> print(d)                                  # both graphs, decode first (it runs once per token)
    >>> d["decode"].changed                       # NodeDiffs of the decode graph
    >>> d.to_json(); d.to_html()

The two graphs make different decisions from the same config: a prefill GEMM multiplies every prompt
token (the FLOP rules of plan/fp8_cost apply), a decode GEMM one token per sequence (it reads every
weight: plan/fp8_decode). The original model is not captured again (the step graphs were exported
around a static KV cache, a capture the plain model does not have), so casts the conversion removed
from the original graph are not listed; every decision and added cast is.
"""
from __future__ import annotations

import html
import json

import torch.nn as nn

from rewriter.diff_types import Diff
from rewriter.errors import InputError
from rewriter.meta import is_generative
from rewriter.report import format_bytes

__all__ = ["StepsDiff", "diff_steps"]

_FORMAT = "rewriter.diff.generation/1"
_ABOUT = {"decode": "one token per sequence per step, over the static KV cache",
          "prefill": "the prompt, filling the KV cache"}


class StepsDiff:
    """The diff of a GenerativeLM: `graphs` {"decode": Diff, "prefill": Diff}, `generation` (its record).

    Renderings as a Diff: `str(d)` / `d.to_text()`, `d.to_json()`, `d.to_html()`; `d["decode"]` is a Diff.
    """

    def __init__(self, graphs: dict[str, Diff], generation: dict, model: str, param_bytes_before: int,
                 param_bytes_after: int):
        self.graphs = graphs
        self.generation = generation
        self.model = model
        self.param_bytes_before = param_bytes_before
        self.param_bytes_after = param_bytes_after

    def __getitem__(self, graph: str) -> Diff:
        return self.graphs[graph]

    @property
    def changed(self) -> list:
        """The changed nodes of both graphs (decode first)."""
        return [n for d in self.graphs.values() for n in d.changed]

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}: {len(d.changed)} changed" for k, d in self.graphs.items())
        return f"<StepsDiff {self.model}: {parts}>"

    def __str__(self) -> str:
        return self.to_text()

    def _header(self) -> list[str]:
        g = self.generation
        lines = [f"{self.model}, converted to generate: prefill and decode graphs over a static KV cache of "
                 f"{g.get('max_cache_len')} slots in {g.get('cache_dtype')}",
                 f"weights: {format_bytes(self.param_bytes_before)} before, {format_bytes(self.param_bytes_after)} "
                 "after (both graphs, each stored tensor counted once)"]
        for kind, plan in (g.get("fp8_gemms") or {}).items():
            kernels = ", ".join(f"{v} {k}" for k, v in (plan.get("kernels") or {}).items()) or "none"
            lines.append(f"FP8 {kind}: {plan.get('fp8', 0)} GEMMs ({kernels}), {plan.get('kept', 0)} kept")
        return lines

    def to_text(self, max_rows: int | None = 60, width: int | None = None) -> str:
        """The header, then each graph's Diff.to_text under a title line."""
        out = self._header()
        for kind, d in self.graphs.items():
            out += ["", f"== {kind} graph ({_ABOUT.get(kind, '')}) ==", d.to_text(max_rows=max_rows, width=width)]
        return "\n".join(out)

    def to_dict(self, *, all_nodes: bool = False) -> dict:
        return {"format": _FORMAT, "model": self.model, "generation": self.generation,
                "param_bytes_before": self.param_bytes_before, "param_bytes_after": self.param_bytes_after,
                "graphs": {k: d.to_dict(all_nodes=all_nodes) for k, d in self.graphs.items()}}

    def to_json(self, *, all_nodes: bool = False, indent: int | None = 2) -> str:
        """JSON text: {"format", "model", "generation", "graphs": {"decode": <Diff JSON>, "prefill": ...}}."""
        return json.dumps(self.to_dict(all_nodes=all_nodes), indent=indent, default=str)

    def to_html(self, title: str | None = None) -> str:
        """One self-contained page: the header, then each graph's Diff page in a frame of its own."""
        title = title or f"rewriter diff: {self.model}, prefill and decode graphs"
        frames = "".join(
            f"<h2>{html.escape(kind)} graph: {html.escape(_ABOUT.get(kind, ''))}</h2>"
            f"<iframe title=\"{html.escape(kind)} graph\" style=\"width:100%;height:80vh;border:1px solid #ccc\" "
            f"srcdoc=\"{html.escape(d.to_html(title=f'{kind} graph'), quote=True)}\"></iframe>"
            for kind, d in self.graphs.items())
        header = "".join(f"<p>{html.escape(line)}</p>" for line in self._header())
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(title)}</title></head><body><h1>{html.escape(title)}</h1>"
                f"{header}{frames}</body></html>\n")


def diff_steps(before: nn.Module, fast: nn.Module, graph_diff, parameter_bytes) -> StepsDiff:
    """The StepsDiff of GenerativeLM `fast` against `before`, its source model; `graph_diff(before, gm,
    capture_before)` is rewriter.diff's diff of one converted graph, `parameter_bytes(module)` its count
    of stored bytes."""
    record = getattr(fast, "record", {}) or {}
    if is_generative(before):
        raise InputError("diff: 'before' is a converted GenerativeLM too; pass the Hugging Face model it was "
                         "converted from: rewriter.diff(model, rewriter.convert(model, ..., generate=True))")
    source = record.get("model")
    if source and type(before).__name__ != source:
        raise InputError(f"diff: 'after' was converted from a {source}, 'before' is a {type(before).__name__}: "
                         "pass the model it was converted from")
    graphs = {kind: graph_diff(before, getattr(fast, f"{kind}_graph"), False) for kind in ("decode", "prefill")}
    return StepsDiff(graphs, dict(record.get("generation") or {}), source or type(fast).__name__,
                     parameter_bytes(before), parameter_bytes(fast))
