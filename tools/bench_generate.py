"""Generation benchmark: a Llama-style 1B model (random init, bf16), prompt 512, 128 new tokens, batch 1 and 8.

Variants, all in one process, timed round-robin (each variant once per round, --repeats rounds, median):
    hf eager bf16           model.generate() with its DynamicCache
    hf static compile       the transformers recipe: generate(cache_implementation="static"), whose decode
                            forward transformers 5 compiles itself on a GPU (mode="reduce-overhead")
    ours bf16               rewriter.convert(precision="bf16", generate=True): eager prefill and decode graphs
    ours bf16 cudagraphs    the same, decode graph replayed from a CUDA graph (GPU only)
    ours bf16 compile+cg    decode graph compiled by inductor, then replayed from a CUDA graph (GPU only)
    ours fp8 [...]          precision="fp8": the prefill by the FLOP rules, the decode GEMMs by the weight
                            bytes they read (passes/plan/fp8_decode.py, Fp8Options(decode_gemms="auto")); the
                            compile+cg variants convert with fused_quantization=True (estimated as compiled)
    ours fp8 scaledmm [...] every decode GEMM rewriter::fp8_linear (torch._scaled_mm, activation quantized per
                            call): decode_gemms="scaled_mm", min_speedup=0 (whatever the estimate says)
    ours fp8 weightonly compile+cg  every decode GEMM rewriter::fp8_weight_linear: decode_gemms="weight_only",
                            min_speedup=0; on CUDA with triton the op runs our Triton GEMV (rewriter/runtime/
                            fp8_gemv.py), which the compiled decode graph launches; else the reference
                            (FP8 weights widened inside the compiled GEMM)
    ours fp8 weightonly     the same, decode graph eager (the GEMV or, on the CPU, the reference)
    ours bf16 kv8 cudagraphs  bf16 with kv_cache="fp8" (e4m3 cache, per-head scales), CUDA graphs
    ... cdt compile+cg      the compile+cg variant with inductor's coordinate_descent_tuning (and max_autotune,
                            no inductor CUDA graphs): a one-row GEMM becomes a fused multiply-reduce
Per variant and batch: time to first token (prefill + first token, median), decode tokens/s (all
sequences of the batch, tokens after the first / time after the first), end-to-end tokens/s, and
decode_vs_ours_bf16: the decode rate over ours bf16 with the same decode backend (ours bf16 eager if absent). Greedy
decoding with min_new_tokens = max_new_tokens, so every variant generates the same number of tokens.
Memory per variant: the bytes of its parameters and buffers (`param_bytes`; for ours, both graphs' weights
once: an FP8 decode graph keeps its float8 weights beside the prefill's bf16 ones) and, on CUDA,
`torch.cuda.max_memory_allocated` while it generates (peak stats reset before each variant's warm-up:
`peak_bytes`, and `peak_run_bytes` above what was allocated before it: cache and activations).
`fp8_weight_linear_routes` (notes, printed): for each variant that runs rewriter::fp8_weight_linear, what the
op chose in its warm-up ("triton gemv" or "reference: <why>"; eager calls and compiled traces both count).
Also measured: peak memory while converting the bf16 model (CUDA: max_memory_allocated above what was
allocated before), against the converted model's bytes (target <= 1.5x), and whether our greedy tokens
equal hf eager's on the first prompt.

    python -m tools.bench_generate --device cuda --out bench_generate.json
    python -m tools.bench_generate --variants "ours bf16 cudagraphs,ours fp8 weightonly compile+cg" --out g.json
    python -m tools.bench_generate --device cpu --small --out /tmp/g.json     # smoke run, tiny model
    python -m tools.bench_generate --layers 4 --batches 1 --variants "ours bf16 cudagraphs,ours fp8 scaledmm cudagraphs"
        # the 1B model's GEMM shapes in 4 layers: a quick decode ratio
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback

import torch

__all__ = ["main", "build_model", "VARIANTS", "DEFAULT_VARIANTS", "variant_options"]

VARIANTS = ("hf eager bf16", "hf static compile", "ours bf16", "ours bf16 cudagraphs", "ours bf16 compile+cg",
            "ours fp8", "ours fp8 cudagraphs", "ours fp8 compile+cg", "ours fp8 scaledmm cudagraphs",
            "ours fp8 scaledmm compile+cg", "ours fp8 weightonly", "ours fp8 weightonly compile+cg",
            "ours bf16 kv8 cudagraphs",
            "ours bf16 cdt compile+cg", "ours fp8 weightonly cdt compile+cg")
DEFAULT_VARIANTS = ("hf eager bf16", "hf static compile", "ours bf16 cudagraphs", "ours bf16 compile+cg",
                    "ours fp8 cudagraphs", "ours fp8 scaledmm cudagraphs", "ours fp8 weightonly compile+cg")
"""What runs without --variants: the baselines, ours bf16 and the FP8 decode kernels (the other variants by name)."""


def variant_options(name: str) -> dict:
    """rewriter.convert keyword arguments and the decode backend of one of our variants."""
    import rewriter

    backend = ("compile+cuda_graphs" if name.endswith("compile+cg") else
               "cuda_graphs" if name.endswith("cudagraphs") else "eager")
    options = {"precision": "fp8" if " fp8" in name else "bf16", "kv_cache": "fp8" if " kv8" in name else None}
    if options["precision"] == "fp8":
        fp8 = {"fused_quantization": backend.startswith("compile")}  # what the cost model estimates for
        if " scaledmm" in name or " weightonly" in name:
            fp8.update(decode_gemms="scaled_mm" if " scaledmm" in name else "weight_only", min_speedup=0.0)
        options["fp8"] = rewriter.Fp8Options(**fp8)
    tuned = {"max_autotune": True, "triton.cudagraphs": False, "coordinate_descent_tuning": True}
    return {"convert": options, "backend": backend, "inductor_options": tuned if " cdt " in name else None}


def build_model(device: str, small: bool, layers: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    if small:
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    else:  # the shape of Llama 3.2 1B (untied head: 1.5B parameters with the separate LM head)
        config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers or 16,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                             max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False)
    config.pad_token_id = 0
    config.eos_token_id = None
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    return model.eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def _bytes(module) -> int:
    unique = {id(t): t for t in list(module.parameters()) + list(module.buffers())}.values()
    return sum(t.numel() * t.element_size() for t in unique)


def _hf_runner(model, static: bool, max_cache_len: int | None = None):
    def generate(ids, mask, new):
        # one cache size for every call (the TTFT call too): no recompilation between calls
        kw = {"cache_implementation": "static", "max_cache_len": max_cache_len} if static else {}
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, **kw)
    return generate


def _ours_runner(fast):
    def generate(ids, mask, new):
        return fast.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return generate


def _weight_kernels(fast) -> dict:
    """{"triton_gemv" | "reference": weight-only GEMMs of the decode graph} from the FP8 plan's records."""
    from rewriter import meta

    counts: dict = {}
    for node in fast.decode_graph.graph.nodes:
        record = meta.get(node, meta.FP8) or {}
        if record.get("use") and record.get("kernel") == "weight_only":
            key = record.get("weight_kernel", "reference")
            counts[key] = counts.get(key, 0) + 1
    return counts


