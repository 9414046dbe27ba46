"""Test set-up: make helper modules in tests/ (fixtures_models) importable; shared fixtures.

tests/ is appended, not prepended, to sys.path: tests/passes mirrors the `passes` package and must not
shadow it (pytest runs with --import-mode=importlib and the repository root on sys.path).
"""
import sys
from pathlib import Path

import pytest
import torch

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (small kernels run fastest so, and the suite runs 2 workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
