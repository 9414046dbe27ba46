"""HTML rendering of a `Diff`: one self-contained page (inline CSS and JS, no network, no CDN).

Sections: the summary (with the FP8 GEMM count under precision fp8); the graph, drawn in the page by
rewriter/report_js.py (modules as collapsible groups, shapes and dtypes on edges, search, a side panel
with each node's decision, before/after toggle, coloured by dtype with casts outlined in red); a table
of every node (ops first, weights last), sortable by any column and filterable.

The graph travels as JSON in `<script id="graph-data" type="application/json">`: one object per node
with short keys (n name, o op, k kind, m module, od/nd/cd old/new/compute dtype, ch change, r rule,
why reason, in inputs, sh shape, f8 FP8 record, ex measured figures).
"""
from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING

from rewriter.report_css import STYLE
from rewriter.report_js import SCRIPT

if TYPE_CHECKING:  # pragma: no cover  (annotations only: diff imports this module)
    from rewriter.diff import Diff, NodeDiff

__all__ = ["render_html", "graph_data", "COLORS", "short_dtype", "format_bytes"]

COLORS = {  # fill by compute dtype; light enough for dark text
    "float32": "#9ecae9", "float16": "#ffbe7d", "bfloat16": "#8cd17d", "float8_e4m3fn": "#d4a6c8",
    "float8_e5m2": "#d4a6c8", "float64": "#c9b7e6", None: "#e0e0e0",
}
_EDGE = {  # edge stroke by the dtype the value travels in: darker tones of COLORS
    "float32": "#3b7fb6", "float16": "#d9822b", "bfloat16": "#3f9b35", "float8_e4m3fn": "#9a4c8c",
    "float8_e5m2": "#9a4c8c", "float64": "#7b5fb0",
}


def _color(dtype: str | None) -> str:
    return COLORS.get(dtype, COLORS[None])


_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
          "float8_e4m3fn": "fp8e4m3", "float8_e5m2": "fp8e5m2"}


def short_dtype(name: str | None) -> str:
    """'float16' -> 'fp16'; None -> '-'."""
    if name is None:
        return "-"
    return _SHORT.get(name, name)


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _short(dtype: str | None) -> str:
    return short_dtype(dtype)


def _shown_dtype(n: "NodeDiff") -> str | None:
    return n.compute_dtype or n.new_dtype


def _num(value) -> str:
    return "" if value is None else html.escape(str(value))


def _fmt_float(value) -> str:
    if value is None:
        return ""
    try:
        return f"{float(value):.3g}"
    except (TypeError, ValueError):
        return html.escape(str(value))


_COLUMNS = [("#", "num"), ("node", "str"), ("op", "str"), ("kind", "str"), ("module", "str"),
            ("before", "str"), ("after", "str"), ("computes", "str"), ("change", "str"),
            ("rule", "str"), ("reason", "str"), ("casts +/-", "num"), ("bytes saved", "num"),
            ("amax", "num"), ("error", "num")]


def _rows(diff: "Diff") -> str:
    out = []
    order = {"input": 0, "compute": 1, "cast": 1, "output": 2, "weight": 3}
    for n in sorted(diff.nodes, key=lambda n: (order.get(n.kind, 1), n.index < 0)):
        saved = None
        if n.bytes_before is not None and n.bytes_after is not None:
            saved = n.bytes_before - n.bytes_after
        amax = (n.range or {}).get("amax")
        error = (n.sensitivity or {}).get("error")
        casts = len(n.casts_added) - len(n.casts_removed)
        casts_text = " ".join([f"+{c}" for c in n.casts_added] + [f"-{c}" for c in n.casts_removed])
        cells = [
            (n.index, str(n.index) if n.index >= 0 else "\u2013"),
            (n.name, html.escape(n.name)), (n.op, html.escape(n.op)), (n.kind, n.kind),
            (n.module or "", html.escape(n.module or "")),
            (n.old_dtype or "", _short(n.old_dtype)), (n.new_dtype or "", _short(n.new_dtype)),
            (n.compute_dtype or "", _short(n.compute_dtype) if n.compute_dtype else ""),
            (n.change, n.change), (n.rule or "", html.escape(n.rule or "")),
            (_reason(n), html.escape(_reason(n))),
            (casts, html.escape(casts_text)), (saved if saved is not None else "", _num(saved)),
            (amax if amax is not None else "", _fmt_float(amax)),
            (error if error is not None else "", _fmt_float(error)),
        ]
        tds = "".join(f"<td>{text}</td>" if str(v) == text else
                      f'<td data-v="{html.escape(str(v))}">{text}</td>' for v, text in cells)
        dtype = _shown_dtype(n)
        out.append(f'<tr id="row-{html.escape(n.name)}" class="{n.change} {n.kind}" '
                   f'data-name="{html.escape(n.name)}" style="--c:{_color(dtype)}">{tds}</tr>')
    return "".join(out)


