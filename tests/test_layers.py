"""The layering of the package, checked with import-linter (contracts in pyproject.toml).

grimp, import-linter's graph builder, reads a package from its folder, so it cannot see rewriter.passes and
rewriter.backends in a checkout (they live in the top-level passes/ and backends/ folders and are reached
through `rewriter.__path__`). The check therefore runs over the layout an installed wheel has: the
folders of pyproject's package-dir copied under one `rewriter/` folder in a temporary directory. A second
test keeps pyproject's `packages` list equal to the folders that hold an `__init__.py`, so that copy is
the wheel.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: import-linter depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def _setuptools() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]


def _folder(package: str, package_dir: dict[str, str]) -> Path:
    """Folder of `package` under pyproject's package-dir (the longest mapped prefix wins)."""
    prefix = max((p for p in package_dir if package == p or package.startswith(p + ".")), key=len)
    rest = package[len(prefix):].lstrip(".")
    return ROOT / package_dir[prefix] / Path(*rest.split(".")) if rest else ROOT / package_dir[prefix]


def _package_folders() -> set[str]:
    """Import names of every folder with an __init__.py under the mapped folders, as the wheel names them."""
    package_dir = _setuptools()["package-dir"]
    found = set()
    for name, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if any(part.startswith((".", "__")) for part in rel.parts):
                continue
            found.add(".".join((name, *rel.parts)) if rel.parts else name)
    return found


def test_pyproject_packages_are_the_folders_with_an_init():
    listed = set(_setuptools()["packages"])
    found = _package_folders()
    assert not found - listed, (f"folders with an __init__.py missing from pyproject's [tool.setuptools] "
                                f"packages (a wheel would leave them out): {sorted(found - listed)}")
    assert not listed - found, f"pyproject lists packages that have no folder: {sorted(listed - found)}"


@pytest.fixture(scope="module")
def wheel_layout(tmp_path_factory) -> Path:
    """The .py files of every package, copied where a wheel installs them (rewriter/passes/..., ...)."""
    out = tmp_path_factory.mktemp("layout")
    package_dir = _setuptools()["package-dir"]
    for package in _setuptools()["packages"]:
        source = _folder(package, package_dir)
        target = out.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for file in source.glob("*.py"):
            shutil.copy2(file, target / file.name)
    return out


def _lint(layout: Path, config: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(layout))
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, str(config), "--no-cache"],
                          cwd=layout, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept(wheel_layout):
    result = _lint(wheel_layout, PYPROJECT)
    assert result.returncode == 0, f"import-linter (pyproject.toml [tool.importlinter]):\n{result.stdout}{result.stderr}"
    assert "Contracts: 2 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("module, line, reported", [
    ("errors", "from rewriter.pipeline import convert", "rewriter.errors -> rewriter.pipeline"),
    ("runtime/fp8_train_ops", "from rewriter.passes.plan import fp8_cost",
     "rewriter.runtime.fp8_train_ops -> rewriter.passes.plan.fp8_cost"),
    ("config", "from rewriter.backends import torch_backend",
     "rewriter.config -> rewriter.backends.torch_backend"),
    ("report", "from rewriter.diff import Diff", ".report -> .diff"),
    ("training", "from rewriter.pipeline import build_passes", ".training -> .pipeline"),
])
def test_a_broken_layer_or_cycle_is_reported(wheel_layout, tmp_path, module, line, reported):
    """The check bites: an upward import (or a cycle inside one layer) fails, naming the import."""
    layout = tmp_path / "layout"
    shutil.copytree(wheel_layout, layout)
    path = layout / "rewriter" / f"{module}.py"
    path.write_text(path.read_text() + f"\n\ndef _added():\n    {line}  # even inside a function\n")
    result = _lint(layout, PYPROJECT)
    assert result.returncode != 0
    assert reported in result.stdout, result.stdout


def test_every_public_name_is_importable_from_rewriter():
    """What a user needs comes from `rewriter`; the ONNX names load onnx on first use, not on import."""
    code = ("import sys, rewriter; heavy = {'onnx', 'onnxscript', 'onnxruntime'} & set(sys.modules); "
            "assert not heavy, f'import rewriter loaded {heavy}'; "
            "missing = [n for n in rewriter.__all__ if getattr(rewriter, n, None) is None]; "
            "assert not missing, missing; "
            "from rewriter import Fp8Options, BackendOptions, make_scaler, optimize, graph_module_of, "
            "ort_session, export_onnx, TrainEvalGraphModule, ConvertConfig")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
