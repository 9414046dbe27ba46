"""HTML rendering of a `Diff`: one self-contained page (inline CSS and JS, no network, no CDN).

Sections: the summary; a picture of the graph, coloured by the precision each node computes in,
with casts drawn as red-edged boxes; a table of every node, sortable by any column and filterable.

The picture is laid out here, in Python, as a layered drawing (fast for thousands of nodes):
    layer(node) = 1 + max(layer(inputs)), inputs at the top, outputs at the bottom;
    within a layer nodes are ordered by the mean position of their inputs (one barycenter sweep)
    and pushed right only as far as needed not to overlap.
Weights are left out of the picture (they are in the table). All edges are one <path>, so a
1,000-node graph renders at once; hovering a node shows its decision, clicking it selects the
table row (and clicking a row scrolls the picture to the node).
"""
from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover  (annotations only: diff imports this module)
    from rewriter.diff import Diff, NodeDiff

__all__ = ["render_html", "layout", "COLORS", "short_dtype", "format_bytes"]

COLORS = {  # fill by compute dtype; light enough for dark text
    "float32": "#9ecae9", "float16": "#ffbe7d", "bfloat16": "#8cd17d", "float8_e4m3fn": "#d4a6c8",
    "float8_e5m2": "#d4a6c8", "float64": "#c9b7e6", None: "#e0e0e0",
}
_CAST_STROKE = "#d62728"
_W, _H, _CAST_W = 118, 18, 78       # node box sizes
_DX, _DY, _MARGIN = 12, 22, 16      # gaps


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


def _drawn(n: "NodeDiff") -> bool:
    if n.kind in ("weight",) or n.change == "removed":
        return False
    if n.kind == "compute" and n.old_dtype is None and n.new_dtype is None and n.compute_dtype is None:
        return False
    return True


def layout(nodes: list["NodeDiff"]) -> dict[str, tuple[float, float, float]]:
    """Positions of the drawable nodes: name -> (x, y, width).

    Weights, removed casts and values that are not tensors (symbolic sizes, guards) are skipped:
    they would add long edges without saying anything about precision.
    """
    shown = [n for n in nodes if _drawn(n)]
    names = {n.name for n in shown}
    parents = {n.name: [i for i in n.inputs if i in names] for n in shown}
    children: dict[str, list[str]] = {n.name: [] for n in shown}
    for n in shown:
        for p in parents[n.name]:
            children[p].append(n.name)
    layer: dict[str, int] = {}
    for n in shown:  # fx graphs are in topological order
        layer[n.name] = 1 + max((layer[p] for p in parents[n.name]), default=-1)
    for n in reversed(shown):  # constants and factories sit just above their first reader
        if not parents[n.name] and n.kind != "input" and children[n.name]:
            layer[n.name] = max(0, min(layer[c] for c in children[n.name]) - 1)
    rows: dict[int, list[str]] = {}
    for n in shown:
        rows.setdefault(layer[n.name], []).append(n.name)
    width = {n.name: (_CAST_W if n.kind == "cast" else _W) for n in shown}
    pos: dict[str, tuple[float, float, float]] = {}
    for depth in sorted(rows):
        def center(name: str) -> float:
            xs = [pos[p][0] + pos[p][2] / 2 for p in parents[name] if p in pos]
            return sum(xs) / len(xs) if xs else 0.0
        wanted = sorted(((center(nm), nm) for nm in rows[depth]), key=lambda t: t[0])
        x_free = _MARGIN
        for c, nm in wanted:
            x = max(x_free, c - width[nm] / 2)
            pos[nm] = (x, _MARGIN + depth * (_H + _DY), width[nm])
            x_free = x + width[nm] + _DX
    return pos