def _reason(n: "NodeDiff") -> str:
    """The node's reason; a GEMM judged for FP8 adds that decision (why it stayed bf16)."""
    if not n.fp8:
        return n.reason or ""
    what = "FP8" if n.fp8.get("use") else f"not FP8 ({n.fp8.get('rule')})"
    return f"{n.reason or ''}; {what}: {n.fp8.get('reason', '')}"


def _summary(diff: "Diff") -> str:
    s = diff.summary
    dtypes = sorted(set(s.precision_before) | set(s.precision_after), key=lambda d: (d != "float32", d))
    per = "".join(f'<li><span class="sw" style="background:{_color(d)}"></span>{_short(d)}: '
                  f"{s.precision_before.get(d, 0)} \u2192 <b>{s.precision_after.get(d, 0)}</b></li>"
                  for d in dtypes)
    pct = (100.0 * s.param_bytes_saved / s.param_bytes_before) if s.param_bytes_before else 0.0
    rules = ", ".join(f"{html.escape(r)} {c}" for r, c in sorted(s.rules.items(), key=lambda kv: -kv[1]))
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in s.notes)
    return (
        '<section id="summary"><div class="cards">'
        f'<div class="card"><h3>model</h3><p><b>{html.escape(s.model)}</b> \u2192 '
        f'{html.escape(s.precision or "?")}</p><p class="dim">{html.escape(s.capture or "")}'
        f'{", dynamic batch" if s.dynamic_batch else ""}</p></div>'
        f'<div class="card"><h3>compute nodes ({s.compute_nodes})</h3><ul>{per}</ul></div>'
        f'<div class="card"><h3>casts</h3><p>{s.casts_before} \u2192 <b>{s.casts_after}</b></p>'
        f'<p class="dim">+{s.casts_added} added, \u2212{s.casts_removed} removed</p></div>'
        f'<div class="card"><h3>parameters</h3><p>{format_bytes(s.param_bytes_before)} \u2192 '
        f'<b>{format_bytes(s.param_bytes_after)}</b></p>'
        f'<p class="dim">saved {format_bytes(s.param_bytes_saved)} '
        f'({pct:.0f}%)</p></div>'
        f'<div class="card"><h3>changed nodes</h3><p><b>{s.changed_nodes}</b></p>'
        f'<p class="dim">kept fp32 on purpose: {s.kept_fp32}</p><p class="dim">{rules}</p></div>'
        f"{_fp8_card(diff)}"
        "</div>" + (f'<ul class="notes">{notes}</ul>' if notes else "") + "</section>"
    )


def _fp8_card(diff: "Diff") -> str:
    s = diff.summary
    if not s.fp8_judged:
        return ""
    kept = "".join(f"<li>{html.escape(_RULES.get(r, r))}: <b>{c}</b></li>" for r, c in (s.fp8_kept or {}).items())
    return (f'<div class="card" id="fp8card"><h3>FP8 GEMMs</h3><p><b>{s.fp8_gemms}</b> of {s.fp8_judged}</p>'
            + (f'<p class="dim">kept bf16:</p><ul>{kept}</ul>' if kept else "") + "</div>")


_RULES = {"size": "small GEMM", "op": "not a weight GEMM", "dims": "K/N not multiple of 16",
          "hardware": "no FP8 tensor cores", "cost": "estimated slower", "precision": "not decided bf16",
          "override": "bf16 override", "autocast-region": "autocast region"}


