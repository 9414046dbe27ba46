"""Conversion time of `rewriter.convert` on the CPU for a transformer at several depths.

A Hugging Face BERT encoder (random init) of --hidden width (768 = BERT-base) at each of --layers depths,
converted to --precision from an example batch of --batch x --seq token ids with an attention mask.
Per depth: graph nodes, wall seconds and process CPU seconds of the whole convert (CPU seconds are
less sensitive to other processes on a shared machine), split into capture and passes, the capture
split again into its stages (eager reference run, torch.export, run_decompositions, ep.module(),
parameter copy), and seconds per 1,000 nodes, which stays about constant when the time grows linearly
with the graph. One warm-up conversion of a 1-layer model runs first
(imports and first-call caches are not part of the figures).

    python -m tools.bench_convert                                  # 6, 12, 24, 48 layers, BERT-base width
    python -m tools.bench_convert --layers 24 --profile 24         # cProfile of the 24-layer conversion
    python -m tools.bench_convert --hidden 256 --out convert.json  # a narrower model
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import sys
import time

import torch

from tools import harness

__all__ = ["main", "convert_once"]


def _model(layers: int, hidden: int, seq: int, batch: int):
    from transformers import BertModel

    cfg = harness.hf_config("bert", hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                            max_position_embeddings=max(512, seq))
    torch.manual_seed(0)
    model = BertModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _time_capture_stages(stages: dict) -> list:
    """Wrap the capture steps with wall-clock timers (restored by the caller): reference run,
    torch.export, run_decompositions, ExportedProgram.module() and the parameter copy."""
    from rewriter import capture as cap

    patches = []

    def wrap(owner, name, label):
        fn = getattr(owner, name)
        patches.append((owner, name, fn))

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stages[label] = stages.get(label, 0.0) + time.perf_counter() - t0
        setattr(owner, name, timed)

    wrap(cap, "run_reference", "reference run")
    wrap(cap.torch.export, "export", "torch.export")
    wrap(torch.export.ExportedProgram, "run_decompositions", "run_decompositions")
    wrap(torch.export.ExportedProgram, "module", "ep.module()")
    if hasattr(cap, "_untie_parameters"):
        wrap(cap, "_untie_parameters", "copy parameters")
    return patches


def convert_once(layers: int, hidden: int, seq: int, batch: int, precision: str,
                 profile: bool = False) -> dict:
    """Convert one model; returns the timing record (and the top of a cProfile when asked)."""
    import rewriter
    from rewriter import pipeline

    model, kwargs = _model(layers, hidden, seq, batch)
    marks: list[tuple[float, str, str]] = []

    def reporter(enabled):  # pipeline's progress lines, timestamped instead of printed
        return lambda step, text: marks.append((time.perf_counter(), step, text))

    original = pipeline._reporter
    pipeline._reporter = reporter
    stages: dict[str, float] = {}
    patches = _time_capture_stages(stages)
    prof = cProfile.Profile() if profile else None
    try:
        gc.collect()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        if prof:
            prof.enable()
        gm = rewriter.convert(model, (), kwargs, precision=precision, progress=True)
        if prof:
            prof.disable()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    finally:
        pipeline._reporter = original
        for owner, name, fn in patches:
            setattr(owner, name, fn)
    captured = [t for t, step, text in marks if step == "capture"]
    capture_s = (captured[-1] - wall0) if len(captured) >= 2 else None
    nodes = len(gm.graph.nodes)
    record = {"layers": layers, "hidden": hidden, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
              "nodes": nodes, "wall_s": wall, "cpu_s": cpu, "capture_s": capture_s,
              "passes_s": (wall - capture_s) if capture_s is not None else None,
              "wall_s_per_1k_nodes": wall / nodes * 1000,
              "cpu_s_per_1k_nodes": cpu / nodes * 1000,
              "capture_stages_s": {k: round(v, 2) for k, v in stages.items()},
              "passes": {step: text for _, step, text in marks if step != "capture"}}
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(30)
        record["profile"] = out.getvalue()
    del gm, model
    gc.collect()
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="6,12,24,48")
    p.add_argument("--hidden", type=int, default=768, help="model width (768 = BERT-base)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2, help="example batch (2 keeps the batch dimension dynamic)")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--profile", type=int, default=None, help="cProfile the conversion at this depth")
    p.add_argument("--out", default=None, help="write the records as JSON here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    layers = [int(x) for x in a.layers.split(",") if x]
    print(f"cpu: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, torch {torch.__version__}; "
          f"BERT hidden {a.hidden}, example {a.batch}x{a.seq}, precision {a.precision}", file=sys.stderr)
    convert_once(1, a.hidden, a.seq, a.batch, a.precision)  # warm-up: imports, first-call caches
    records = []
    for n in layers:
        r = convert_once(n, a.hidden, a.seq, a.batch, a.precision, profile=(a.profile == n))
        records.append(r)
        print(f"  {n:3d} layers: {r['nodes']:5d} nodes, {r['wall_s']:6.1f} s wall ({r['cpu_s']:6.1f} s CPU), "
              f"capture {r['capture_s']:.1f} s, passes {r['passes_s']:.1f} s, "
              f"{r['cpu_s_per_1k_nodes']:.1f} CPU s per 1k nodes; capture stages {r['capture_stages_s']}",
              file=sys.stderr, flush=True)
        if "profile" in r:
            print(r["profile"], file=sys.stderr)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{os.cpu_count()} cores, load average {load:.1f} at the end (above the core count, wall "
          "seconds include waiting for a core; CPU seconds do not)")
    print("| layers | params (M) | nodes | wall s | CPU s | capture s | passes s | wall s / 1k nodes "
          "| CPU s / 1k nodes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['layers']} | {r['params_m']:.0f} | {r['nodes']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
              f"{r['capture_s']:.1f} | {r['passes_s']:.1f} | {r['wall_s_per_1k_nodes']:.1f} | "
              f"{r['cpu_s_per_1k_nodes']:.1f} |")
    if a.out:
        harness.write_json(a.out, {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                                   "load_average": load, "args": vars(a),
                                   "records": [{k: v for k, v in r.items() if k != "profile"} for r in records]},
                           device="cpu", argv=argv, module="tools.bench_convert")
    return 0


if __name__ == "__main__":
    sys.exit(main())
