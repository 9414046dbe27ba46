"""Benchmarks and profilers of the project, run from the repository root as `python -m tools.<name>`.

Every script measures with `tools.harness` (one timer, one round-robin, one error metric, one model zoo,
one JSON writer); their results and the commands that made them are in tools/results/README.md.
"""