def _svg(diff: "Diff") -> str:
    nodes = diff.nodes
    pos = layout(nodes)
    if not pos:
        return '<svg id="graph" width="200" height="40" role="img"></svg>'
    total_w = max(x + w for x, _, w in pos.values()) + _MARGIN
    total_h = max(y for _, y, _ in pos.values()) + _H + _MARGIN
    edges = []
    for n in nodes:
        if n.name not in pos:
            continue
        x2, y2, w2 = pos[n.name]
        for p in n.inputs:
            if p not in pos:
                continue
            x1, y1, w1 = pos[p]
            ax, ay, bx, by = x1 + w1 / 2, y1 + _H, x2 + w2 / 2, y2
            mid = (ay + by) / 2
            edges.append(f"M{ax:.0f} {ay:.0f}C{ax:.0f} {mid:.0f} {bx:.0f} {mid:.0f} {bx:.0f} {by:.0f}")
    parts = [f'<svg id="graph" width="{total_w:.0f}" height="{total_h:.0f}" '
             f'viewBox="0 0 {total_w:.0f} {total_h:.0f}" role="img" '
             'aria-label="graph coloured by precision">',
             f'<path class="edges" d="{"".join(edges)}"/>']
    for n in nodes:
        if n.name not in pos:
            continue
        x, y, w = pos[n.name]
        dtype = _shown_dtype(n)
        cls = "node cast" if n.kind == "cast" else ("node changed" if n.changed else "node")
        label = f"\u2192{_short(n.new_dtype)}" if n.kind == "cast" else n.op
        tip = (f"{n.name} ({n.op}) {n.module or ''}\n{_short(n.old_dtype)} \u2192 {_short(n.new_dtype)}"
               f"{' computes in ' + _short(n.compute_dtype) if n.compute_dtype else ''}\n"
               f"{n.rule or ''}: {n.reason or ''}")
        stroke = f' stroke="{_CAST_STROKE}" stroke-width="2.5"' if n.kind == "cast" else ""
        parts.append(
            f'<g class="{cls}" data-name="{html.escape(n.name)}" transform="translate({x:.0f},{y:.0f})">'
            f'<title>{html.escape(tip)}</title>'
            f'<rect width="{w}" height="{_H}" rx="{9 if n.kind == "cast" else 3}" '
            f'fill="{_color(dtype)}"{stroke}/>'
            f'<text x="{w / 2:.0f}" y="13">{html.escape(label[:18])}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


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
    for n in diff.nodes:
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
            (n.reason or "", html.escape(n.reason or "")),
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
        "</div>" + (f'<ul class="notes">{notes}</ul>' if notes else "") + "</section>"
    )


def _legend(diff: "Diff") -> str:
    present = {_shown_dtype(n) for n in diff.nodes if _drawn(n)}
    items = "".join(f'<span><span class="sw" style="background:{_color(d)}"></span>{_short(d)}</span>'
                    for d in sorted(present, key=lambda d: (d is None, str(d))) if d is not None)
    return (f'<div class="legend">{items}<span><span class="sw" style="background:{_color(None)}">'
            f'</span>no float</span><span><span class="sw castsw"></span>cast (added by the rewriter)'
            '</span><span><span class="sw changedsw"></span>precision changed</span></div>')


_CSS = """
*{box-sizing:border-box}body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;
color:#1b1b1b;background:#fafafa}header{padding:14px 20px;background:#263238;color:#fff}
header h1{margin:0;font-size:18px}main{padding:12px 20px}h2{font-size:16px;margin:18px 0 8px}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#fff;border:1px solid #ddd;border-radius:6px;
padding:8px 12px;min-width:170px}.card h3{margin:0 0 4px;font-size:12px;text-transform:uppercase;color:#666}
.card p{margin:2px 0}.card ul{margin:0;padding:0;list-style:none}.dim{color:#666;font-size:12px}
.sw{display:inline-block;width:12px;height:12px;border:1px solid #888;margin-right:4px;vertical-align:-1px}
.castsw{border:2px solid #d62728;border-radius:6px}.changedsw{border:2px solid #111}
.legend{display:flex;gap:14px;flex-wrap:wrap;margin:6px 0}.notes{color:#8a4b00}
#picture{height:72vh;overflow:auto;border:1px solid #ccc;background:#fff;border-radius:4px}
#graph text{font:10px ui-monospace,Menlo,Consolas,monospace;text-anchor:middle;fill:#111;pointer-events:none}
#graph .edges{fill:none;stroke:#9aa0a6;stroke-width:1;opacity:.65}
#graph .node{cursor:pointer}#graph .changed rect{stroke:#111;stroke-width:1.2}
#graph .sel rect{stroke:#000;stroke-width:3}.tools{display:flex;gap:8px;align-items:center;margin:6px 0}
.tools button{padding:2px 10px}table{border-collapse:collapse;width:100%;background:#fff;font-size:12px}
th,td{border:1px solid #e2e2e2;padding:3px 6px;text-align:left;vertical-align:top}
th{position:sticky;top:0;background:#eceff1;cursor:pointer;user-select:none;white-space:nowrap}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
td:nth-child(6),td:nth-child(7),td:nth-child(8){white-space:nowrap}
tr td:first-child{border-left:6px solid var(--c)}tr.sel{outline:2px solid #000}
tr.added td:nth-child(9){color:#b00020;font-weight:600}tr.dtype td:nth-child(9){font-weight:600}
tr.removed{color:#777;text-decoration:line-through}#tablewrap{max-height:80vh;overflow:auto}
"""

