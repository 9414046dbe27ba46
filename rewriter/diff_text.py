"""The text rendering of a `Diff` (`str(d)`, `d.to_text(width=80)`, `rewrite diff`).

Under precision="fp8" it also says how many GEMMs run in FP8 and, grouped by the rule that decided it,
why the others stayed bf16 (node.meta[FP8] = {"use": False, "rule", "reason", ...} from plan/fp8_cost):

    FP8 GEMMs      0 of 13; 13 kept bf16: small GEMM 8, not a weight GEMM 4, K/N not multiple of 16 1
    ...
    kept bf16 instead of FP8 (13)
      size  small GEMM (8): linear, linear_1, linear_2, ...
          kept bf16: M*N*K = 4.9e+04 < 2.1e+09 (M=16 ...): FP8 loses on small GEMMs ...
"""
from __future__ import annotations

import collections
import textwrap
from typing import TYPE_CHECKING

from rewriter.report import format_bytes, short_dtype

if TYPE_CHECKING:  # pragma: no cover
    from rewriter.diff import Diff

__all__ = ["render_text", "fp8_lines", "fp8_counts", "FP8_RULES"]

FP8_RULES = {  # plan/fp8_cost's rules, as a reader would name them
    "size": "small GEMM", "op": "not a weight GEMM (attention, bmm, conv)",
    "dims": "K/N not multiple of 16", "hardware": "no FP8 tensor cores on the target",
    "cost": "estimated slower than bf16", "precision": "not decided bf16",
    "override": "bf16 override", "autocast-region": "autocast region asks bf16",
}


def fp8_counts(nodes) -> tuple[int, int, dict[str, list]]:
    """(FP8 GEMMs, GEMMs judged, {rule: [nodes kept bf16]}) from the nodes' FP8 records."""
    used, kept = 0, collections.defaultdict(list)
    judged = [n for n in nodes if n.fp8 and n.change != "removed"]
    for n in judged:
        if n.fp8.get("use"):
            used += 1
        else:
            kept[str(n.fp8.get("rule") or "?")].append(n)
    return used, len(judged), dict(sorted(kept.items(), key=lambda kv: -len(kv[1])))


def fp8_lines(diff: "Diff", max_rows: int | None = 60) -> list[str]:
    """The FP8 summary line and the per-rule section; [] when no node has an FP8 record."""
    used, judged, kept = fp8_counts(diff.nodes)
    if not judged:
        return []
    n_kept = sum(len(v) for v in kept.values())
    line = f"  FP8 GEMMs      {used} of {judged}"
    if kept:
        line += f"; {n_kept} kept bf16: " + ", ".join(f"{FP8_RULES.get(r, r)} {len(v)}" for r, v in kept.items())
    out = [line]
    if not kept:
        return out
    out += ["", f"kept bf16 instead of FP8 ({n_kept})"]
    for rule, group in kept.items():
        names = [n.name for n in group]
        shown = names if max_rows is None else names[:8]  # all with --all (max_rows None)
        more = f", ... {len(names) - len(shown)} more" if len(shown) < len(names) else ""
        out.append(f"  {rule}  {FP8_RULES.get(rule, rule)} ({len(group)}): {', '.join(shown)}{more}")
        reasons = collections.Counter(_generic(n.fp8.get("reason")) for n in group)
        for reason, count in reasons.most_common(3):
            first = next(n for n in group if _generic(n.fp8.get("reason")) == reason)
            text = str(first.fp8.get("reason") or "")
            out.append(f"      {text}" + (f" (and {count - 1} alike)" if count > 1 else ""))
    return out


def _generic(reason) -> str:
    """A reason with its numbers and names blanked, to group alike reasons."""
    import re
    return re.sub(r"[\w.]*\d[\w.+-]*", "#", str(reason or ""))


def _row_reason(n) -> str:
    """The node's reason; a GEMM that stayed bf16 under fp8 adds why it is not FP8."""
    if n.fp8 and not n.fp8.get("use"):
        return f"{_cut(n.reason, 60)}; not FP8 ({n.fp8.get('rule')}): {_cut(n.fp8.get('reason'), 150)}"
    if n.fp8 and n.fp8.get("use"):
        return f"{_cut(n.reason, 60)}; FP8: {_cut(n.fp8.get('reason'), 90)}"
    return _cut(n.reason, 90)


