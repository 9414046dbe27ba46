"""CPU model zoo: convert every architecture of tools/zoo_specs.py as a user would, and check it.

Per row (tiny config, random weights, bf16, default options):
  * convert: `rewriter.convert(model, example inputs, precision="bf16")`, its time and capture notes;
  * run at the example shape, at another batch and at another sequence length / image size (when the
    original model accepts that size; "original rejects" otherwise);
  * error: relative L2 vs the fp32 model, the largest over the float outputs, for ours and for CPU
    torch.autocast(bfloat16) at each of those shapes; within budget when ours <= 1.5x autocast's + 1e-3;
  * output structure: the pytree structure (ModelOutput classes, DynamicCache / EncoderDecoderCache)
    and the output dtypes equal the original's.

    python -m tools.zoo_cpu --out tools/results/zoo_cpu.json        # all rows (~20 min on 2 cores)
    python -m tools.zoo_cpu --only bert,llama                       # a few rows
The JSON is rewritten after every row, so a partial run leaves a partial table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["run_row", "main", "structure", "rel_l2", "BUDGET_FACTOR", "BUDGET_FLOOR"]

BUDGET_FACTOR = 1.5
BUDGET_FLOOR = 1e-3


def rel_l2(reference, candidate) -> float:
    """Largest relative L2 error over the floating-point leaves (NaN-safe: non-finite -> inf)."""
    worst = 0.0
    for ref, got in zip(pytree.tree_leaves(reference), pytree.tree_leaves(candidate)):
        if not isinstance(ref, torch.Tensor) or not ref.is_floating_point():
            continue
        ref, got = ref.detach().double(), got.detach().double()
        if ref.shape != got.shape or not torch.isfinite(got).all():
            return float("inf")
        worst = max(worst, float((got - ref).norm() / ref.norm().clamp_min(1e-12)))
    return worst


def structure(out: Any) -> str:
    """The pytree structure of an output with its leaves' dtypes: equal strings, equal structure."""
    leaves, spec = pytree.tree_flatten(out)
    dtypes = [str(x.dtype).replace("torch.", "") if isinstance(x, torch.Tensor) else type(x).__name__ for x in leaves]
    return f"{_spec_text(spec)} {dtypes}"


def _spec_text(spec) -> str:
    name = getattr(spec.type, "__name__", str(spec.type)) if spec.type is not None else "*"
    children = [_spec_text(c) for c in spec.children()] if hasattr(spec, "children") else \
        [_spec_text(c) for c in spec.children_specs]
    return name + (f"({', '.join(children)})" if children else "")


def _has_cache(out: Any) -> str | None:
    for value in (out.values() if isinstance(out, dict) else []):
        if "Cache" in type(value).__name__:
            return type(value).__name__
    return None


def _run(model, args, kwargs, autocast: bool = False):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return model(*args, **kwargs)


