"""rewriter.diff and rewriter.save/load: entries, summary, reasons, renderings, round trips."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn as nn

import fixtures_models as fm
import rewriter
from rewriter import meta
from rewriter.errors import InputError


@pytest.fixture(scope="module")
def mlp():
    model = fm.tiny_mlp()
    gm = rewriter.convert(model, (torch.randn(*fm.MLP_SHAPE),), precision="fp16")
    return model, gm


@pytest.fixture(scope="module")
def mlp_diff(mlp):
    model, gm = mlp
    return rewriter.diff(model, gm)


class _CastAndBatchNorm(nn.Module):
    """A user cast the conversion makes redundant, and a batch norm folded into its convolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(y).half()


def _key(n):
    return (n.kind, n.op, n.module, n.old_dtype, n.new_dtype, n.change, n.rule, n.reason)


def test_entries_cover_the_graph_in_order(mlp, mlp_diff):
    _, gm = mlp
    shown = [n.name for n in mlp_diff.nodes if n.index >= 0]
    graph = [n.name for n in gm.graph.nodes if n.name in set(shown)]
    assert shown == graph
    kinds = {n.kind for n in mlp_diff.nodes}
    assert {"input", "weight", "compute", "cast", "output"} <= kinds


def test_changed_nodes_have_dtypes_rules_and_reasons(mlp, mlp_diff):
    _, gm = mlp
    changed = {n.name: n for n in mlp_diff.changed}
    linear = [n for n in mlp_diff.nodes if n.op == "linear"]
    assert len(linear) == 2
    for n in linear:
        assert n.name in changed and (n.old_dtype, n.new_dtype) == ("float32", "float16")
        assert n.rule == "op-table" and "tensor-core" in n.reason
    casts = [n for n in mlp_diff.changed if n.kind == "cast"]
    created = [n for n in gm.graph.nodes if meta.CREATED in n.meta and n.op == "call_function"]
    assert len(casts) == len(created) == mlp_diff.summary.casts_added
    assert all(n.change == "added" and n.old_dtype is None and n.rule == "insert_casts" for n in casts)
    reads = {n.name: n for n in mlp_diff.nodes}
    assert any(reads[c].name in n.casts_added for n in linear for c in reads if reads[c].kind == "cast")
    assert all(n.reason for n in mlp_diff.changed)


def test_kept_fp32_nodes_say_why(mlp_diff):
    norm = next(n for n in mlp_diff.nodes if n.op == "layer_norm")
    assert norm.change == "none" and norm.compute_dtype == "float32"
    assert norm.rule == "op-table" and "numerically sensitive" in norm.reason
    assert "kept in fp32 on purpose (2)" in mlp_diff.to_text()


def test_summary_counts_and_bytes(mlp, mlp_diff):
    model, gm = mlp
    s = mlp_diff.summary
    assert s.model == "TinyMLP" and s.precision == "fp16"
    assert s.precision_before == {"float32": 5}
    assert s.precision_after == {"float16": 3, "float32": 2}
    params = sum(p.numel() for p in model.parameters())
    assert s.param_bytes_before == 4 * params
    assert s.param_bytes_after == 2 * (params - 64) + 4 * 64   # layer norm weight+bias stay fp32
    assert s.param_bytes_saved == s.param_bytes_before - s.param_bytes_after
    assert s.casts_before == 0 and s.casts_removed == 0 and s.casts_after == s.casts_added


def test_json_lists_each_changed_node_once_with_its_reason(mlp_diff):
    data = json.loads(mlp_diff.to_json())
    assert data["format"] == "rewriter.diff/1"
    names = [n["name"] for n in data["nodes"]]
    assert len(names) == len(set(names)) == len(mlp_diff.changed) == data["summary"]["changed_nodes"]
    assert all(n["reason"] and n["change"] in ("added", "dtype", "removed", "rewritten")
               for n in data["nodes"])
    every = json.loads(mlp_diff.to_json(all_nodes=True))["nodes"]
    assert len(every) == len(mlp_diff.nodes) and all("inputs" in n for n in every)


def test_text_is_compact_and_truncates(mlp_diff):
    text = mlp_diff.to_text()
    assert text.splitlines()[0].startswith("rewriter diff: TinyMLP -> fp16")
    assert "parameters" in text and "saved" in text and "casts" in text
    short = mlp_diff.to_text(max_rows=2)
    assert "... 5 more" in short
    assert str(mlp_diff) == text


def test_removed_cast_and_folded_batch_norm_are_listed_with_reasons():
    model = _CastAndBatchNorm().eval()
    gm = rewriter.convert(model, (torch.randn(2, 3, 8, 8),), precision="fp16")
    d = rewriter.diff(model, gm)
    removed = [n for n in d.nodes if n.change == "removed"]
    casts = [n for n in removed if n.kind == "cast"]
    assert len(casts) == 1 and casts[0].rule == "fold_casts" and casts[0].old_dtype == "float16"
    assert d.summary.casts_removed == 1 and d.summary.casts_before == 1
    assert all(n.reason for n in removed)
    faster = rewriter.diff(model, gm, capture_before=False)
    assert not [n for n in faster.nodes if n.change == "removed"]


