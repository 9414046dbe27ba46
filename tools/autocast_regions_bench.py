"""Models that turn autocast off where precision matters: error and latency of ours vs autocast.

Models (random init, fp32, eval):
  freqs               the 10-line rotary-frequency model: `with torch.autocast(dev, enabled=False):
                      freqs = inv_freq @ positions`, then cos/sin (error grows with the position).
  llama               transformers LlamaModel as installed (6 layers, hidden 1024, 16 heads / 4 kv heads).
  llama_autocast_rope the same model with the rotary embedding of transformers <= 4.5x, which computes
                      its frequencies as a matmul inside torch.autocast(enabled=False).
Per model, sequence length and dtype (bf16, fp16): relative L2 error vs strict fp32 (TF32 off), in
float64, of autocast, ours eager, ours compiled (backend="compile") and torch.compile(model.to(dtype));
latency (median of --repeats blocks of --iters calls, CUDA events on a GPU) and the ratios ours eager /
autocast and ours compiled / torch.compile(model.to(dtype)); how many autocast regions capture found.
`within_1_5x` says whether ours stays within 1.5x autocast's error (+1e-6, fp32 reassociation where
autocast is exact): the issue-17 bar.

    python -m tools.autocast_regions_bench --device cuda --out tools/results/autocast_regions_h200.json
    python -m tools.autocast_regions_bench --device cpu --tiny --no-compile --iters 1 --repeats 1   # smoke
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
import traceback

import torch
import torch.nn as nn

__all__ = ["main", "build", "FreqsModel", "LegacyRotary", "rel_l2", "run_row"]


class FreqsModel(nn.Module):
    """Rotary frequencies the way models protect them: the matmul runs with autocast off."""

    def __init__(self, dim: int = 128, base: float = 10000.0):
        super().__init__()
        inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, positions):
        inv = self.inv_freq[None, :, None].expand(positions.shape[0], -1, 1)
        with torch.autocast(positions.device.type, enabled=False):
            freqs = (inv.float() @ positions[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return torch.cat((emb.cos(), emb.sin()), dim=-1)


class LegacyRotary(nn.Module):
    """LlamaRotaryEmbedding as transformers <= 4.5x wrote it (autocast off around the matmul)."""

    def __init__(self, config):
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        base = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get(
            "rope_theta", 10000.0)
        inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)
        self.attention_scaling = 1.0

    def forward(self, x, position_ids):
        inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        pos = position_ids[:, None, :].float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = (inv.float() @ pos.float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def build(name: str, seq: int, batch: int, tiny: bool, device: torch.device):
    """(model, args) for a named model, random init (seed 0), fp32, eval, on `device`."""
    torch.manual_seed(0)
    if name == "freqs":
        model = FreqsModel(16 if tiny else 128)
        positions = torch.arange(seq, dtype=torch.float32)[None].expand(batch, -1).contiguous()
        return model.eval().to(device), (positions.to(device),)
    if name not in ("llama", "llama_autocast_rope"):
        raise SystemExit(f"unknown model {name!r}: choose freqs, llama, llama_autocast_rope")
    from transformers import LlamaConfig, LlamaModel

    size = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256) if tiny else
            dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000))
    config = LlamaConfig(**size, max_position_embeddings=max(4096, seq), use_cache=False)
    model = LlamaModel(config)
    if name == "llama_autocast_rope":
        model.rotary_emb = LegacyRotary(config)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    return model.eval().to(device), (ids.to(device),)


def _tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return _tensor(out[0])


def rel_l2(out, ref) -> float:
    out, ref = _tensor(out).detach().double(), _tensor(ref).detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _latency(fn, device, warmup: int, iters: int, repeats: int) -> float:
    """Milliseconds per call: the median of `repeats` blocks of `iters` calls, after `warmup` calls."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        blocks = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fn()
                end.record()
                torch.cuda.synchronize()
                blocks.append(start.elapsed_time(end) / iters)
            else:
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                blocks.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(blocks)