def _first_line(exc: BaseException, limit: int = 400) -> str:
    lines = [t for t in str(exc).strip().splitlines() if t.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text[:limit]


def _check_shape(spec, model, fast, batch, size) -> dict:
    args, kwargs = spec.make_inputs(batch, size)
    try:
        ref = _run(model, args, kwargs)
    except Exception as exc:
        return {"status": "original rejects", "error": _first_line(exc)}
    try:
        ours = _run(fast, args, kwargs)
    except Exception as exc:
        return {"status": "fails", "error": _first_line(exc)}
    auto = _run(model, args, kwargs, autocast=True)
    ours_err, auto_err = rel_l2(ref, ours), rel_l2(ref, auto)
    return {"status": "ok", "batch": batch, "size": size, "rel_l2": ours_err, "autocast_rel_l2": auto_err,
            "within_budget": ours_err <= BUDGET_FACTOR * auto_err + BUDGET_FLOOR,
            "structure_equal": structure(ours) == structure(ref)}


def run_row(spec) -> dict:
    """Convert one architecture and check it; never raises (failures are recorded in the row)."""
    import rewriter

    row: dict[str, Any] = {"name": spec.name, "family": spec.family, "source": spec.source}
    started = time.perf_counter()
    try:
        model = spec.make_model()
    except Exception as exc:
        row.update(status="model not built", error=_first_line(exc))
        return row
    args, kwargs = spec.make_inputs(spec.batch, spec.size)
    try:
        t0 = time.perf_counter()
        fast = rewriter.convert(model, args, kwargs, precision="bf16", generate=False)
        row["convert_s"] = round(time.perf_counter() - t0, 2)
    except Exception as exc:
        row.update(status="convert fails", error=_first_line(exc), trace=traceback.format_exc(limit=-4)[-1500:])
        return row
    info = getattr(fast, "meta", {}).get("rewriter", {})
    row["capture"] = info.get("capture")
    row["notes"] = info.get("notes", [])
    checks = {"example": (spec.batch, spec.size), "other_batch": (spec.other_batch, spec.size),
              "other_size": (spec.batch, spec.other_size)}
    for key, (batch, size) in checks.items():
        row[key] = _check_shape(spec, model, fast, batch, size)
    example = row["example"]
    if example["status"] == "ok":
        ref = _run(model, args, kwargs)
        row["cache"] = _has_cache(ref)
        row["cache_returned"] = _has_cache(_run(fast, args, kwargs)) == row["cache"]
    ok = [row[k]["status"] == "ok" for k in checks]
    # other size: a size the original itself rejects (a fixed position table) is not held against us
    accepted = all(ok[:2]) and row["other_size"]["status"] in ("ok", "original rejects")
    within = all(row[k].get("within_budget", True) for k in checks)
    same = all(row[k].get("structure_equal", True) for k in checks)
    row["status"] = "ok" if accepted and within and same else "check fails"
    row["total_s"] = round(time.perf_counter() - started, 2)
    return row


def _summary(rows: list[dict]) -> dict:
    converted = [r for r in rows if "convert_s" in r]
    return {"rows": len(rows), "converted": len(converted), "ok": sum(r["status"] == "ok" for r in rows),
            "other_batch_ok": sum(r.get("other_batch", {}).get("status") == "ok" for r in rows),
            "other_size_ok": sum(r.get("other_size", {}).get("status") == "ok" for r in rows),
            "other_size_original_rejects": sum(r.get("other_size", {}).get("status") == "original rejects"
                                               for r in rows),
            "within_budget": sum(all(r.get(k, {}).get("within_budget", False) for k in ("example", "other_batch"))
                                 for r in rows),
            "cache_rows": sum(bool(r.get("cache")) for r in rows),
            "cache_returned": sum(bool(r.get("cache")) and bool(r.get("cache_returned")) for r in rows)}


def main(argv=None) -> int:
    from tools.zoo_specs import specs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON file for the table (rewritten after each row)")
    parser.add_argument("--only", default=None, help="comma-separated row names (e.g. bert,llama,tv-resnet18)")
    parser.add_argument("--merge", action="store_true",
                        help="with --out: replace only the rows run now in the existing table")
    opts = parser.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    wanted = set(opts.only.split(",")) if opts.only else None
    rows, skipped = [], []
    for spec in specs():
        if wanted is not None and spec.name not in wanted:
            continue
        if spec.source == "timm":
            try:
                import timm  # noqa: F401
            except ImportError:
                skipped.append({"name": spec.name, "reason": "timm is not installed"})
                continue
        row = run_row(spec)
        rows.append(row)
        print(f"{row['name']:<24} {row['status']:<16} " + " ".join(
            f"{k}={row[k]['status']}" + (f"({row[k]['rel_l2']:.1e}/{row[k]['autocast_rel_l2']:.1e})"
                                         if row[k].get("status") == "ok" else "")
            for k in ("example", "other_batch", "other_size") if k in row) + (f" {row.get('error', '')}"),
            flush=True)
        if opts.out:
            _write(opts.out, _merged(opts.out, rows) if opts.merge else rows, skipped)
    if opts.merge and opts.out:
        rows = _merged(opts.out, rows)
    summary = _summary(rows)
    print(json.dumps(summary), flush=True)
    if opts.out:
        _write(opts.out, rows, skipped)
    return 0


def _merged(path: str, rows: list[dict]) -> list[dict]:
    """The table at `path` with the rows of the same names replaced by `rows` (new ones appended)."""
    try:
        with open(path) as f:
            old = json.load(f)["rows"]
    except (OSError, ValueError, KeyError):
        return rows
    new = {r["name"]: r for r in rows}
    merged = [new.pop(r["name"], r) for r in old]
    return merged + list(new.values())


def _write(path: str, rows: list[dict], skipped: list[dict]) -> None:
    payload = {"torch": torch.__version__, "budget": f"ours <= {BUDGET_FACTOR} x autocast + {BUDGET_FLOOR}",
               "summary": _summary(rows), "skipped": skipped, "rows": rows}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
