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
    # memory per variant: parameter bytes everywhere, CUDA peak (None on the CPU) in the JSON and every row
    assert results["memory"]["ours bf16"]["param_bytes"] == note["converted_bytes"]
    assert results["memory"]["hf eager bf16"]["param_bytes"] == results["model_bytes"]
    assert all(m["peak_bytes"] is None for m in results["memory"].values())
    assert all("param_bytes" in row and "peak_bytes" in row for row in results["runs"].values())


def test_bench_generate_variant_options():
    fp8 = bench_generate.variant_options("ours fp8 weightonly compile+cg")
    assert fp8["backend"] == "compile+cuda_graphs" and fp8["convert"]["precision"] == "fp8"
    options = fp8["convert"]["fp8"]
    assert (options.decode_gemms, options.min_speedup, options.fused_quantization) == ("weight_only", 0.0, True)
    scaled = bench_generate.variant_options("ours fp8 scaledmm cudagraphs")["convert"]["fp8"]
    assert (scaled.decode_gemms, scaled.fused_quantization) == ("scaled_mm", False)
    assert bench_generate.variant_options("ours fp8 cudagraphs")["convert"]["fp8"].decode_gemms == "auto"
    assert "fp8" not in bench_generate.variant_options("ours bf16 kv8 cudagraphs")["convert"]
    assert set(bench_generate.DEFAULT_VARIANTS) <= set(bench_generate.VARIANTS)
    assert fp8["inductor_options"] is None
    tuned = bench_generate.variant_options("ours fp8 weightonly cdt compile+cg")
    assert tuned["convert"]["fp8"].decode_gemms == "weight_only" and tuned["backend"] == "compile+cuda_graphs"
    assert tuned["inductor_options"]["coordinate_descent_tuning"] is True


def test_bench_generate_rejects_unknown_variant(capsys):
    assert bench_generate.main(["--device", "cpu", "--small", "--variants", "nope"]) == 2
    assert "unknown variants" in capsys.readouterr().err


def test_bench_generate_skips_variants_past_its_time_budget(tmp_path):
    out = tmp_path / "g.json"
    assert bench_generate.main(["--device", "cpu", "--small", "--repeats", "1", "--batches", "1", "--prompt", "4",
                                "--new", "2", "--variants", "hf eager bf16,ours bf16", "--budget-s", "0",
                                "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["runs"] == {}
    assert all("time budget" in results["notes"][n] for n in ("hf eager bf16", "ours bf16"))


def test_bench_generate_reports_the_weight_only_kernel(tmp_path, capsys):
    out = tmp_path / "g.json"
    assert bench_generate.main(["--device", "cpu", "--small", "--repeats", "1", "--batches", "1",
                                "--prompt", "6", "--new", "3", "--variants", "ours fp8 weightonly",
                                "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    routes = results["notes"]["ours fp8 weightonly"]["fp8_weight_linear_routes"]
    # on the CPU every weight-only decode GEMM runs the reference, and the run says so with the reason
    assert routes and all(route.startswith("reference: ") for route in routes)
    planned = results["notes"]["ours fp8 weightonly"]["weight_only_kernels"]
    assert list(planned) == ["reference"] and planned["reference"] >= 1  # what the plan expected on the CPU
    assert "ours fp8 weightonly: rewriter::fp8_weight_linear ran reference: " in capsys.readouterr().err
    assert results["runs"]["ours fp8 weightonly b1"]["decode_tokens_per_s"] > 0