def _variants(model, args, dtype, device, compile_on: bool) -> dict:
    """name -> zero-argument callable, built (and converted) here."""
    import rewriter
    from rewriter.autocast_regions import regions_of
    from rewriter.backends.torch_backend import graph_module_of

    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]

    def autocast():
        with torch.autocast(device.type, dtype=dtype):
            return model(*args)

    ours = rewriter.convert(model, args, precision=precision)
    out = {"autocast": autocast, "ours": lambda: ours(*args),
           "_regions": regions_of(graph_module_of(ours)),
           "_region_nodes": sum(1 for n in graph_module_of(ours).graph.nodes
                                if n.meta.get("rewriter.autocast"))}
    if compile_on:
        ours_c = rewriter.convert(ours, args, precision=precision, backend="compile")  # same graph, compiled
        cast = torch.compile(copy.deepcopy(model).to(dtype))
        out["ours_compiled"] = lambda: ours_c(*args)
        out["compile_cast"] = lambda: cast(*args)
    return out


def run_row(name: str, seq: int, batch: int, dtype: torch.dtype, ns, device) -> dict:
    """One (model, sequence length, dtype) row: errors, latencies, ratios."""
    model, args = build(name, seq, batch, ns.tiny, device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            ref = _tensor(model(*args)).detach().clone()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    row = {"model": name, "seq": seq, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
           "error": {}, "latency_ms": {}, "failed": {}}
    live = _variants(model, args, dtype, device, not ns.no_compile)
    row["regions"] = live.pop("_regions")
    row["region_nodes"] = live.pop("_region_nodes")
    for key, fn in live.items():
        try:
            with torch.no_grad():
                row["error"][key] = rel_l2(fn(), ref)
            row["latency_ms"][key] = _latency(fn, device, ns.warmup, ns.iters, ns.repeats)
        except Exception as exc:  # one failing variant does not hide the others
            row["failed"][key] = f"{type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc(file=sys.stderr)
    err, lat = row["error"], row["latency_ms"]
    for key in ("ours", "ours_compiled"):
        if key in err and "autocast" in err:  # 1e-6: fp32 reassociation where autocast is exact
            row[f"{key}_error_vs_autocast"] = err[key] / err["autocast"] if err["autocast"] else None
            row[f"{key}_within_1_5x"] = err[key] <= 1.5 * err["autocast"] + 1e-6
    if "ours" in lat and "autocast" in lat:
        row["speedup_ours_vs_autocast"] = lat["autocast"] / lat["ours"]
    if "ours_compiled" in lat and "compile_cast" in lat:
        row["speedup_ours_compiled_vs_compile_cast"] = lat["compile_cast"] / lat["ours_compiled"]
    del live, model, args
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _print(row: dict) -> None:
    err, lat = row["error"], row["latency_ms"]
    cells = "  ".join(f"{k}: err {err[k]:.2e} {lat.get(k, float('nan')):.2f}ms" for k in err)
    print(f"{row['model']:>20} s{row['seq']:<5} {row['dtype']:<8} regions {len(row['regions'])} "
          f"({row['region_nodes']} nodes)  {cells}" + (f"  FAILED {row['failed']}" if row["failed"] else ""),
          flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="freqs,llama,llama_autocast_rope")
    parser.add_argument("--seqs", default="512,2048", help="sequence lengths (positions for freqs)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--tiny", action="store_true", help="tiny models, for a CPU smoke run")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON file, rewritten after every row")
    ns = parser.parse_args(argv)
    device = torch.device(ns.device)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    import transformers

    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "settings": {k: v for k, v in vars(ns).items() if k != "out"}, "rows": []}
    for name in [m for m in ns.models.split(",") if m]:
        for seq in [int(s) for s in ns.seqs.split(",") if s]:
            for key in [d for d in ns.dtypes.split(",") if d]:
                row = run_row(name, seq, ns.batch, dtypes[key], ns, device)
                result["rows"].append(row)
                _print(row)
                if ns.out:
                    with open(ns.out, "w") as f:
                        json.dump(result, f, indent=1)
    return 1 if any(r["failed"] for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
