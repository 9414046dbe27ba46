"""tools/bench_generate.py at tiny size on the CPU: it runs, times every variant it can and writes JSON."""
import json

import pytest

pytest.importorskip("transformers")

from tools import bench_generate  # noqa: E402


def test_bench_generate_small_cpu(tmp_path):
    out = tmp_path / "g.json"
    code = bench_generate.main(["--device", "cpu", "--small", "--repeats", "1", "--batches", "1,2",
                                "--prompt", "6", "--new", "4", "--variants", "hf eager bf16,ours bf16",
                                "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert set(results["runs"]) == {"hf eager bf16 b1", "hf eager bf16 b2", "ours bf16 b1", "ours bf16 b2"}
    for row in results["runs"].values():
        assert row["ttft_ms"] > 0 and row["decode_tokens_per_s"] > 0
    # same bf16 model, same greedy decisions: our tokens are hf eager's on a random model
    assert results["runs"]["ours bf16 b1"]["same_tokens_as_hf_eager"] >= 0.75
    note = results["notes"]["ours bf16"]
    assert note["converted_bytes"] <= 1.05 * results["model_bytes"]
    assert note["generation"]["cache_updates_in_place"]["decode"] == note["generation"]["cache_updates_in_place"][
        "expected"]


def test_bench_generate_rejects_unknown_variant(capsys):
    assert bench_generate.main(["--device", "cpu", "--small", "--variants", "nope"]) == 2
    assert "unknown variants" in capsys.readouterr().err
