"""Conversion time with calibration (ranges + accuracy-budget search) and forward runs it used.

A 24-layer BERT-style encoder (transformers' BertModel, tiny width by default, random init) is
converted to fp16 with `calibration=` and several `tolerance=` budgets: a fixed one, and fractions of
the all-fp16 error, where the search has to keep nodes. Per device and budget the table shows the
conversion time in all and of the two measuring passes, the search's forward runs and their cap
(run_bound(n, 2) = 6 + 4 ceil(log2 n)), candidates, nodes kept fp32, and the error on the search
batches and on held-out batches the conversion never saw (relative L2 of last_hidden_state vs fp32).

    python -m tools.bench_calibration                          # CPU
    python -m tools.bench_calibration --device cuda --width 256 --json out.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from tools import harness

__all__ = ["main", "build"]


def build(layers: int, width: int, heads: int, seq: int, batch: int, count: int, device: str):
    """(model, batches) for a BERT-style encoder of `layers` layers, random init, eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertModel

    torch.manual_seed(0)
    cfg = harness.hf_config("bert", vocab_size=1000, hidden_size=width, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=4 * width, max_position_embeddings=seq)
    model = BertModel(cfg).eval().to(device)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[batch // 2:, seq - seq // 4:] = 0  # some padding, so the masks carry sentinels
        batches.append({"input_ids": torch.randint(0, 1000, (batch, seq), generator=g).to(device),
                        "attention_mask": mask.to(device)})
    return model, batches


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_one(model, calibration, held_out, tolerance: float, device: str) -> dict:
    import rewriter
    from rewriter import meta

    _sync(device)
    start = time.perf_counter()
    fast = rewriter.convert(model, calibration[0], precision="fp16", calibration=calibration,
                            tolerance=tolerance)
    _sync(device)
    total = time.perf_counter() - start
    info = fast.meta[meta.CALIBRATION]
    search = info["sensitivity"]
    with torch.no_grad():
        held = max(harness.rel_l2(model(**b), fast(**b)) for b in held_out)
    return {
        "device": device, "tolerance": tolerance, "convert_s": round(total, 2),
        "ranges_s": info["ranges"]["seconds"], "search_s": search["seconds"], "runs": search["runs"],
        "bound": search["bound"], "cap": search["cap"], "batch_forwards": search["batch_forwards"],
        "candidates": search["candidates"], "kept": len(search["kept"]),
        "range_kept": len(info["ranges"]["kept"]), "all_fp16_error": search["all_low_error"],
        "error": search["error"], "held_out_error": held,
    }


def _table(rows: list[dict]) -> str:
    head = ("device", "budget", "convert s", "ranges s", "search s", "runs (cap)", "cands", "kept",
            "all-fp16 err", "search err", "held-out err")
    lines = [" | ".join(head), " | ".join("-" * len(h) for h in head)]
    for r in rows:
        lines.append(" | ".join([
            r["device"], f"{r['tolerance']:.0e}", f"{r['convert_s']:.1f}", f"{r['ranges_s']:.1f}",
            f"{r['search_s']:.1f}", f"{r['runs']} ({r['cap']})", str(r["candidates"]), str(r["kept"]),
            f"{r['all_fp16_error']:.1e}", f"{r['error']:.1e}", f"{r['held_out_error']:.1e}"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_calibration", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cpu,cuda")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--calibration", type=int, default=4, help="calibration batches")
    parser.add_argument("--held-out", type=int, default=2, help="held-out batches")
    parser.add_argument("--tolerance", default="1e-2,x0.7,x0.4",
                        help="comma-separated budgets; xF is F times the all-fp16 error")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for device in args.device.split(","):
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"skipping {device}: no CUDA device", file=sys.stderr)
            continue
        model, batches = build(args.layers, args.width, args.heads, args.seq, args.batch,
                               args.calibration + args.held_out, device)
        calibration, held_out = batches[:args.calibration], batches[args.calibration:]
        all_fp16 = None
        for spec in args.tolerance.split(","):
            if spec.startswith("x"):  # a fraction of the all-fp16 error: the search has to work
                if all_fp16 is None:
                    all_fp16 = run_one(model, calibration, held_out, 1.0, device)["all_fp16_error"]
                tol = float(spec[1:]) * all_fp16
            else:
                tol = float(spec)
            rows.append(run_one(model, calibration, held_out, tol, device))
            print(_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(f"{args.layers}-layer BERT-style encoder, width {args.width}, batch {args.batch}x{args.seq}, "
          f"{args.calibration} calibration + {args.held_out} held-out batches, fp16, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print(_table(rows))
    if args.json:
        harness.write_json(args.json, {"args": vars(args), "rows": rows}, device=args.device.split(",")[-1],
                           argv=argv, module="tools.bench_calibration")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