_JS = r"""
(function(){
  var errors=[];
  window.addEventListener('error',function(e){errors.push(String(e.message));
    document.body.setAttribute('data-js-errors',errors.join(' | '));});
  var table=document.getElementById('nodes'), tbody=table.tBodies[0];
  var heads=table.tHead.rows[0].cells, dir={};
  function val(td){var v=td.getAttribute('data-v'); return v===null?td.textContent:v;}
  function sortBy(col){
    var kind=heads[col].getAttribute('data-kind'), d=dir[col]=dir[col]===1?-1:1;
    var rows=Array.prototype.slice.call(tbody.rows);
    rows.sort(function(a,b){
      var x=val(a.cells[col]), y=val(b.cells[col]);
      if(kind==='num'){x=x===''?-Infinity:parseFloat(x); y=y===''?-Infinity:parseFloat(y);
        return (x-y)*d;}
      return x.localeCompare(y,undefined,{numeric:true})*d;});
    var frag=document.createDocumentFragment();
    rows.forEach(function(r){frag.appendChild(r);}); tbody.appendChild(frag);
    for(var i=0;i<heads.length;i++){heads[i].className='';}
    heads[col].className=d===1?'asc':'desc';
  }
  for(var i=0;i<heads.length;i++){
    (function(c){heads[c].addEventListener('click',function(){sortBy(c);});})(i);}
  var filter=document.getElementById('filter'), only=document.getElementById('changedonly');
  function applyFilter(){
    var q=filter.value.toLowerCase(), oc=only.checked, shown=0;
    for(var i=0;i<tbody.rows.length;i++){var r=tbody.rows[i];
      var ok=(!oc||!r.classList.contains('none'))&&(!q||r.textContent.toLowerCase().indexOf(q)>=0);
      r.style.display=ok?'':'none'; if(ok)shown++;}
    document.getElementById('count').textContent=shown+' of '+tbody.rows.length+' nodes';
  }
  filter.addEventListener('input',applyFilter); only.addEventListener('change',applyFilter);
  var svg=document.getElementById('graph'), pic=document.getElementById('picture');
  var W=parseFloat(svg.getAttribute('width')), H=parseFloat(svg.getAttribute('height')), zoom=1;
  function setZoom(z){zoom=Math.max(0.05,Math.min(4,z));svg.setAttribute('width',W*zoom);
    svg.setAttribute('height',H*zoom);document.getElementById('zoomv').textContent=Math.round(zoom*100)+'%';}
  document.getElementById('zin').onclick=function(){setZoom(zoom*1.25);};
  document.getElementById('zout').onclick=function(){setZoom(zoom/1.25);};
  document.getElementById('zfit').onclick=function(){
    setZoom(Math.min(pic.clientWidth/W,pic.clientHeight/H));};
  document.getElementById('z1').onclick=function(){setZoom(1);};
  var selected=[];
  function select(name,scrollPicture,scrollRow){
    selected.forEach(function(e){e.classList.remove('sel');}); selected=[];
    var row=document.getElementById('row-'+name);
    if(row){row.classList.add('sel');selected.push(row);
      if(scrollRow){row.scrollIntoView({block:'center'});}}
    var g=svg.querySelector('g[data-name="'+(window.CSS&&CSS.escape?CSS.escape(name):name)+'"]');
    if(g){g.classList.add('sel');selected.push(g);
      if(scrollPicture){var b=g.getBBox(), t=g.transform.baseVal.consolidate().matrix;
        pic.scrollTo({left:(t.e+b.width/2)*zoom-pic.clientWidth/2,top:t.f*zoom-pic.clientHeight/2});}}
  }
  svg.addEventListener('click',function(e){var g=e.target.closest('g.node');
    if(g){select(g.getAttribute('data-name'),false,true);}});
  tbody.addEventListener('click',function(e){var r=e.target.closest('tr');
    if(r){select(r.getAttribute('data-name'),true,false);}});
  applyFilter();
  if(location.hash==='#selftest'){  // used by the browser test: sort, filter, select, then report
    var problems=[];
    sortBy(0); sortBy(0);
    var first=parseFloat(val(tbody.rows[0].cells[0]));
    var last=parseFloat(val(tbody.rows[tbody.rows.length-1].cells[0]));
    if(!(first>last)){problems.push('descending sort by # failed');}
    sortBy(1);
    if(val(tbody.rows[0].cells[1]).localeCompare(val(tbody.rows[1].cells[1]),undefined,{numeric:true})>0){
      problems.push('sort by node failed');}
    only.checked=true; applyFilter();
    var hidden=tbody.querySelectorAll('tr.none').length, visible=0;
    for(var k=0;k<tbody.rows.length;k++){if(tbody.rows[k].style.display!=='none'){visible++;}}
    if(visible+hidden!==tbody.rows.length){problems.push('changed-only filter failed');}
    var g=svg.querySelector('g.node.cast'); if(g){select(g.getAttribute('data-name'),true,true);
      if(!document.querySelector('tr.sel')){problems.push('selecting a node did not select its row');}}
    document.body.setAttribute('data-selftest',problems.length?problems.join('; '):'ok');
  }
  document.body.setAttribute('data-ready','1');
  document.body.setAttribute('data-graph-nodes',String(svg.querySelectorAll('g.node').length));
  document.body.setAttribute('data-table-rows',String(tbody.rows.length));
})();
"""


