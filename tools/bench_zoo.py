"""GPU zoo: ours vs torch.autocast vs a blanket 16-bit cast, on many architectures, eager and compiled.

Every architecture is built with its library's default configuration (decoder LMs with fewer layers, so
one process holds them all), random weights, and timed round-robin in one process per model: strict fp32
(TF32 off), autocast, ours (rewriter.convert), and with `--modes compile` also autocast + torch.compile,
torch.compile(model.to(dtype)) and ours compiled. Errors are relative L2 against strict fp32 on the same
input (`rewriter.measure.rel_l2(reference, candidate)`). A row that fails records the error and the run
goes on.

    python -m tools.bench_zoo --device cuda --dtypes bf16,fp16 --modes eager --out zoo_eager.json
    python -m tools.bench_zoo --device cuda --dtypes bf16 --modes eager,compile --models swin_t,llama6 --out z.json
    python -m tools.bench_zoo --device cpu --models tiny_mlp --repeats 2      # smoke test

On a machine with many cores, `--jobs N` runs N processes on disjoint shares of --models with one lock
file: each converts and compiles while another times, and only the holder of the lock times (timings never
overlap); their rows are merged into --out. On the H200 (16 cores), 6 jobs ran 21 models in 8 minutes:

    python -m tools.bench_zoo --device cuda --dtypes bf16,fp16 --modes eager,compile --compile-dtypes bf16 \
        --jobs 6 --out zoo_h200.json

Columns of the summary: x_autocast = autocast ms / ours ms (same dtype, same mode), err_ratio = our error /
autocast's error.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import fcntl
import gc
import json
import os
import platform
import sys
import time
import traceback
from typing import Callable

import torch
import torch.nn as nn

import rewriter
from rewriter import measure

__all__ = ["MODELS", "build", "run_model", "main"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _tv(name: str, batch: int = 32, size: int = 224):
    def make():
        import torchvision
        return getattr(torchvision.models, name)(), (torch.randn(batch, 3, size, size),), {}
    return make


def _timm(name: str, batch: int = 32, size: int = 224):
    def make():
        import timm
        return timm.create_model(name, pretrained=False), (torch.randn(batch, 3, size, size),), {}
    return make


def _hf(config_cls: str, model_cls: str, batch: int = 16, seq: int = 256, vocab_key: str = "vocab_size",
        image: int | None = None, **overrides):
    def make():
        import transformers
        config = getattr(transformers, config_cls)(**overrides)
        model = getattr(transformers, model_cls)(config)
        if image is not None:
            return model, (), {"pixel_values": torch.randn(batch, 3, image, image)}
        vocab = getattr(config, vocab_key, 1000) or 1000
        ids = torch.randint(0, min(vocab, 30000), (batch, seq))
        return model, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return make


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.LayerNorm(128), nn.Linear(128, 16))

    def forward(self, x):
        return self.net(x).softmax(-1)


MODELS: dict[str, Callable] = {
    "tiny_mlp": lambda: (TinyMLP(), (torch.randn(8, 64),), {}),
    # torchvision
    "resnet50": _tv("resnet50"), "mobilenet_v3_large": _tv("mobilenet_v3_large"),
    "efficientnet_b0": _tv("efficientnet_b0"), "convnext_tiny": _tv("convnext_tiny"),
    "swin_t": _tv("swin_t"), "vit_b_16": _tv("vit_b_16", batch=64), "regnet_y_1_6gf": _tv("regnet_y_1_6gf"),
    "densenet121": _tv("densenet121"), "resnext50_32x4d": _tv("resnext50_32x4d"),
    # timm
    "timm_deit_small": _timm("deit_small_patch16_224", batch=64), "timm_resnet50d": _timm("resnet50d"),
    "timm_mixer_b16": _timm("mixer_b16_224"), "timm_convnext_small": _timm("convnext_small"),
    # transformers encoders
    "bert": _hf("BertConfig", "BertModel", batch=32, seq=128),
    "roberta": _hf("RobertaConfig", "RobertaModel", batch=32, seq=128),
    "distilbert": _hf("DistilBertConfig", "DistilBertModel", batch=32, seq=128),
    "albert": _hf("AlbertConfig", "AlbertModel", batch=32, seq=128),
    "electra": _hf("ElectraConfig", "ElectraModel", batch=32, seq=128),
    "deberta_v2": _hf("DebertaV2Config", "DebertaV2Model", batch=16, seq=128),
    "vit_hf": _hf("ViTConfig", "ViTModel", batch=64, image=224),
    # transformers decoders (default widths, fewer layers)
    "gpt2": _hf("GPT2Config", "GPT2Model", batch=8, seq=512),
    "llama6": _hf("LlamaConfig", "LlamaModel", batch=8, seq=512, hidden_size=1024, intermediate_size=2816,
                  num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
    "mistral4": _hf("MistralConfig", "MistralModel", batch=4, seq=512, num_hidden_layers=4),
    "qwen2_4": _hf("Qwen2Config", "Qwen2Model", batch=4, seq=512, num_hidden_layers=4),
    "t5_encoder": _hf("T5Config", "T5EncoderModel", batch=16, seq=256),
}


def build(name: str):
    """(model in eval mode, args, kwargs) of a zoo entry, on the CPU."""
    torch.manual_seed(0)
    model, args, kwargs = MODELS[name]()
    return model.eval(), args, kwargs


def _to(value, device):
    return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, value)


def _cast_floats(value, dtype):
    return torch.utils._pytree.tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, value)


def _strict_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@contextlib.contextmanager
def _exclusive(lock: str | None):
    """Hold `lock` (a file) while timing, so processes sharing the GPU never time at the same moment."""
    if not lock:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_model(name: str, device: torch.device, dtypes: list[str], modes: list[str], repeats: int,
              warmup: int, static: bool = False, lock: str | None = None,
              compile_dtypes: list[str] | None = None, dynamic_batch_variant: bool = False) -> list[dict]:
    """Rows (one per dtype and mode) for one zoo entry."""
    model, args, kwargs = build(name)
    model = model.to(device)
    args, kwargs = _to(args, device), _to(kwargs, device)
    with torch.no_grad():
        reference = model(*args, **kwargs)
    rows = []
    for dname in dtypes:
        dtype = _DTYPES[dname]
        variants: dict[str, Callable] = {"fp32": lambda: model(*args, **kwargs)}

        def autocast_call(m=model, dtype=dtype):
            with torch.autocast(device.type, dtype=dtype):
                return m(*args, **kwargs)

        variants["autocast"] = autocast_call
        start = time.perf_counter()
        ours = rewriter.convert(model, args, kwargs, precision=dname, static=static)
        convert_s = time.perf_counter() - start
        variants["ours"] = lambda g=ours: g(*args, **kwargs)
        dtype_modes = [m for m in modes if m == "eager" or compile_dtypes is None or dname in compile_dtypes]
        if "compile" in dtype_modes:
            compiled_auto = torch.compile(autocast_call)
            blanket = torch.compile(copy.deepcopy(model).to(dtype))
            ours_c = rewriter.convert(model, args, kwargs, precision=dname, backend="compile", static=static)
            variants["autocast+compile"] = compiled_auto
            low_args, low_kwargs = _cast_floats((args, kwargs), dtype)  # a blanket cast takes 16-bit inputs
            variants["compile(model.to)"] = lambda g=blanket: g(*low_args, **low_kwargs)
            variants["ours+compile"] = lambda g=ours_c: g(*args, **kwargs)
            if dynamic_batch_variant:  # the batch symbolic from the first compile (backend_options dynamic="batch")
                ours_b = rewriter.convert(model, args, kwargs, precision=dname, backend="compile", static=static,
                                          backend_options={"dynamic": "batch"})
                variants["ours+compile batch-dynamic"] = lambda g=ours_b: g(*args, **kwargs)
        errors = {}
        with torch.no_grad():
            for key, fn in variants.items():
                errors[key] = measure.compare(reference, fn())  # also the first (compiling) call
        with _exclusive(lock):
            times = measure.round_robin(variants, device=device, warmup=warmup, repeats=repeats)
        for mode in dtype_modes:
            pair = ("autocast", "ours") if mode == "eager" else ("autocast+compile", "ours+compile")
            base, mine = times[pair[0]].median_ms, times[pair[1]].median_ms
            err_a, err_o = errors[pair[0]].rel_l2, errors[pair[1]].rel_l2
            row = {"model": name, "dtype": dname, "mode": mode, "static": static, "convert_s": round(convert_s, 2),
                   "ms": {k: round(t.median_ms, 4) for k, t in times.items()},
                   "err": {k: e.rel_l2 for k, e in errors.items()},
                   "x_autocast": round(base / mine, 3),
                   "err_ratio": round(err_o / err_a, 3) if err_a > 0 else None}
            if mode == "compile":
                row["x_compile_blanket"] = round(times["compile(model.to)"].median_ms / mine, 3)
                if "ours+compile batch-dynamic" in times:  # > 1: the static first compile is faster
                    row["x_batch_dynamic"] = round(times["ours+compile batch-dynamic"].median_ms / mine, 3)
            rows.append(row)
            print(f"{name:22s} {dname} {mode:7s} x_autocast={row['x_autocast']:.2f} "
                  f"err ours/autocast={err_o:.2e}/{err_a:.2e}", flush=True)
        del variants, ours
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_zoo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=",".join(m for m in MODELS if m != "tiny_mlp"))
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--modes", default="eager", help="eager and/or compile, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile-dtypes", default=None,
                        help="dtypes the compile mode runs (default: every --dtypes), e.g. bf16")
    parser.add_argument("--static", action="store_true", help="convert with static=True (fixed input shapes)")
    parser.add_argument("--dynamic-batch-variant", action="store_true",
                        help="also time ours compiled with backend_options dynamic='batch' (column x_batch_dynamic)")
    parser.add_argument("--lock", default=None, help="a file held while timing (several processes, one GPU)")
    parser.add_argument("--out", help="JSON file for every row (rewritten after each model)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes, each with a share of --models, timing under one lock (see above)")
    args = parser.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    if args.jobs > 1:
        return _run_jobs(args, names, list(argv if argv is not None else sys.argv[1:]))
    device = torch.device(args.device)
    _strict_fp32()
    rows, failures = [], []
    record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "command": " ".join(["python -m tools.bench_zoo", *(argv if argv is not None else sys.argv[1:])]),
              "rows": rows, "failures": failures}
    compile_dtypes = args.compile_dtypes.split(",") if args.compile_dtypes else None
    for name in names:
        try:
            rows += run_model(name, device, args.dtypes.split(","), args.modes.split(","), args.repeats,
                              args.warmup, static=args.static, lock=args.lock, compile_dtypes=compile_dtypes,
                              dynamic_batch_variant=args.dynamic_batch_variant)
        except Exception as exc:  # one architecture's failure is a row, not the end of the run
            failures.append({"model": name, "error": f"{type(exc).__name__}: {exc}"[:2000],
                             "trace": traceback.format_exc()[-3000:]})
            print(f"{name:22s} FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        if args.out:  # after every model: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(record, f, indent=1)
    slow = [r for r in rows if r["x_autocast"] < 1.0]
    print(f"{len(rows)} rows, {len(failures)} failures, {len(slow)} rows slower than autocast")
    return 0


def _run_jobs(args, names: list[str], argv: list[str]) -> int:
    """--jobs N: N child processes on disjoint model lists, one timing lock, their rows merged into --out."""
    import subprocess
    import tempfile

    keep = []
    skip = False
    for item in argv:  # the parent's own options go; every other option passes through
        if skip:
            skip = False
        elif item in ("--jobs", "--models", "--out", "--lock"):
            skip = True
        elif not item.startswith(("--jobs=", "--models=", "--out=", "--lock=")):
            keep.append(item)
    groups = [names[i::args.jobs] for i in range(args.jobs) if names[i::args.jobs]]
    with tempfile.TemporaryDirectory() as tmp:
        lock = os.path.join(tmp, "timing.lock")
        # beside --out when given: a run cut short by a time limit keeps each process's rows on disk
        parts = [f"{args.out}.part{i}.json" if args.out else os.path.join(tmp, f"part{i}.json")
                 for i in range(len(groups))]
        children = [subprocess.Popen([sys.executable, "-m", "tools.bench_zoo", *keep, "--models", ",".join(group),
                                      "--lock", lock, "--out", parts[i]])
                    for i, group in enumerate(groups)]
        codes = [child.wait() for child in children]
        record = {"command": " ".join(["python -m tools.bench_zoo", *argv]), "rows": [], "failures": []}
        for i, group in enumerate(groups):
            try:
                with open(parts[i]) as f:
                    part = json.load(f)
            except (OSError, ValueError):
                record["failures"] += [{"model": m, "error": f"its process ended (exit {codes[i]}) before a row"}
                                       for m in group]
                continue
            record.update({k: part[k] for k in ("device", "torch", "date")})
            done = {r["model"] for r in part["rows"]} | {f["model"] for f in part["failures"]}
            record["rows"] += part["rows"]
            record["failures"] += part["failures"] + [
                {"model": m, "error": f"its process ended (exit {codes[i]}) before this model's row"}
                for m in group if m not in done]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
        for part in parts:
            if os.path.exists(part):
                os.remove(part)
    print(f"{len(record['rows'])} rows, {len(record['failures'])} failures from {len(groups)} processes")
    return 0 if all(code == 0 for code in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
