"""The report page's style sheet (inline in the page; rewriter/report.py)."""
from __future__ import annotations

__all__ = ["STYLE"]

STYLE = """
*{box-sizing:border-box}body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;
color:#1b1b1b;background:#fafafa}header{padding:12px 20px;background:#263238;color:#fff}
header h1{margin:0;font-size:18px}main{padding:10px 20px}h2{font-size:16px;margin:16px 0 6px}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#fff;border:1px solid #ddd;border-radius:6px;
padding:8px 12px;min-width:170px}.card h3{margin:0 0 4px;font-size:12px;text-transform:uppercase;color:#666}
.card p{margin:2px 0}.card ul{margin:0;padding:0;list-style:none}.dim{color:#666;font-size:12px}
.sw{display:inline-block;width:12px;height:12px;border:1px solid #888;margin-right:4px;vertical-align:-1px}
.castsw{border:2px solid #d62728;border-radius:6px}.changedsw{border:2px solid #111}
.islandsw{background:#9ecae9;border:2px dashed #1f4e79}.grpsw{background:#eceff1;border:1px solid #546e7a}
.legend{display:flex;gap:14px;flex-wrap:wrap;margin:6px 0;font-size:12px}.notes{color:#8a4b00}
.tools{display:flex;gap:8px;align-items:center;margin:6px 0;flex-wrap:wrap}.tools button{padding:2px 10px}
.searchbox{position:relative}#results{position:absolute;z-index:5;background:#fff;max-height:50vh;overflow:auto;
min-width:100%;box-shadow:0 2px 8px rgba(0,0,0,.2);font-size:12px}#results .hit{padding:2px 8px;cursor:pointer}
#results .hit:hover{background:#e3f2fd}
#view{display:flex;gap:8px;height:78vh}#picture{flex:1;overflow:auto;border:1px solid #ccc;background:#fff;
border-radius:4px}#panel{width:380px;overflow:auto;border:1px solid #ccc;background:#fff;border-radius:4px;
padding:8px 12px;font-size:12.5px}#panel h3{margin:0;font-size:14px;word-break:break-all}
#panel dl{display:grid;grid-template-columns:max-content 1fr;gap:3px 8px;margin:8px 0}
#panel dt{color:#666}#panel dd{margin:0;word-break:break-word}.kv{border-collapse:collapse;margin-top:4px}
.kv td{border:1px solid #eee;padding:1px 4px;font-size:11px}
#graph text{font:10px ui-monospace,Menlo,Consolas,monospace;fill:#111;pointer-events:none}
#graph text.op{font-weight:600}#graph text.sub{fill:#444;font-size:9px}
#graph .e{fill:none;stroke-width:1.2;opacity:.75}#graph text.el{font-size:8.5px;fill:#555}
#graph .node,#graph .grp{cursor:pointer}#graph .node rect{stroke:#999;stroke-width:.8}
#graph .changed rect{stroke:#111;stroke-width:1.3}#graph .cast rect{stroke:#d62728;stroke-width:2.5}
#graph .island rect{stroke:#1f4e79;stroke-width:2;stroke-dasharray:4 2}#graph .removed{opacity:.55}
#graph .grp>rect:first-child{fill:#eceff1;stroke:#546e7a;stroke-width:1.2}
#graph .frame rect{fill:rgba(120,144,156,.06);stroke:#90a4ae;stroke-dasharray:3 3}
#graph .frame text.ft{fill:#37474f;font-weight:600;cursor:pointer;pointer-events:all}
#graph .sel rect{stroke:#000 !important;stroke-width:3 !important}
#graph .hit>rect:first-child{stroke:#ff6f00 !important;stroke-width:3 !important}
table{border-collapse:collapse;background:#fff;font-size:12px;width:100%}
th,td{border:1px solid #e2e2e2;padding:3px 6px;text-align:left;vertical-align:top}
th{position:sticky;top:0;background:#eceff1;cursor:pointer;user-select:none;white-space:nowrap}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
td:nth-child(6),td:nth-child(7),td:nth-child(8){white-space:nowrap}td:nth-child(11){min-width:28em}
td:nth-child(2),td:nth-child(5){word-break:break-all}
tr td:first-child{border-left:6px solid var(--c)}tr.sel{outline:2px solid #000}
tr.added td:nth-child(9){color:#b00020;font-weight:600}tr.dtype td:nth-child(9){font-weight:600}
tr.removed{color:#777;text-decoration:line-through}#tablewrap{max-height:80vh;overflow:auto}
"""