def render_text(diff: "Diff", max_rows: int | None = 60, width: int | None = None) -> str:
    """See `Diff.to_text`."""
    s = diff.summary
    lines = [f"rewriter diff: {s.model} -> {s.precision or '?'}"
             + (f" (captured with {s.capture}{', dynamic batch' if s.dynamic_batch else ''})"
                if s.capture else "")]
    dtypes = sorted(set(s.precision_before) | set(s.precision_after),
                    key=lambda d: (d != "float32", d))
    per = ", ".join(f"{short_dtype(d)} {s.precision_before.get(d, 0)} -> {s.precision_after.get(d, 0)}"
                    for d in dtypes)
    lines.append(f"  compute nodes  {s.compute_nodes} ({per})")
    lines.append(f"  casts          {s.casts_before} -> {s.casts_after} "
                 f"(+{s.casts_added} added, -{s.casts_removed} removed)")
    pct = (100.0 * s.param_bytes_saved / s.param_bytes_before) if s.param_bytes_before else 0.0
    lines.append(f"  parameters     {format_bytes(s.param_bytes_before)} -> "
                 f"{format_bytes(s.param_bytes_after)} "
                 f"(saved {format_bytes(s.param_bytes_saved)}, {pct:.0f}%)")
    if s.rules:
        lines.append("  decided by     " + ", ".join(f"{r} {c}" for r, c in
                                                      sorted(s.rules.items(), key=lambda kv: -kv[1])))
    for note in s.notes:
        lines.append(f"  note: {note}")
    lines += fp8_lines(diff, max_rows)

    ops = [n for n in diff.changed if n.kind != "weight"]
    lines.append("")
    lines.append(f"changed ({len(ops)} ops and casts; + added, - removed)")
    rows = [("", "node", "op", "module", "dtype", "rule", "reason")]
    for n in ops[: max_rows if max_rows is not None else None]:
        mark = {"added": "+", "removed": "-"}.get(n.change, " ")
        if n.change == "added":
            dt = f"-> {short_dtype(n.new_dtype)}"
        elif n.change == "removed":
            dt = f"{short_dtype(n.old_dtype)} ->"
        else:
            dt = f"{short_dtype(n.old_dtype)} -> {short_dtype(n.new_dtype)}"
            if n.compute_dtype and n.compute_dtype != n.new_dtype:
                dt += f" (in {short_dtype(n.compute_dtype)})"
        rows.append((mark, _cut(n.name, 28), _cut(n.op, 16), _cut(n.module or "", 28), dt,
                     n.rule or "", _row_reason(n)))
    lines.extend(_columns(rows, width))
    if max_rows is not None and len(ops) > max_rows:
        lines.append(f"  ... {len(ops) - max_rows} more (see --json or --html for every node)")

    weights = [n for n in diff.changed if n.kind == "weight"]
    if weights:
        by = collections.Counter((short_dtype(n.old_dtype), short_dtype(n.new_dtype), n.change)
                                 for n in weights)
        saved = sum((n.bytes_before or 0) - (n.bytes_after or 0) for n in weights)
        parts = [f"{c} {'copied to' if ch == 'added' else o + ' ->'} {nw}"
                 for (o, nw, ch), c in by.items()]
        lines.append("")
        lines.append(f"weights ({len(weights)} changed: {', '.join(parts)}; {format_bytes(saved)} saved)")

    kept = [n for n in diff.nodes if n.kind == "compute" and not n.changed
            and n.compute_dtype == "float32" and n.rule not in (None, "follow", "promote", "min-cut")]
    if kept:
        lines.append("")
        lines.append(f"kept in fp32 on purpose ({len(kept)})")
        rows = [("", "node", "op", "module", "rule", "reason")]
        for n in kept[: max_rows if max_rows is not None else None]:
            rows.append(("", _cut(n.name, 28), _cut(n.op, 16), _cut(n.module or "", 28),
                         n.rule or "", _cut(n.reason, 90)))
        lines.extend(_columns(rows, width))
        if max_rows is not None and len(kept) > max_rows:
            lines.append(f"  ... {len(kept) - max_rows} more")
    return "\n".join(lines) if width is None else "\n".join(_fit(line, width) for line in lines)


def _cut(text: str | None, width: int) -> str:
    text = text or ""
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _columns(rows: list[tuple], width: int | None = None) -> list[str]:
    """Aligned columns. With a width: the last column (the reason) goes on its own indented line
    under each row, and the name columns (node, module) shrink until a row fits."""
    if width is None:
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        out = []
        for row in rows:
            cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths[:-1])] + [str(row[-1])]
            out.append(("  " + " ".join(cells)).rstrip())
        return out
    head = [tuple(str(c) for c in r[:-1]) for r in rows]
    widths = [max(len(r[i]) for r in head) for i in range(len(head[0]))]
    shrinkable = [i for i, name in enumerate(head[0]) if name in ("node", "module")]
    while 2 + sum(widths) + len(widths) - 1 > width and any(widths[i] > 8 for i in shrinkable):
        i = max(shrinkable, key=lambda k: widths[k])
        widths[i] -= 1
    out = []
    for k, (row, cells) in enumerate(zip(rows, head)):
        out.append(("  " + " ".join(_cut(c, w).ljust(w) for c, w in zip(cells, widths))).rstrip())
        reason = str(row[-1]) if k else ""
        if reason:
            out += textwrap.wrap(reason, width, initial_indent="      ", subsequent_indent="      ",
                                 break_on_hyphens=False)
    return out


def _fit(line: str, width: int) -> str:
    """A summary line wrapped to `width`, continuation lines indented under its text."""
    if len(line) <= width:
        return line
    indent = " " * (len(line) - len(line.lstrip()) + 4)
    return "\n".join(textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False))
