"""The picture of an adaptive-precision timeline (rewriter/adaptive.py): one row per layer, one colour per
precision along the steps, a marker and a label at each switch. PNG through matplotlib when it is
installed and asked for, else a small self-written SVG (no dependency). Written atomically (a temporary file
beside the target, then renamed).
"""
from __future__ import annotations

import html
import os

from rewriter.files import atomic_write

__all__ = ["write_picture", "picture_path", "timeline_svg"]

COLOURS = {"fp8": "#4c9f70", "fp16": "#3b7dd8", "bf16": "#e0a030", "fp32": "#c0392b"}


def _legend(timeline: dict) -> list[str]:
    """The precisions this timeline can hold: its low precision (fp8 or fp16), bf16, fp32."""
    return [timeline.get("kind", "fp8"), "bf16", "fp32"]


def timeline_svg(timeline: dict, width: int = 900) -> str:
    """SVG text of `timeline` (AdaptivePrecision.timeline())."""
    layers, steps = timeline["layers"], max(int(timeline["steps"]), 1)
    left, top, row_h = 160, 40, 28
    plot_w = width - left - 20
    height = top + row_h * len(layers) + 60
    x = lambda s: left + plot_w * s / steps  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<text x="{left}" y="20" font-size="14">per-layer precision over {steps} steps '
           f'({timeline.get("kind", "fp8").upper()} share of GEMM FLOPs '
           f'{timeline.get("low_flop_fraction", timeline.get("fp8_flop_fraction", 1.0)):.1%})</text>']
    for r, name in enumerate(layers):
        y = top + r * row_h
        out.append(f'<text x="{left - 6}" y="{y + 17}" text-anchor="end">{html.escape(name)}</text>')
        for seg in timeline["segments"].get(name, []):
            out.append(f'<rect x="{x(seg["start"]):.1f}" y="{y + 4}" width="{x(seg["end"]) - x(seg["start"]):.1f}" '
                       f'height="{row_h - 8}" fill="{COLOURS[seg["precision"]]}"/>')
        for ev in timeline["events"]:
            if ev["layer"] == name:
                title = html.escape(f'step {ev["step"]}: {ev["from"]} -> {ev["to"]}: {ev["reason"]}')
                out.append(f'<line x1="{x(ev["step"]):.1f}" x2="{x(ev["step"]):.1f}" y1="{y}" y2="{y + row_h}" '
                           f'stroke="black" stroke-width="2"><title>{title}</title></line>'
                           f'<text x="{x(ev["step"]) + 3:.1f}" y="{y + 17}" font-size="10">'
                           f'{ev["step"]}: {ev["to"]}<title>{title}</title></text>')
    y = top + row_h * len(layers) + 20
    for k, p in enumerate(_legend(timeline)):
        c = COLOURS[p]
        out.append(f'<rect x="{left + 90 * k}" y="{y}" width="14" height="14" fill="{c}"/>'
                   f'<text x="{left + 90 * k + 18}" y="{y + 12}">{p}</text>')
    out.append(f'<text x="{left}" y="{y + 34}">steps 0 .. {steps}; black lines: switches (hover for the '
               'reason)</text></svg>')
    return "\n".join(out) + "\n"


def picture_path(path: str) -> str:
    """The file `write_picture(..., path)` writes: `path`, or its .svg sibling for a .png without matplotlib."""
    root, ext = os.path.splitext(path)
    if ext.lower() == ".png":
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return root + ".svg"
    return path


def write_picture(timeline: dict, path: str) -> str:
    """Write `timeline` to `path` (.png with matplotlib when available, else .svg), atomically, replacing an
    existing file. Returns the path written."""
    root, ext = os.path.splitext(path)
    if ext.lower() == ".png":
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            path = root + ".svg"
        else:
            layers = timeline["layers"]
            fig, ax = plt.subplots(figsize=(9, 0.5 * len(layers) + 1.5))
            for r, name in enumerate(layers):
                for seg in timeline["segments"].get(name, []):
                    ax.barh(r, seg["end"] - seg["start"], left=seg["start"], color=COLOURS[seg["precision"]])
            for ev in timeline["events"]:
                ax.axvline(ev["step"], color="black", lw=0.8)
            ax.set_yticks(range(len(layers)), layers)
            ax.set_xlabel("step")
            fig.tight_layout()
            with atomic_write(path, force=True, what="picture") as tmp:
                fig.savefig(tmp, format="png")
            plt.close(fig)
            return path
    with atomic_write(path, force=True, what="picture") as tmp:
        tmp.write_text(timeline_svg(timeline), encoding="utf-8")
    return path
