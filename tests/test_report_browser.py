"""The HTML report in a real headless browser (Debian's chromium): a ~1,000-node graph loads without
console errors and starts collapsed at the layer level; collapse, expand, search, the side panel and the
before/after toggle work (the page's own `#selftest`); a 5,000-node graph, fully expanded, renders in
under 3 s (measured in the page with performance.now(): `#perf` writes data-render-ms and
data-render-ok, which the test reads: the 3 s check is the page's, the test asserts its flag).

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
from rewriter.diff import Diff, NodeDiff, Summary


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


def _body(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    body = re.search(r"<body[^>]*>", proc.stdout)
    assert body, proc.stdout[:500]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(0)))
    assert attrs.get("data-ready") == "1", attrs
    assert "data-js-errors" not in attrs, attrs
    return attrs


def test_report_of_a_1000_node_graph_loads_collapsed_by_layer(big_report, tmp_path):
    diff, path = big_report
    assert len(diff.nodes) >= 900, len(diff.nodes)
    proc = _dump_dom(path, tmp_path / "profile")
    attrs = _body(proc)
    assert int(attrs["data-graph-groups"]) == 24                   # blocks.0 .. blocks.23, one box each
    assert int(attrs["data-graph-nodes"]) < 20                     # input, final norm, head, output, casts
    assert int(attrs["data-table-rows"]) == len(diff.nodes)
    dom = proc.stdout
    assert '<svg id="graph"' in dom and '<table id="nodes"' in dom
    assert len(re.findall(r'<g class="grp" data-key="g:blocks\.\d+"', dom)) == 24
    assert re.search(r'<span id="count"[^>]*>\d+ of \d+ nodes</span>', dom)   # the script filled it
    assert re.search(r'class="e" d="M', dom) and ' fp32</text>' in dom      # edges, with shape and dtype


def test_report_collapse_expand_search_select_toggle_in_the_browser(big_report, tmp_path):
    _, path = big_report
    attrs = _body(_dump_dom(path, tmp_path / "profile", "#selftest"))
    assert attrs.get("data-selftest") == "ok", attrs


def test_report_link_to_a_node_shows_its_fp8_decision(tmp_path):
    model = fm.tiny_transformer()
    gm = rewriter.convert(model, (torch.randn(*fm.TRANSFORMER_SHAPE),), precision="fp8")
    path = tmp_path / "fp8.html"
    path.write_text(rewriter.diff(model, gm, capture_before=False).to_html(), encoding="utf-8")
    proc = _dump_dom(path, tmp_path / "profile", "#node=linear_1")
    _body(proc)
    panel = re.search(r'<aside id="panel">(.*?)</aside>', proc.stdout, re.S).group(1)
    assert "linear_1" in panel and "not FP8" in panel and "M*N*K" in panel and "blocks.0.proj" in panel
    assert re.search(r'class="node[^"]* sel"[^>]*data-name="linear_1"', proc.stdout)


def test_a_5000_node_graph_renders_in_under_3_s(tmp_path):
    diff = synthetic_diff(layers=50, ops_per_layer=100)
    assert len(diff.nodes) >= 5000
    path = tmp_path / "big.html"
    path.write_text(diff.to_html(), encoding="utf-8")
    attrs = _body(_dump_dom(path, tmp_path / "profile", "#perf"))
    print(f"5,000-node graph: rendered in {attrs['data-render-ms']} ms (page's own measure), "
          f"initial collapsed view {attrs['data-initial-ms']} ms")
    assert int(attrs["data-items"]) >= 5000 and int(attrs["data-graph-nodes"]) >= 5000
    assert attrs["data-render-ok"] == "1", attrs


def synthetic_diff(layers: int, ops_per_layer: int) -> Diff:
    """A converted-looking graph of layers x ops: chains with a residual edge, every 10th op a cast."""
    nodes = [NodeDiff(index=0, name="x", op="input", kind="input", module=None, old_dtype="float32",
                      new_dtype="float32", compute_dtype=None, change="none", rule=None, reason=None,
                      shape="8x128x768")]
    prev = "x"
    for layer in range(layers):
        start = prev
        for k in range(ops_per_layer):
            name = f"op_{layer}_{k}"
            cast = k % 10 == 9
            dtype = "float32" if k % 7 == 3 else "bfloat16"
            inputs = (prev, start) if k == ops_per_layer - 1 else (prev,)
            nodes.append(NodeDiff(
                index=len(nodes), name=name, op="cast" if cast else ("linear" if k % 3 == 0 else "add"),
                kind="cast" if cast else "compute", module=f"layers.{layer}.sub{k // 25}",
                old_dtype=None if cast else "float32", new_dtype=dtype, compute_dtype=dtype,
                change="added" if cast else "dtype", rule="insert_casts" if cast else "op-table",
                reason="synthetic", inputs=inputs, shape="8x128x768"))
            prev = name
    nodes.append(NodeDiff(index=len(nodes), name="output", op="output", kind="output", module=None,
                          old_dtype=None, new_dtype=None, compute_dtype=None, change="none", rule=None,
                          reason="model outputs", inputs=(prev,)))
    counts = {"bfloat16": sum(1 for n in nodes if n.compute_dtype == "bfloat16")}
    summary = Summary(model="Synthetic", precision="bf16", capture=None, dynamic_batch=None,
                      nodes=len(nodes), compute_nodes=len(nodes), precision_before={"float32": len(nodes)},
                      precision_after=counts, casts_before=0, casts_after=0, casts_added=0, casts_removed=0,
                      changed_nodes=len(nodes), param_bytes_before=0, param_bytes_after=0, rules={},
                      kept_fp32=0)
    return Diff(summary, nodes)
