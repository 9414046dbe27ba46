"""tools/bench_decode_gemm: the CPU smoke run writes one row per shape and batch with every variant's time,
bandwidth and error, and the kernel summary reads inductor's generated code."""
import json

import torch

from tools import bench_decode_gemm


def test_smoke_run_writes_rows_with_times_and_errors(tmp_path):
    out = tmp_path / "g.json"
    assert bench_decode_gemm.main(["--device", "cpu", "--small", "--rows", "1,2", "--shapes", "o",
                                   "--variants", "bf16 eager,fp8w eager", "--iters", "2", "--rounds", "1",
                                   "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["rows"]) for r in rows] == [("o", 1), ("o", 2)]
    for r in rows:
        bf16, fp8 = r["variants"]["bf16 eager"], r["variants"]["fp8w eager"]
        assert fp8["weight_bytes"] * 2 == bf16["weight_bytes"] == r["k"] * r["n"] * 2
        assert bf16["rel_err"] < 1e-2 and 0 < fp8["rel_err"] < 0.1  # e4m3 weights: a few percent
        assert bf16["us"] > 0 and fp8["x_bf16_eager"] > 0


def test_kernel_summary_names_the_gemm_form():
    extern = "buf1 = empty(...)\nextern_kernels.mm(arg0_1, buf0, out=buf1)\ndef triton_poi_fused_0(in_ptr0):"
    assert bench_decode_gemm.kernel_summary(extern) == {"extern_mm": True, "template": False,
                                                        "reduction": False, "fp8_gemv": False, "triton_kernels": 1}
    fused = "def triton_red_fused_mul_sum_0(in_ptr0, in_ptr1):\n    pass\n"
    assert bench_decode_gemm.kernel_summary(fused)["reduction"] is True
    assert bench_decode_gemm.kernel_summary("def triton_tem_fused_mm_0(a):")["template"] is True
    ours = "_fp8_gemv_kernel_0.run(arg0_1, arg1_1, buf0, grid=(128, 4, 1))"  # inductor launching our kernel
    assert bench_decode_gemm.kernel_summary(ours)["fp8_gemv"] is True


def test_triton_variant_reports_the_route_it_took(tmp_path):
    from rewriter.runtime import fp8_gemv

    out = tmp_path / "g.json"
    assert bench_decode_gemm.main(["--device", "cpu", "--small", "--rows", "1", "--shapes", "qkv",
                                   "--variants", "bf16 eager,fp8w triton", "--iters", "2", "--rounds", "1",
                                   "--sweep", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    entry = row["variants"]["fp8w triton"]
    assert 0 < entry["rel_err"] < 0.1 and entry["us"] > 0
    (route,) = entry["route"]  # on the CPU the op's reference path, with the reason
    assert route.startswith("reference: ") and route.endswith(fp8_gemv.gemv_skip_reason(
        torch.ones(1, 64, dtype=torch.bfloat16), torch.ones(96, 64).to(torch.float8_e4m3fn), torch.ones(96), None))
    assert "sweep" not in row  # the configuration sweep times the GEMV on CUDA only


def test_sweep_configs_start_with_the_rule_and_stay_valid():
    from rewriter.runtime.fp8_gemv import choose_config

    for rows in (1, 2, 4, 8):
        configs = bench_decode_gemm.sweep_configs(rows, 2048, 2048, 132)
        assert configs[0] == choose_config(rows, 2048, 2048, 132)
        assert len(configs) == len(set(configs)) and 6 <= len(configs) <= 12
        assert all(c.block_n >= 16 for c in configs if c.use_dot)
        assert {c.use_dot for c in configs} == ({True, False} if rows <= 4 else {True})
