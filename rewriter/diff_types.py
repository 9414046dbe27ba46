"""The diff's data: `NodeDiff` (one node), `Summary` (totals), `Diff` (both, and its renderings).

`rewriter.diff` (rewriter/diff.py) builds them from a converted graph; `diff_text` renders the text,
`report` the HTML page.
"""
from __future__ import annotations

import dataclasses
import json

from rewriter.diff_text import render_text
from rewriter.report import format_bytes, render_html

__all__ = ["NodeDiff", "Summary", "Diff"]

_FORMAT = "rewriter.diff/1"

@dataclasses.dataclass(frozen=True)
class NodeDiff:
    """One node of the converted graph (or one node of the original graph that is gone).

    change: "added" (a cast or weight copy the rewriter created), "removed" (a node of the original
    graph that the converted one no longer has: a folded cast, a batch norm folded into its
    convolution), "dtype" (the node now computes or stores another dtype), "rewritten" (same dtype,
    but a pass changed it: see `rewritten`) or "none".
    """

    index: int                     # position in the converted graph; -1 for removed nodes
    name: str
    op: str
    kind: str                      # input | weight | compute | cast | output
    module: str | None
    old_dtype: str | None          # output dtype before the conversion (None: did not exist)
    new_dtype: str | None          # output dtype after (None: removed)
    compute_dtype: str | None      # the dtype the node computes in (its decision)
    change: str
    rule: str | None
    reason: str | None
    casts_added: tuple[str, ...] = ()
    casts_removed: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    bytes_before: int | None = None
    bytes_after: int | None = None
    range: dict | None = None
    sensitivity: dict | None = None
    fp8: dict | None = None
    rewritten: tuple[dict, ...] = ()     # [{"pass", "reason"}] from passes that edited this node
    shape: str | None = None             # output shape of the example ("2x8x32"), None: not a tensor

    @property
    def changed(self) -> bool:
        return self.change != "none"

    def to_dict(self, *, with_inputs: bool = False) -> dict:
        out = {"name": self.name, "op": self.op, "kind": self.kind, "module": self.module,
               "old_dtype": self.old_dtype, "new_dtype": self.new_dtype,
               "compute_dtype": self.compute_dtype, "change": self.change, "rule": self.rule,
               "reason": self.reason, "casts_added": list(self.casts_added),
               "casts_removed": list(self.casts_removed)}
        for key in ("bytes_before", "bytes_after", "range", "sensitivity", "fp8", "shape"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.rewritten:
            out["rewritten"] = [dict(r) for r in self.rewritten]
        if with_inputs:
            out["index"] = self.index
            out["inputs"] = list(self.inputs)
        return out


@dataclasses.dataclass(frozen=True)
class Summary:
    """Totals of a diff: nodes per precision, casts, parameter bytes."""

    model: str
    precision: str | None
    capture: str | None
    dynamic_batch: bool | None
    nodes: int                           # nodes of the converted graph (inputs, weights, ops, output)
    compute_nodes: int
    precision_before: dict[str, int]     # compute nodes per dtype
    precision_after: dict[str, int]
    casts_before: int
    casts_after: int
    casts_added: int
    casts_removed: int
    changed_nodes: int
    param_bytes_before: int
    param_bytes_after: int
    rules: dict[str, int]                # rule -> changed compute nodes it decided
    kept_fp32: int                       # compute nodes left in fp32 on purpose
    notes: tuple[str, ...] = ()
    fp8_gemms: int | None = None         # GEMMs rewritten to FP8 (None: no FP8 decision in the graph)
    fp8_judged: int | None = None        # GEMMs plan/fp8_cost judged
    fp8_kept: dict[str, int] | None = None   # rule -> GEMMs kept bf16 by it (node.meta[FP8]["rule"])

    @property
    def param_bytes_saved(self) -> int:
        return self.param_bytes_before - self.param_bytes_after

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["notes"] = list(self.notes)
        out["param_bytes_saved"] = self.param_bytes_saved
        return out


class Diff:
    """The result of `rewriter.diff`: `summary`, `nodes` (every node, graph order, then removed casts).

    Renderings: `str(d)` / `d.to_text()`, `d.to_json()`, `d.to_html()`.
    """

    def __init__(self, summary: Summary, nodes: list[NodeDiff]):
        self.summary = summary
        self.nodes = list(nodes)

    @property
    def changed(self) -> list[NodeDiff]:
        """The nodes whose precision changed, the casts and copies added, the casts removed."""
        return [n for n in self.nodes if n.changed]

    def __repr__(self) -> str:
        s = self.summary
        return (f"<Diff {s.model} -> {s.precision}: {len(self.changed)} changed nodes, "
                f"+{s.casts_added}/-{s.casts_removed} casts, {format_bytes(s.param_bytes_saved)} saved>")

    def __str__(self) -> str:
        return self.to_text()

    # ------------------------------------------------------------------ text
    def to_text(self, max_rows: int | None = 60, width: int | None = None) -> str:
        """Summary, then the changed ops and casts one per line, weights and fp32 keeps grouped; under
        precision fp8 the FP8 GEMM count and, per rule, why the other GEMMs stayed bf16.

        Args:
            max_rows: most lines per section (None: all); the JSON and HTML always have all.
            width: fit every line in this many columns (a terminal's 80): long names are cut with an
                ellipsis, each reason goes on its own wrapped line under its node. None: one line per node.
        """
        return render_text(self, max_rows=max_rows, width=width)

    # ------------------------------------------------------------------ json / html
    def to_dict(self, *, all_nodes: bool = False) -> dict:
        """{"format", "summary", "nodes"}: nodes are the changed ones unless all_nodes."""
        nodes = self.nodes if all_nodes else self.changed
        return {"format": _FORMAT, "summary": self.summary.to_dict(),
                "nodes": [n.to_dict(with_inputs=all_nodes) for n in nodes]}

    def to_json(self, *, all_nodes: bool = False, indent: int | None = 2) -> str:
        """JSON text: one entry per changed node, each with its reason (all nodes with all_nodes)."""
        return json.dumps(self.to_dict(all_nodes=all_nodes), indent=indent, default=str)

    def to_html(self, title: str | None = None) -> str:
        """A self-contained HTML page (no network): summary, sortable table, picture of the graph."""
        return render_html(self, title=title)