def _legend(diff: "Diff") -> str:
    present = {_shown_dtype(n) for n in diff.nodes if n.kind != "weight"} | {n.old_dtype for n in diff.nodes}
    items = "".join(f'<span><span class="sw" style="background:{_color(d)}"></span>{_short(d)}</span>'
                    for d in sorted(present, key=lambda d: (d is None, str(d))) if d is not None)
    return (f'<div class="legend">{items}<span><span class="sw" style="background:{_color(None)}">'
            '</span>no float</span><span><span class="sw castsw"></span>cast</span>'
            '<span><span class="sw changedsw"></span>precision changed</span>'
            '<span><span class="sw islandsw"></span>fp32 island (kept fp32 in a 16/8-bit model)</span>'
            '<span><span class="sw grpsw"></span>module (click twice or double-click to expand; click a '
            'frame title to collapse)</span></div>')


def graph_data(diff: "Diff") -> dict:
    """What the page's script draws: nodes (short keys, see the module docstring), colours, names."""
    nodes = []
    for n in diff.nodes:
        x = {"n": n.name, "o": n.op, "k": n.kind, "ch": n.change}
        for key, value in (("m", n.module), ("od", n.old_dtype), ("nd", n.new_dtype), ("cd", n.compute_dtype),
                           ("r", n.rule), ("why", n.reason), ("sh", n.shape), ("f8", n.fp8)):
            if value:
                x[key] = value
        if n.inputs:
            x["in"] = list(n.inputs)
        extra = {k: getattr(n, k) for k in ("range", "sensitivity", "bytes_before", "bytes_after")
                 if getattr(n, k) is not None}
        if extra:
            x["ex"] = extra
        nodes.append(x)
    lowp = (diff.summary.precision or "") not in ("", "fp32", "float32")
    return {"nodes": nodes, "colors": {**{k: v for k, v in COLORS.items() if k}, "none": COLORS[None]},
            "edge": _EDGE, "short": _SHORT, "lowp": lowp, "edgeLabels": True}


def _json(value) -> str:
    return json.dumps(value, default=str, separators=(",", ":")).replace("</", "<\\/")


def render_html(diff: "Diff", title: str | None = None) -> str:
    """The report page for `diff` as a string (write it with utf-8)."""
    s = diff.summary
    title = title or f"rewriter diff: {s.model} \u2192 {s.precision or '?'}"
    heads = "".join(f'<th data-kind="{kind}">{html.escape(name)}</th>' for name, kind in _COLUMNS)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1></header><main>"
        f"{_summary(diff)}"
        "<h2>graph</h2>"
        f"{_legend(diff)}"
        '<div class="tools"><span class="searchbox"><input id="search" type="search" '
        'placeholder="search node, op, module" size="32" autocomplete="off"><div id="results"></div></span>'
        '<label><input type="radio" name="mode" id="m-after" checked> after</label>'
        '<label><input type="radio" name="mode" id="m-before"> before</label>'
        '<button id="xlayers" type="button">collapse to layers</button>'
        '<button id="xall" type="button">expand all</button>'
        '<label><input id="elabels" type="checkbox" checked> shapes on edges</label>'
        '<button id="zout" type="button">\u2212</button><button id="zin" type="button">+</button>'
        '<button id="zfit" type="button">fit</button><span id="zoomv">100%</span></div>'
        '<div id="view"><div id="picture"><svg id="graph" role="img" aria-label="graph coloured by precision">'
        '</svg></div><aside id="panel"><p class="dim">Select a node for its decision, rule and reason; '
        "select a module box for its totals.</p></aside></div>"
        "<h2>nodes</h2>"
        '<div class="tools"><input id="filter" type="search" placeholder="filter (name, op, module, reason)"'
        ' size="40"><label><input id="changedonly" type="checkbox"> changed only</label>'
        '<span id="count" class="dim"></span><span class="dim">click a column to sort, a row to find it '
        "in the graph</span></div>"
        f'<div id="tablewrap"><table id="nodes"><thead><tr>{heads}</tr></thead>'
        f"<tbody>{_rows(diff)}</tbody></table></div>"
        f'</main><script type="application/json" id="summary-data">{_json(s.to_dict())}</script>'
        f'<script type="application/json" id="graph-data">{_json(graph_data(diff))}</script>'
        f"<script>{SCRIPT}</script></body></html>\n"
    )
