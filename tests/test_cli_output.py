"""What `rewrite` prints: within 80 columns (diff text, bench table, convert summary), --version,
--quiet/--verbose, `python -m rewriter`, and the demo's rows named for what they run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fixtures_models as fm
from rewriter.cli import main

ROOT = Path(__file__).resolve().parents[1]
MLP = "fixtures_models:tiny_mlp"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_output")
    fp32 = folder / "a_rather_long_file_name_for_the_original_transformer_model.pt2"
    torch.export.save(torch.export.export(fm.tiny_transformer(), (torch.randn(*fm.TRANSFORMER_SHAPE),)),
                      str(fp32))
    converted = folder / "converted.pt2"
    assert main(["-q", "convert", str(fp32), "-o", str(converted)]) == 0
    return fp32, converted


@pytest.fixture
def columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")


def _too_long(text: str, width: int = 80) -> list[str]:
    return [line for line in text.splitlines() if len(line) > width]


def test_diff_text_fits_80_columns_and_keeps_every_reason(saved, columns, capsys):
    import rewriter

    fp32, converted = saved
    assert main(["diff", str(fp32), str(converted), "--all"]) == 0
    out = capsys.readouterr().out
    assert _too_long(out) == [], _too_long(out)
    d = rewriter.diff(rewriter.load(fp32), rewriter.load(converted))
    wide = d.to_text(max_rows=None)
    assert _too_long(wide), "the fixture no longer has long lines: this test tests nothing"
    flat = " ".join(out.split())
    for n in d.changed:
        if n.kind != "weight" and n.reason:
            assert " ".join(n.reason[:40].split()) in flat, n.reason  # reasons wrapped, not dropped


def test_diff_to_text_width_narrower_than_80(saved):
    import rewriter

    fp32, converted = saved
    d = rewriter.diff(rewriter.load(fp32), rewriter.load(converted))
    text = d.to_text(width=60)
    assert "rewriter diff:" in text and "kept in fp32 on purpose" in text
    assert [line for line in text.splitlines() if len(line) > 60 and " " in line.strip()] == []


def test_bench_table_fits_80_columns(saved, columns, capsys):
    fp32, converted = saved
    assert main(["bench", str(converted), "--reference", str(fp32), "--repeat", "2", "--warmup", "0",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert _too_long(out) == [], _too_long(out)
    header = next(line for line in out.splitlines() if line.startswith("variant"))
    assert header.split() == ["variant", "ms", "peak", "weights", "rel", "L2", "max", "abs"]
    rows = {line.split()[0] + " " + line.split()[1]: line for line in out.splitlines()
            if line.startswith(("autocast", "converted"))}
    assert set(rows) == {"autocast fp16", "converted fp16"}
    assert "n/a" in rows["converted fp16"]  # peak memory is not tracked on the CPU: said, not blank


def test_fit_table_cuts_names_then_moves_columns(columns):
    from rewriter.cli.ui import fit_table

    rows = [("converted fp16 + compile max-autotune-no-cudagraphs", "1.234", "n/a", "1.00 MiB", "1.0e-03",
             "2.0e-03")]
    text = fit_table(("variant", "ms", "peak", "weights", "rel L2", "max abs"), rows, 60)
    assert _too_long(text, 60) == [] and "\u2026" in text
    narrow = fit_table(("variant", "ms", "peak", "weights", "rel L2", "max abs"), rows, 40)
    assert _too_long(narrow, 40) == [] and "2.0e-03" in narrow  # trailing columns on a second line


def test_convert_summary_fits_80_columns(tmp_path, columns, capsys):
    out = tmp_path / ("x" * 30 + ".pt2")
    assert main(["convert", MLP, "--input-shape", "4,16", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "error vs fp32" in text
    assert [line for line in _too_long(text) if str(out) not in line] == []


def test_version(capsys):
    import rewriter

    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"rewrite {rewriter.__version__} ") and f"torch {torch.__version__}" in out


def test_quiet_prints_results_only_and_verbose_prints_progress(tmp_path, capsys):
    assert main(["--quiet", "convert", MLP, "--input-shape", "4,16", "-o", str(tmp_path / "q.pt2")]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and "converted" in quiet.out
    # the flags work after the command too, and --verbose shows the library's progress lines
    assert main(["convert", MLP, "--input-shape", "4,16", "-o", str(tmp_path / "v.pt2"), "--verbose"]) == 0
    loud = capsys.readouterr()
    assert "[rewrite] " in loud.err and "converted" in loud.out
    assert main(["convert", MLP, "--input-shape", "4,16", "-o", str(tmp_path / "n.pt2")]) == 0
    normal = capsys.readouterr()
    assert "[rewrite] " not in normal.err and "loading" in normal.err


def test_quiet_and_verbose_together_is_usage_error(capsys):
    assert main(["-q", "-v", "demo"]) == 2
    assert "contradict" in capsys.readouterr().err


def test_quiet_drops_notes(saved, capsys):
    _, converted = saved
    assert main(["bench", str(converted), "--repeat", "1", "--warmup", "0", "--device", "cpu", "-q"]) == 0
    captured = capsys.readouterr()
    assert "converted fp16" in captured.out and "note:" not in captured.out and captured.err == ""


@pytest.mark.parametrize("module", ["rewriter", "rewriter.cli"])
def test_python_dash_m(module):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", module, "--version"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("rewrite "), proc.stderr
    proc = subprocess.run([sys.executable, "-m", module, "frobnicate"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_demo_fp8_row_names_what_autocast_runs(monkeypatch, capsys):
    import rewriter.demo as demo

    small = demo.DemoEncoder
    monkeypatch.setattr(demo, "DemoEncoder", lambda: small(vocab=50, dim=32, depth=1, heads=2))
    real_inputs = demo.demo_inputs
    monkeypatch.setattr(demo, "demo_inputs", lambda device="cpu": real_inputs(batch=2, seq=16, vocab=50,
                                                                             device=device))
    main(["demo", "--precision", "fp8", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "autocast fp8" not in out
    assert "torch.autocast bf16 (has no fp8)" in out


def test_bench_fp8_names_the_autocast_row_for_what_it_runs(columns, capsys):
    assert main(["bench", MLP, "--input-shape", "4,16", "--precision", "fp8", "--repeat", "1", "--warmup", "0",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "autocast fp8" not in out and "converted fp8" in out
    row = next(line for line in out.splitlines() if line.startswith("autocast"))
    assert row.startswith("autocast bf16 *")
    assert "* torch.autocast has no FP8 mode: this row runs its bf16 mode" in out


def test_verbose_prints_every_training_step(capsys):
    assert main(["demo", "--train", "--task", "reverse", "--precisions", "fp32", "--steps", "2", "--device", "cpu",
                 "--verbose"]) == 0
    err = capsys.readouterr().err
    assert "step    0" in err and "step    1" in err
