"""tools/tf_compat.py: finds the transformers-dependent test files and runs a file under the
transformers release in another folder, reporting its failing tests."""
from __future__ import annotations

from tools.tf_compat import run_file, transformers_test_files


def test_finds_the_files_that_use_transformers():
    files = transformers_test_files()
    assert "tests/test_generation.py" in files and "tests/test_zoo.py" in files
    assert "tests/test_fp8_convert.py" in files  # through fixtures_models.load_minilm
    assert "tests/test_cli_flags.py" not in files


def test_runs_a_file_under_the_other_release(tmp_path):
    release = tmp_path / "release"
    (release / "transformers").mkdir(parents=True)
    (release / "transformers" / "__init__.py").write_text("__version__ = '0.0.fake'\n")
    test = tmp_path / "test_other.py"
    test.write_text("import transformers\n\n"
                    "def test_sees_it():\n    assert transformers.__version__ == '0.0.fake'\n\n"
                    "def test_breaks():\n    assert transformers.__version__ == '5.24.0'\n")
    row = run_file(str(test), str(release), timeout=120)
    assert row["status"] == "fails" and row["passed"] == 1 and row["failed"] == 1
    assert [t.rsplit("::", 1)[-1] for t in row["failed_tests"]] == ["test_breaks"]
