"""Under precision="fp8" the text and HTML diffs say which GEMMs run in FP8 and, for every GEMM that
stayed bf16, why (plan/fp8_cost's node.meta[FP8] record); the summary counts them by rule.

TinyTransformer (dim 32) at the example's 16 rows: its 8 weight linears are far below the FP8 size
threshold (rule "size"), its 4 attention matmuls multiply two activations (rule "op") and the head's
N=10 is not a multiple of 16 (rule "dims"): 0 of 13 GEMMs in FP8.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

import fixtures_models as fm
import rewriter
from rewriter.fp8_options import Fp8Options


@pytest.fixture(scope="module")
def fp8_diff():
    model = fm.tiny_transformer()
    gm = rewriter.convert(model, (torch.randn(*fm.TRANSFORMER_SHAPE),), precision="fp8")
    return rewriter.diff(model, gm, capture_before=False)


def test_summary_counts_fp8_gemms_by_rule(fp8_diff):
    s = fp8_diff.summary
    assert (s.fp8_gemms, s.fp8_judged) == (0, 13)
    assert s.fp8_kept == {"size": 8, "op": 4, "dims": 1}
    assert json.loads(fp8_diff.to_json())["summary"]["fp8_kept"] == {"size": 8, "op": 4, "dims": 1}


def test_text_says_why_each_gemm_stayed_bf16_in_80_columns(fp8_diff):
    text = fp8_diff.to_text(width=80, max_rows=None)
    assert max(len(line) for line in text.splitlines()) <= 80
    flat = " ".join(text.split())
    assert "FP8 GEMMs 0 of 13; 13 kept bf16: small GEMM 8, not a weight GEMM (attention, bmm, conv) 4, " \
           "K/N not multiple of 16 1" in flat
    assert "kept bf16 instead of FP8 (13)" in text
    section = flat[flat.index("kept bf16 instead of FP8"):flat.index("changed (")]
    assert "size small GEMM (8): linear, linear_1" in section and "M*N*K = " in section
    assert "dims K/N not multiple of 16 (1): linear_8" in section and "N=10 not a multiple of 16" in section
    row = flat[flat.index(" linear_8 "):]
    assert row.index("not FP8 (dims): kept bf16: N=10") < row.index("mean")  # on the GEMM's own row


def test_text_of_a_non_fp8_conversion_has_no_fp8_lines():
    model = fm.tiny_transformer()
    gm = rewriter.convert(model, (torch.randn(*fm.TRANSFORMER_SHAPE),), precision="bf16")
    d = rewriter.diff(model, gm, capture_before=False)
    assert d.summary.fp8_judged is None and "FP8" not in d.to_text()


def test_fp8_gemms_that_run_in_fp8_are_counted():
    model = fm.tiny_mlp()
    gm = rewriter.convert(model, (torch.randn(*fm.MLP_SHAPE),), precision="fp8", fp8=Fp8Options.always())
    d = rewriter.diff(model, gm, capture_before=False)
    used = [n for n in d.nodes if n.fp8 and n.fp8.get("use")]
    assert used and d.summary.fp8_gemms == len(used) <= d.summary.fp8_judged
    assert f"FP8 GEMMs      {len(used)} of {d.summary.fp8_judged}" in d.to_text()


def test_html_carries_fp8_records_and_the_fp8_card(fp8_diff):
    page = fp8_diff.to_html()
    card = re.search(r'<div class="card" id="fp8card">(.*?)</div>', page, re.S).group(1)
    assert "<b>0</b> of 13" in card and "small GEMM: <b>8</b>" in card
    data = json.loads(re.search(r'id="graph-data">(.*?)</script>', page, re.S).group(1))
    head = next(n for n in data["nodes"] if n["n"] == "linear_8")
    assert head["f8"]["rule"] == "dims" and head["m"] == "head" and head["sh"] == "2x8x10"
    row = re.search(r'<tr id="row-linear_8".*?</tr>', page, re.S).group(0)
    assert "not FP8 (dims)" in row
