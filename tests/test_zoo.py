"""A CI-sized slice of the CPU zoo (tools/zoo_cpu.py): an encoder, a decoder with its cache, an
encoder-decoder, an audio model and two vision models convert with default options and pass every
check of the zoo: run at the example shape, another batch and another length / image size, within
1.5x autocast's error (+1e-3), same output structure."""
from __future__ import annotations

import os

import pytest

from tools.zoo_cpu import run_row
from tools.zoo_specs import specs

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SUBSET = ["bert", "gpt2", "bart", "wav2vec2", "tv-mobilenet_v3_small", "hf-vit"]


@pytest.mark.parametrize("name", SUBSET)
def test_zoo_row(name):
    (spec,) = [s for s in specs() if s.name == name]
    row = run_row(spec)
    assert row["status"] == "ok", row
    for key in ("example", "other_batch"):
        assert row[key]["status"] == "ok" and row[key]["within_budget"] and row[key]["structure_equal"], row
    assert row["other_size"]["status"] in ("ok", "original rejects"), row
    if spec.family == "decoder":
        assert row["cache"] == "DynamicCache" and row["cache_returned"], row
