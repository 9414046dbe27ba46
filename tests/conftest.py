"""Test set-up: make helper modules in tests/ (fixtures_models) importable.

tests/ is appended, not prepended, to sys.path: tests/passes mirrors the `passes` package and must not
shadow it (pytest runs with --import-mode=importlib and the repository root on sys.path).
"""
import sys
from pathlib import Path

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)
