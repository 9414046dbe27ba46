"""Benchmarks, model zoos and demos that are not part of the library (`python -m tools.<name>`)."""
