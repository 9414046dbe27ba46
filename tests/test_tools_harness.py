"""tools/harness.py: the metric's argument order, round-robin timing, the zoo's smoke sizes, the JSON record."""
from __future__ import annotations

import json

import pytest
import torch

from tools import harness


def test_rel_l2_takes_the_reference_first():
    ref, cand = torch.ones(8), torch.full((8,), 2.0)
    assert harness.rel_l2(ref, cand) == pytest.approx(1.0)   # ||2 - 1|| / ||1||
    assert harness.rel_l2(cand, ref) == pytest.approx(0.5)   # ||1 - 2|| / ||2||


def test_rel_l2_reads_the_main_output_and_numpy():
    class Out:
        last_hidden_state = torch.ones(2, 3)

    assert harness.rel_l2(Out(), (torch.ones(2, 3), torch.zeros(1))) == 0.0
    assert harness.rel_l2(torch.ones(4), torch.ones(4).numpy() * 1.5) == pytest.approx(0.5)


def test_round_robin_times_every_row_and_turns_tf32_on_for_its_row():
    seen = {}

    def probe(name):
        def call():
            seen.setdefault(name, set()).add(torch.backends.cuda.matmul.allow_tf32)
        return call

    rows = [{"variant": "fp32 strict"}, {"variant": "tf32"}]
    rounds = []
    harness.round_robin([(rows[0], probe("fp32")), (rows[1], probe("tf32"))], device="cpu", iters=2, repeats=3,
                        on_round=rounds.append)
    assert rounds == [0, 1, 2]
    for row in rows:
        assert len(row["samples_ms"]) == 3 and row["ms"] >= 0
    assert seen == {"fp32": {False}, "tf32": {True}}
    assert torch.backends.cuda.matmul.allow_tf32 is False


@pytest.mark.parametrize("name, shape", [("llama_mlp", (2, 16, 64)), ("bert", (4, 32))])
def test_zoo_small_models_run(name, shape):
    model, args, kwargs = harness.build_model(name, small=True)
    inputs = args[0] if args else kwargs["input_ids"]
    assert tuple(inputs.shape) == shape and not model.training
    with torch.no_grad():
        assert torch.isfinite(harness.output_tensor(model(*args, **kwargs))).all()
    again = harness.build_model(name, small=True)[0]  # seeded: the same weights every time
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_write_json_records_the_run(tmp_path):
    path = tmp_path / "sub" / "out.json"
    harness.write_json(path, [{"a": 1}], device="cpu", argv=["--device", "cpu", "--small"], module="tools.bench")
    data = json.loads(path.read_text())
    assert data["rows"] == [{"a": 1}]
    run = data["run"]
    assert run["command"] == "python -m tools.bench --device cpu --small"
    assert run["torch"] == torch.__version__ and run["device"].startswith("cpu") and run["date"].endswith("UTC")
    assert not (tmp_path / "sub" / "out.json.tmp").exists()


def test_bench_zoo_jobs_merge_the_rows_of_their_processes(tmp_path):
    """`python -m tools.bench_zoo --jobs 2`: two processes under one timing lock, one merged JSON."""
    import json
    import subprocess
    import sys

    out = tmp_path / "zoo.json"
    done = subprocess.run([sys.executable, "-m", "tools.bench_zoo", "--device", "cpu", "--models", "tiny_mlp,tiny_mlp",
                           "--dtypes", "bf16", "--repeats", "1", "--warmup", "1", "--jobs", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert [r["model"] for r in record["rows"]] == ["tiny_mlp", "tiny_mlp"] and record["failures"] == []
    assert all(r["err"]["ours"] <= 1.5 * r["err"]["autocast"] + 1e-3 for r in record["rows"])
    assert "--jobs 2" in record["command"]