def render_html(diff: "Diff", title: str | None = None) -> str:
    """The report page for `diff` as a string (write it with utf-8)."""
    s = diff.summary
    title = title or f"rewriter diff: {s.model} \u2192 {s.precision or '?'}"
    heads = "".join(f'<th data-kind="{kind}">{html.escape(name)}</th>' for name, kind in _COLUMNS)
    data = json.dumps(diff.summary.to_dict(), default=str).replace("</", "<\\/")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1></header><main>"
        f"{_summary(diff)}"
        "<h2>graph</h2>"
        f"{_legend(diff)}"
        '<div class="tools"><button id="zout" type="button">\u2212</button>'
        '<button id="zin" type="button">+</button><button id="zfit" type="button">fit</button>'
        '<button id="z1" type="button">1:1</button><span id="zoomv">100%</span>'
        '<span class="dim">hover a node for its decision, click it to find it in the table; '
        "weights are listed in the table only</span></div>"
        f'<div id="picture">{_svg(diff)}</div>'
        "<h2>nodes</h2>"
        '<div class="tools"><input id="filter" type="search" placeholder="filter (name, op, module, reason)"'
        ' size="40"><label><input id="changedonly" type="checkbox"> changed only</label>'
        '<span id="count" class="dim"></span><span class="dim">click a column to sort</span></div>'
        f'<div id="tablewrap"><table id="nodes"><thead><tr>{heads}</tr></thead>'
        f"<tbody>{_rows(diff)}</tbody></table></div>"
        f'</main><script type="application/json" id="summary-data">{data}</script>'
        f"<script>{_JS}</script></body></html>\n"
    )
