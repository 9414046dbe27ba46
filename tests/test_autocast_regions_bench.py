"""tools/autocast_regions_bench.py runs on the CPU at a tiny size and writes the rows the GPU run
reports: errors vs strict fp32 of autocast and ours, latencies, ratios, the regions found."""
from __future__ import annotations

import json

from tools import autocast_regions_bench


def test_bench_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    rc = autocast_regions_bench.main(["--device", "cpu", "--tiny", "--no-compile", "--models",
                                      "freqs,llama_autocast_rope", "--seqs", "64", "--batch", "2",
                                      "--dtypes", "bf16,fp16", "--warmup", "0", "--iters", "1",
                                      "--repeats", "1", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["model"], r["dtype"]) for r in rows] == [
        ("freqs", "bfloat16"), ("freqs", "float16"),
        ("llama_autocast_rope", "bfloat16"), ("llama_autocast_rope", "float16")]
    for row in rows:
        assert not row["failed"]
        assert set(row["error"]) == set(row["latency_ms"]) == {"autocast", "ours"}
        assert len(row["regions"]) == 1 and not row["regions"][0]["enabled"] and row["region_nodes"] > 0
        assert row["ours_within_1_5x"] and row["speedup_ours_vs_autocast"] > 0
