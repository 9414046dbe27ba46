"""tools/bench_gemm_fp8.py: the CPU smoke run writes every shape, variant and cost-model prediction."""
import json
import math

import pytest



@pytest.fixture(scope="module")
def bench():
    from tools import bench_gemm_fp8

    return bench_gemm_fp8


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_cpu_smoke_run_reports_every_shape_variant_and_prediction(bench, tmp_path, capsys):
    out = tmp_path / "gemm_fp8.json"
    assert bench.main(["--device", "cpu", "--small", "--no-compile", "--out", str(out)]) == 0
    data = json.loads(out.read_text())

    expected = {(s["m"], s["k"], s["n"]) for s in bench.shape_list(None, None, small=True)}
    got = {(s["m"], s["k"], s["n"]) for s in data["shapes"]}
    assert got == expected and len(data["shapes"]) == len(expected) == 12
    for s in data["shapes"]:  # every default GEMM is still divisible by 16 after --small
        assert s["k"] % 16 == 0 and s["n"] % 16 == 0

    names = bench.variant_names()
    assert data["info"]["variants"] == names
    for shape in data["shapes"]:
        assert set(shape["variants"]) == set(names), shape["label"]
        for name, row in shape["variants"].items():
            has_ms = _number(row.get("ms"))
            has_na = isinstance(row.get("na"), str) and row["na"].startswith("n/a")
            assert has_ms != has_na, (shape["label"], name, row)
        # the eager variants ran (FP8 through the project's emulation); the compiled ones were skipped
        for name in bench.EAGER_VARIANTS:
            row = shape["variants"][name]
            assert _number(row["ms"]) and _number(row["rel_err"]), (shape["label"], name)
        assert shape["variants"]["bf16"]["speedup_vs_bf16"] == pytest.approx(1.0)
        for name in ("fp8_gemm", "fp8_eager_dynamic", "fp8_eager_static"):
            row = shape["variants"][name]
            assert row["emulated"] and row["speedup_vs_bf16"] is None and row["speedup_na"].startswith("n/a")
            assert row["rel_err"] < 0.1  # e4m3 on both operands: a few per cent
        for name in names[len(bench.EAGER_VARIANTS):]:
            assert shape["variants"][name]["na"] == "n/a: --no-compile"

        preds = shape["predictions"]
        assert set(preds) == set(bench.MODES)
        for mode, pred in preds.items():
            assert _number(pred["estimate"]) and _number(pred["roofline"]) and pred["estimate"] > 0
            assert isinstance(pred["use_fp8"], bool) and pred["decided_by"] == "Fp8Cost pass"
            assert pred["rule"] in ("size", "cost")  # the --small shapes are far below FP8_MIN_MNK
        assert set(shape["comparison"]) >= {"eager_dynamic", "eager_static"}

    printed = capsys.readouterr().out
    assert "measured / predicted" in printed and "fp8_eager_dynamic" in printed


def test_shapes_option_and_cost_model_on_the_real_shapes(bench):
    shapes = bench.shape_list("8192,1024,4096; 8192,1024,4096;64,32,48", None, small=False)
    assert [(s["m"], s["k"], s["n"]) for s in shapes] == [(8192, 1024, 4096), (64, 32, 48)]
    with pytest.raises(SystemExit):
        bench.shape_list("8192,1024", None, small=False)
    # BERT-large FFN up (M=12288, K=1024, N=4096) on an H100: decided by the estimate (whatever the
    # constants are fitted to), and fused static quantization never costs more than eager dynamic
    preds = bench.predictions(12288, 1024, 4096, "sm_90")
    for pred in preds.values():
        assert pred["rule"] in ("cost", "fp8") and pred["use_fp8"] == (pred["rule"] == "fp8")
    assert preds["compiled_static"]["estimate"] > preds["eager_dynamic"]["estimate"]
    assert bench.predictions(12288, 1024, 4096, "sm_80")["compiled_static"]["rule"] == "hardware"
