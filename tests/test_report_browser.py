"""The HTML report in a real headless browser (Debian's chromium): a ~1,000-node graph loads without
console errors, and the picture and the table are there.

The page marks itself when its script has run (`<body data-ready="1" data-graph-nodes=...
data-table-rows=...>`) and records uncaught errors in `data-js-errors`; chromium prints every
console message of the page on stderr as `...:CONSOLE...` lines, and the page itself logs nothing,
so any such line is a failure. Skipped, with the reason, only when no chromium is installed
(.ci/run installs it: apt-get install -y chromium).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch

import fixtures_models as fm
import rewriter


def _chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                "(apt-get install -y chromium); the HTML report is not browser-tested")


@pytest.fixture(scope="module")
def big_report(tmp_path_factory):
    model = fm.deep_transformer()
    gm = rewriter.convert(model, (torch.randn(*fm.TRANSFORMER_SHAPE),), precision="fp16")
    diff = rewriter.diff(model, gm, capture_before=False)  # removed nodes are not what this tests
    path = tmp_path_factory.mktemp("report") / "deep.html"
    path.write_text(diff.to_html(), encoding="utf-8")
    return diff, path


def _dump_dom(path, profile, fragment: str = "") -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=10000", "--dump-dom", path.as_uri() + fragment]
    return subprocess.run([CHROMIUM, *flags], capture_output=True, text=True, timeout=180)


def test_report_of_a_1000_node_graph_loads_cleanly(big_report, tmp_path):
    diff, path = big_report
    assert len(diff.nodes) >= 900, len(diff.nodes)
    proc = _dump_dom(path, tmp_path / "profile")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(0)))
    assert attrs.get("data-ready") == "1", attrs
    assert "data-js-errors" not in attrs, attrs
    drawn = int(attrs["data-graph-nodes"])
    assert drawn >= 700, drawn                                    # weights are table-only
    assert int(attrs["data-table-rows"]) == len(diff.nodes)
    assert '<svg id="graph"' in dom and '<table id="nodes"' in dom
    assert dom.count('class="node cast"') == diff.summary.casts_after >= 50
    assert re.search(r'<span id="count"[^>]*>\d+ of \d+ nodes</span>', dom)   # the script filled it


def test_report_sorts_filters_and_selects_in_the_browser(big_report, tmp_path):
    _, path = big_report
    proc = _dump_dom(path, tmp_path / "profile", "#selftest")
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body[^>]*>", proc.stdout).group(0)
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body))
    assert attrs.get("data-selftest") == "ok", attrs
    assert [line for line in proc.stderr.splitlines() if ":CONSOLE" in line] == []
