"""tools/bench_budget_curve on the CPU at tiny size: one JSON row per budget with its error and latency,
the tolerances are the stated multiples of autocast's calibration error, and a loose budget lowers
nodes that the default policy keeps fp32."""
from __future__ import annotations

import json
import math

from tools import bench_budget_curve


def test_one_row_per_budget_with_error_and_latency(tmp_path, capsys):
    out = tmp_path / "curve.json"
    code = bench_budget_curve.main(["--device", "cpu", "--tiny", "--models", "llama6", "--budgets", "none,4x",
                                    "--compiler", "eager", "--warmup", "0", "--repeats", "1", "--iters", "1",
                                    "--out", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    assert record["failures"] == [] and record["run"]["command"].startswith("python -m tools.bench_budget_curve")
    rows = {r["budget"]: r for r in record["rows"]}
    assert list(rows) == ["none", "4x"] and all(r["model"] == "llama6" for r in rows.values())
    for row in rows.values():
        assert row["ms"] > 0 and 0 < row["err"] < 0.05 and math.isfinite(row["x_compile_blanket"])
    assert rows["none"]["tolerance"] is None and rows["none"]["lowered"] == 0
    assert math.isclose(rows["4x"]["tolerance"], 4 * rows["4x"]["autocast_calib_err"])
    assert rows["4x"]["lowered"] > 0 and rows["4x"]["err"] <= rows["4x"]["tolerance"]
    assert {r["variant"] for r in record["references"]} == {"autocast+compile", "compile(model.to)"}
    assert all(r["ms"] > 0 and r["err"] > 0 for r in record["references"])
    table = capsys.readouterr().out
    assert "ours@4x" in table and "compile(model.to)" in table
