"""Load a script of tools/ (not a package) as a module, for the tests of the benchmarks and demos."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str, *, module_name: str | None = None, register: bool = False):
    """tools/<name>.py as a fresh module; `register` also puts it in sys.modules (first one wins), for
    code that looks its module up by name (dataclasses, pickling)."""
    spec = importlib.util.spec_from_file_location(module_name or name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules.setdefault(module_name or name, module)
    spec.loader.exec_module(module)
    return module