def build_variants(model, names, device: str, max_cache_len: int, notes: dict, params: dict | None = None,
                   deadline: float | None = None) -> dict:
    """Runners of the variants `names`; `params` gets each one's parameter bytes. A variant not started by
    `deadline` (time.perf_counter()) is skipped with a note, so the run stays within its time budget."""
    import rewriter

    runners = {}
    params = {} if params is None else params
    for name in names:
        if deadline is not None and time.perf_counter() > deadline:
            notes[name] = "skipped: time budget (--budget-s) spent before it was built"
            continue
        try:
            if name.startswith("hf"):
                params[name] = _bytes(model)
            if name == "hf eager bf16":
                runners[name] = _hf_runner(model, static=False)
            elif name == "hf static compile":
                if device == "cpu":
                    notes[name] = "skipped on CPU (reduce-overhead needs CUDA graphs)"
                    continue
                # transformers 5: a static cache on a GPU makes generate() compile the decode forward
                # (CompileConfig: mode="reduce-overhead", i.e. CUDA graphs), the documented recipe
                runners[name] = _hf_runner(model, static=True, max_cache_len=max_cache_len)
            else:
                chosen = variant_options(name)
                backend = chosen["backend"]
                if backend != "eager" and device == "cpu":
                    notes[name] = "skipped on CPU (CUDA graphs)"
                    continue
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                start = time.perf_counter()
                example = torch.ones(8, max_cache_len - 1, dtype=torch.long, device=device)  # the workload
                fast = rewriter.convert(model, {"input_ids": example}, generate=True, max_cache_len=max_cache_len,
                                        **chosen["convert"])
                seconds = time.perf_counter() - start
                record = {"convert_s": round(seconds, 2), "converted_bytes": _bytes(fast)}
                if device.startswith("cuda"):
                    record["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
                    record["peak_over_converted"] = round(record["peak_extra_bytes"] / record["converted_bytes"], 3)
                record["generation"] = fast.record.get("generation")
                planned = _weight_kernels(fast)
                if planned:  # what the plan expects each weight-only decode GEMM to run (fp8_decode's record)
                    record["weight_only_kernels"] = planned
                notes[name] = record
                fast.set_decode_backend(backend, inductor_options=chosen["inductor_options"])
                runners[name] = _ours_runner(fast)
                params[name] = _bytes(fast)
        except Exception as exc:  # a variant that cannot be built is reported, the others run
            notes[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            traceback.print_exc(file=sys.stderr)
    return runners


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny model, short prompt (CPU smoke run)")
    p.add_argument("--prompt", type=int, default=None, help="prompt length (512; --small: 16)")
    p.add_argument("--new", type=int, default=None, help="new tokens (128; --small: 8)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers of the 1B shape (16); fewer keep its GEMM shapes and convert faster")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall-clock budget: variants not built by 60%% of it or not warmed up (compiled) by 80%% "
                        "are skipped, timing rounds stop at it (at least one round runs)")
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    prompt = args.prompt or (16 if args.small else 512)
    new = args.new or (8 if args.small else 128)
    batches = [int(b) for b in args.batches.split(",")]
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"error: unknown variants {unknown}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2

    from rewriter.runtime import fp8_gemv

    start = time.perf_counter()
    model = build_model(args.device, args.small, args.layers)
    vocab = model.config.vocab_size
    results = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               "torch": torch.__version__, "prompt": prompt, "new_tokens": new, "model_bytes": _bytes(model),
               "layers": model.config.num_hidden_layers,
               "notes": {}, "runs": {}, "memory": {}}
    params: dict = {}
    runners = build_variants(model, names, args.device, prompt + new, results["notes"], params,
                             deadline=start + 0.6 * args.budget_s)
    cuda = args.device.startswith("cuda")
    g = torch.Generator().manual_seed(0)
    inputs = {b: torch.randint(1, vocab, (b, prompt), generator=g).to(args.device) for b in batches}
    times: dict = {(n, b): {"ttft": [], "total": []} for n in runners for b in batches}
    tokens: dict = {}
    for name, run in list(runners.items()):  # warm-up (compiles, captures) before any timing
        memory = results["memory"][name] = {"param_bytes": params.get(name), "peak_bytes": None,
                                            "peak_run_bytes": None}
        if time.perf_counter() > start + 0.8 * args.budget_s:
            results["notes"][name] = "skipped: time budget (--budget-s) spent before its warm-up (compile)"
            del runners[name]
            continue
        try:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            fp8_gemv.reset_routing_counts()
            for b in batches:
                ids = inputs[b]
                run(ids, torch.ones_like(ids), 1)
                tokens[(name, b)] = run(ids, torch.ones_like(ids), new)[:, prompt:].cpu()
            routes = fp8_gemv.routing_counts()
            note = results["notes"].get(name)
            if routes or (isinstance(note, dict) and note.get("weight_only_kernels")):
                # which kernel the weight-only FP8 GEMMs ran (compiled: what the decode graph launches); a graph
                # that inductor loads from its cache makes no decision, so the plan's expectation is printed too
                if isinstance(note, dict):
                    note["fp8_weight_linear_routes"] = routes
                ran = "; ".join(f"{route} ({count} calls or traces)" for route, count in sorted(routes.items()))
                print(f"[bench_generate] {name}: rewriter::fp8_weight_linear ran {ran or 'none recorded (cached graph?)'}"
                      f"; planned {note.get('weight_only_kernels') if isinstance(note, dict) else '?'}",
                      file=sys.stderr, flush=True)
            if cuda:
                torch.cuda.synchronize()
                memory["peak_bytes"] = torch.cuda.max_memory_allocated()
                memory["peak_run_bytes"] = memory["peak_bytes"] - before
        except Exception as exc:
            results["notes"][name] = f"failed in warm-up: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            traceback.print_exc(file=sys.stderr)
            del runners[name]
    for round_ in range(args.repeats):
        if round_ and time.perf_counter() > start + args.budget_s:
            results["notes"]["repeats"] = f"stopped after {round_} of {args.repeats} rounds: time budget"
            break
        for b in batches:
            ids = inputs[b]
            mask = torch.ones_like(ids)
            for name, run in runners.items():
                ttft, _ = _timed(lambda: run(ids, mask, 1), args.device)
                total, _ = _timed(lambda: run(ids, mask, new), args.device)
                times[(name, b)]["ttft"].append(ttft)
                times[(name, b)]["total"].append(total)
    for (name, b), t in times.items():
        if name not in runners:
            continue
        ttft, total = statistics.median(t["ttft"]), statistics.median(t["total"])
        memory = results["memory"].get(name, {})
        row = {"batch": b, "ttft_ms": round(1e3 * ttft, 2), "param_bytes": memory.get("param_bytes"),
               "peak_bytes": memory.get("peak_bytes"),
               "decode_tokens_per_s": round((new - 1) * b / max(total - ttft, 1e-9), 1),
               "tokens_per_s": round(new * b / total, 1)}
        reference = tokens.get(("hf eager bf16", b))
        if reference is not None and (name, b) in tokens:
            row["same_tokens_as_hf_eager"] = float((tokens[(name, b)] == reference).float().mean())
        results["runs"][f"{name} b{b}"] = row
    for key, row in results["runs"].items():  # against ours bf16 with the same decode backend
        name = key.rsplit(" b", 1)[0]
        suffix = next((s for s in (" compile+cg", " cudagraphs") if name.endswith(s)), "")
        runs = results["runs"]
        ours = runs.get(f"ours bf16{suffix} b{row['batch']}") or runs.get(f"ours bf16 b{row['batch']}")
        if ours:
            row["decode_vs_ours_bf16"] = round(row["decode_tokens_per_s"] / ours["decode_tokens_per_s"], 3)

    def mb(value) -> str:
        return "-" if value is None else f"{value / 2 ** 20:.0f}"

    print(f"{'variant':36s} {'TTFT ms':>9s} {'decode tok/s':>13s} {'tok/s':>9s} {'vs ours bf16':>13s} "
          f"{'params MiB':>11s} {'peak MiB':>9s}")
    for key, row in results["runs"].items():
        print(f"{key:36s} {row['ttft_ms']:>9.1f} {row['decode_tokens_per_s']:>13.1f} {row['tokens_per_s']:>9.1f} "
              f"{row.get('decode_vs_ours_bf16', float('nan')):>13.3f} {mb(row['param_bytes']):>11s} "
              f"{mb(row['peak_bytes']):>9s}")
    results["seconds"] = round(time.perf_counter() - start, 1)
    print(f"total {results['seconds']} s")
    for name, note in results["notes"].items():
        print(f"{name}: {note}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