def test_diff_between_two_conversions(mlp):
    model, gm16 = mlp
    gm_bf16 = rewriter.convert(model, (torch.randn(*fm.MLP_SHAPE),), precision="bf16")
    d = rewriter.diff(gm16, gm_bf16)
    linear = [n for n in d.nodes if n.op == "linear"]
    assert all((n.old_dtype, n.new_dtype, n.change) == ("float16", "bfloat16", "dtype") for n in linear)
    # casts back to fp32 are the same; the two casts into fp16 became casts into bf16
    assert d.summary.casts_added == d.summary.casts_removed == 2
    assert d.summary.casts_before == d.summary.casts_after == 4
    assert {n.old_dtype for n in d.nodes if n.change == "removed"} == {"float16"}


def test_after_must_be_converted(mlp):
    model, _ = mlp
    with pytest.raises(InputError, match="not a converted model"):
        rewriter.diff(model, model)


def test_html_is_self_contained(mlp_diff):
    page = mlp_diff.to_html()
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert "<script src" not in page
    assert page.count("<tr id=\"row-") == len(mlp_diff.nodes)
    data = json.loads(re.search(r'<script type="application/json" id="graph-data">(.*?)</script>',
                                page, re.S).group(1))
    assert [n["n"] for n in data["nodes"]] == [n.name for n in mlp_diff.nodes]
    casts = [n for n in data["nodes"] if n["k"] == "cast" and n["ch"] != "removed"]
    assert len(casts) == mlp_diff.summary.casts_after
    rows = re.findall(r'<tr id="row-[^"]*" class="\w+ (\w+)"', page)
    assert rows.index("weight") > max(i for i, k in enumerate(rows) if k in ("compute", "cast"))  # ops first


# ---------------------------------------------------------------------- save / load


def test_save_load_keeps_annotations_record_and_diff(mlp, mlp_diff, tmp_path):
    model, gm = mlp
    before = {n.name: dict(n.meta) for n in gm.graph.nodes}
    path = rewriter.save(gm, tmp_path / "mlp.pt2")
    assert {n.name: dict(n.meta) for n in gm.graph.nodes}.keys() == before.keys()
    assert all("custom" not in n.meta and meta.ORIGIN not in n.meta for n in gm.graph.nodes
               if "custom" not in before[n.name])
    loaded = rewriter.load(path)
    assert loaded.meta["rewriter"]["config"] == gm.meta["rewriter"]["config"]
    assert loaded.meta["rewriter"]["model"] == "TinyMLP"
    again = rewriter.diff(model, loaded)
    assert sorted(map(_key, again.changed), key=str) == sorted(map(_key, mlp_diff.changed), key=str)
    assert again.summary.precision_after == mlp_diff.summary.precision_after
    assert again.summary.param_bytes_after == mlp_diff.summary.param_bytes_after
    x = torch.randn(7, 16)
    assert torch.equal(loaded(x), gm(x))


def test_save_load_keeps_getitem_annotations(tmp_path):
    model = fm.tiny_transformer()
    gm = rewriter.convert(model, (torch.randn(*fm.TRANSFORMER_SHAPE),), precision="bf16")
    loaded = rewriter.load(rewriter.save(gm, tmp_path / "tt.pt2"))
    getitems = [n for n in loaded.graph.nodes if n.op == "call_function" and "getitem" in n.name]
    assert getitems
    for n in getitems:
        assert meta.get(n, meta.ORIGIN)["name"].startswith("getitem")
        assert meta.get(n, meta.DECISION)["reason"].startswith("element of split")


def test_save_refuses_to_overwrite_and_leaves_no_temp_files(mlp, tmp_path):
    _, gm = mlp
    path = tmp_path / "m.pt2"
    path.write_bytes(b"keep me")
    with pytest.raises(InputError, match="already exists"):
        rewriter.save(gm, path)
    assert path.read_bytes() == b"keep me"
    rewriter.save(gm, path, force=True)
    assert rewriter.load(path).meta["rewriter"]["config"]["precision"] == "fp16"
    with pytest.raises(InputError, match=r"\*\.pt2"):
        rewriter.save(gm, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        rewriter.load(tmp_path / "missing.pt2")
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match="could not read"):
        rewriter.load(bad)
    pickled = tmp_path / "m.pt"
    torch.save(fm.tiny_mlp(), pickled)
    with pytest.raises(InputError, match="pickle") as err:
        rewriter.load(pickled)
    assert "trust_pickle" in str(err.value) and "torch.export.save" in str(err.value)
    assert isinstance(rewriter.load(pickled, trust_pickle=True), fm.TinyMLP)
    state = tmp_path / "sd.pth"
    torch.save(fm.tiny_mlp().state_dict(), state)
    with pytest.raises(InputError, match="state_dict"):
        rewriter.load(state, trust_pickle=True)


def test_loaded_program_allows_eval_but_not_train(mlp, tmp_path):
    _, gm = mlp
    loaded = rewriter.load(rewriter.save(gm, tmp_path / "m.pt2"))
    assert loaded.eval() is loaded and not loaded.training
    with pytest.raises(InputError, match="exported program"):
        loaded.train()
