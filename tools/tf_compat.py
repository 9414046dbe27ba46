"""Run the transformers-dependent tests under another installed transformers (users have many releases;
CI has one). The other release lives in a folder put first on PYTHONPATH, so nothing installed changes:

    pip install --no-deps --target /tmp/tf517 transformers==5.17.0 huggingface-hub==<its pin>
    python -m tools.tf_compat --transformers /tmp/tf517 --out tools/results/tf_compat_5.17.json
    python -m tools.tf_compat --transformers /tmp/tf517 --files tests/test_generation.py   # one file

Per test file: passed / failed counts, the failing test ids and the seconds it took (a file that runs
past --timeout is reported as such). Exit status 1 when a test fails, so CI can run it as a job.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main", "transformers_test_files", "run_file"]

ROOT = Path(__file__).resolve().parent.parent
# a test file depends on transformers when it names it or builds its models from these helpers
_USES = re.compile(r"transformers|generation_demo|tiny_llama|load_minilm|tools\.zoo_")


def transformers_test_files(root: Path = ROOT) -> list[str]:
    """The test files (relative to `root`) whose text names transformers or a helper built on it."""
    files = sorted((root / "tests").rglob("test_*.py"))
    return [str(f.relative_to(root)) for f in files if _USES.search(f.read_text(encoding="utf-8"))]


def _version(path: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([path, str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                         env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"transformers does not import from {path}: {out.stderr.strip()[-300:]}")
    return out.stdout.strip()


def run_file(test_file: str, path: str, timeout: float) -> dict:
    """pytest on one file with `path` first on PYTHONPATH: counts, failing ids, seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # not an xdist worker's
    env.update({"PYTHONPATH": os.pathsep.join([path, str(ROOT)]), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    start = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider",
                              "-p", "no:logging", test_file], env=env, capture_output=True, text=True,
                             cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"file": test_file, "status": f"timeout after {timeout:g}s", "seconds": round(timeout)}
    text = out.stdout + out.stderr
    summaries = [line for line in out.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|error|skipped)", summaries[-1]
                                                  if summaries else "")}  # not stderr's last line: warnings
    return {"file": test_file, "status": "ok" if out.returncode == 0 else "fails", **counts,
            "failed_tests": re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M),
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transformers", required=True, help="folder holding the other transformers release")
    parser.add_argument("--files", nargs="*", help="test files (default: every transformers-dependent one)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test file")
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args(argv)
    version = _version(args.transformers)
    rows = []
    for test_file in args.files or transformers_test_files():
        rows.append(run_file(test_file, args.transformers, args.timeout))
        print(f"{test_file:55s} {rows[-1]['status']:10s} {rows[-1].get('passed', 0)} passed "
              f"{rows[-1].get('failed', 0)} failed {rows[-1]['seconds']}s", flush=True)
        if args.out:  # rewritten after every file: a partial run leaves a partial table
            Path(args.out).write_text(json.dumps({"transformers": version, "files": rows}, indent=1) + "\n")
    bad = [r for r in rows if r["status"] != "ok"]
    print(f"transformers {version}: {len(rows) - len(bad)} of {len(rows)} files pass")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
