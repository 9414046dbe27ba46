"""tools/bench_ort_gemm.py: the GEMM chains it times are valid ONNX and compute the same products in each
form (same float8 weights), so its per-GEMM times compare like with like."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tools.bench_ort_gemm import VARIANTS, build_chain, main


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0].astype(np.float64)


def test_chains_compute_the_same_products():
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0)).numpy()
    out = {}
    for variant in ("matmul-fp16", "qdq-fp32", "qdq-fp16"):
        model = build_chain(variant, 16, 32, 2)
        onnx.checker.check_model(model, full_check=True)
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("MatMul" if variant == "matmul-fp16" else "Gemm") == 2
        out[variant] = _run(model, x.astype(np.float16) if variant == "matmul-fp16" else x)
    ref = out["qdq-fp32"]
    # the fp16 form: same float8 values, fp16 scales and products (relative 2^-11 each)
    assert np.linalg.norm(out["qdq-fp16"] - ref) / np.linalg.norm(ref) < 5e-3
    # fp16 MatMul on the unquantized activations: off by the activations' float8 rounding only
    assert np.linalg.norm(out["matmul-fp16"] - ref) / np.linalg.norm(ref) < 0.1
    g8 = build_chain("gemmfloat8", 16, 32, 2)
    gemms = [n for n in g8.graph.node if n.op_type == "GemmFloat8"]
    assert len(gemms) == 2 and all(n.domain == "com.microsoft" and len(n.input) == 5 for n in gemms)


def test_cpu_smoke_reports_every_variant(tmp_path, capsys):
    out = tmp_path / "g.json"
    assert main(["--device", "cpu", "--rows", "16", "--dim", "32", "--layers", "2", "--iters", "2",
                 "--repeats", "1", "--warmup", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["variants"]
    assert set(rows) == set(VARIANTS)
    assert all(rows[v]["ms"] is not None for v in ("matmul-fp16", "qdq-fp32", "qdq-fp16"))
    assert rows["gemmfloat8"]["ms"] is None and "GemmFloat8" in rows["gemmfloat8"]["note"]  # CUDA EP only


if __name__ == "__main__":
    pytest.main([__file__])
