"""rewriter/generation_demo.py: trains, converts and prints one row per precision (tiny run)."""
import pytest

pytest.importorskip("transformers")

from rewriter import generation_demo  # noqa: E402


def test_demo_prints_a_row_per_precision(capsys):
    assert generation_demo.main(["--steps", "40", "--prompts", "4", "--precisions", "bf16", "--kv8",
                                 "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert sum(" / " in line for line in out.splitlines()) == 4  # one table row per precision
    for name in ("fp32", "autocast bf16", "converted bf16 ", "converted bf16 kv8"):
        assert any(line.startswith(name) for line in out.splitlines()), name
    assert "tokens/s" in out


def test_demo_rejects_an_unknown_precision(capsys):
    assert generation_demo.main(["--steps", "1", "--prompts", "2", "--precisions", "int3"]) == 2
    assert "int3" in capsys.readouterr().err
