"""`rewrite diff BEFORE AFTER`: what a conversion changed, node by node, within the terminal's width.

AFTER may also be a factory spec returning a GenerativeLM (rewriter.convert(lm, ..., generate=True),
which is not saved as a .pt2): then both its graphs are shown, decode and prefill."""
from __future__ import annotations

import sys
from pathlib import Path

from rewriter.cli.loading import load_model
from rewriter.cli.outputs import check_outputs, staged
from rewriter.cli.ui import Ui

__all__ = ["run"]


def run(args, ui: Ui) -> int:
    from rewriter.diff import diff
    from rewriter.errors import InputError
    from rewriter.files import writing
    from rewriter.meta import is_generative
    from rewriter.pipeline import is_converted

    html_path = Path(args.html) if args.html else None
    json_path = Path(args.json) if args.json else None
    check_outputs([args.before, args.after], [(html_path, "--html file"), (json_path, "--json file")], args.force)
    with ui.step(f"loading {args.before} and {args.after}"):
        before = load_model(args.before, trust_pickle=args.trust_pickle).model
        after = load_model(args.after, trust_pickle=args.trust_pickle).model
        if not (is_converted(after) or is_generative(after)):  # a GenerativeLM comes from a factory spec
            raise InputError(f"AFTER {args.after!r} is not a converted model (it carries no rewriter "
                             "annotations); give the .pt2 written by `rewrite convert` as the second file, or "
                             "a factory spec (package.module:function) returning rewriter.convert(...)")
    with ui.step("comparing (captures BEFORE to find removed casts)"):
        d = diff(before, after)
        html = d.to_html() if html_path else None
        text_json = d.to_json() if json_path else None
    if html_path or json_path:
        with ui.step("writing " + " and ".join(str(p) for p in (html_path, json_path) if p)):
            with staged(html_path, args.force, "--html file") as tmp_html, \
                    staged(json_path, args.force, "--json file") as tmp_json:
                for tmp, text in ((tmp_html, html), (tmp_json, text_json)):
                    if tmp is not None:
                        with writing(tmp):  # a disk-full error names the file it happened to
                            tmp.write_text(text, encoding="utf-8")
    sys.stdout.write(d.to_text(max_rows=None if args.all else 60, width=ui.width) + "\n")
    sys.stdout.flush()
    return 0
