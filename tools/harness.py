"""What every benchmark in tools/ shares: timing, the error metric, the model zoo, the JSON writer.

    from tools import harness

    model, args, kwargs = harness.build_model("bert", small=True, device="cpu")
    ref = model(*args, **kwargs)
    err = harness.rel_l2(ref, converted(*args, **kwargs))        # reference FIRST, float64
    harness.round_robin([(row, fn), ...], device=dev, iters=30, repeats=3)   # row["ms"], row["samples_ms"]
    harness.write_json("out.json", {"results": rows}, device=dev, argv=argv)  # + "run": device, torch, ...

Timing is `rewriter.measure` (CUDA events on a GPU, perf_counter on the CPU): variants that are built and
warmed up first are timed in rounds of one block each (v1, v2, ..., v1, v2, ...), so a slow spell of a
shared machine lands on every variant instead of one. Errors are `rewriter.measure.rel_l2` on the
model's main output tensor (last_hidden_state of a Hugging Face model, the first of a tuple).

The zoo builds each named model once, here, from its config with random weights (seed 0): full size as
measured on the H100, or tiny with `small=True` for CPU smoke runs.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import platform
import shlex
import sys
from importlib import metadata
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from rewriter import measure

__all__ = ["output_tensor", "rel_l2", "Timer", "round_robin", "set_tf32", "tf32", "param_bytes", "free",
           "device_name", "package_version", "run_info", "write_json", "LlamaMLP", "llama_mlp", "MODELS", "hf_config",
           "default_shape", "build_model"]


# ------------------------------------------------------------------------------------------- metrics

def output_tensor(out) -> torch.Tensor:
    """The main tensor of a model output: itself, `last_hidden_state`, or the first item of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, (tuple, list)) and out:
        return output_tensor(out[0])
    if type(out).__module__ == "numpy":
        return torch.from_numpy(out)
    raise TypeError(f"no output tensor in {type(out).__name__}")


def rel_l2(reference, candidate) -> float:
    """||candidate - reference|| / ||reference|| of the main output tensors (numpy arrays too), in
    float64; nan when either holds non-finite values (rewriter.measure.compare says why)."""
    return measure.rel_l2(output_tensor(reference), output_tensor(candidate))


# -------------------------------------------------------------------------------------------- timing

def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


@contextlib.contextmanager
def tf32(on: bool):
    """TF32 matmuls and convolutions on (or off) inside the block, off after it."""
    set_tf32(on)
    try:
        yield
    finally:
        set_tf32(False)


class Timer:
    """`timer(fn)`: ms per call, the median of `repeats` blocks of `iters` calls after `warmup` calls;
    `timer.block(fn)`: one block of `iters` calls, no warm-up (for round-robin timing)."""

    def __init__(self, device, warmup: int, iters: int, repeats: int):
        self.device, self.warmup, self.iters, self.repeats = torch.device(device), warmup, iters, repeats

    def __call__(self, fn: Callable[[], Any]) -> float:
        return measure.measure(fn, device=self.device, warmup=self.warmup, repeats=self.repeats,
                               iters=self.iters).median_ms

    def block(self, fn: Callable[[], Any]) -> float:
        with torch.no_grad():
            return measure.time_block(fn, self.device, self.iters)


def round_robin(live: list, *, device, iters: int, repeats: int, key: str = "ms", no_grad: bool = True,
                on_round: Callable[[int], None] | None = None) -> None:
    """Time every built and warmed-up (row, fn) in `repeats` rounds of one block of `iters` calls each;
    row[key] = the median of its blocks (ms per call), row["samples_ms"] = the blocks. A row whose
    "variant" is "tf32" runs with TF32 on. `no_grad=False` for training steps; `on_round(i)` before
    round i (progress)."""
    if not live:
        return
    names = [str(i) for i in range(len(live))]
    rows = dict(zip(names, (row for row, _ in live)))

    def context(name: str):
        return tf32(rows[name].get("variant") == "tf32")

    times = measure.round_robin(list(zip(names, (fn for _, fn in live))), device=device, warmup=0,
                                repeats=repeats, iters=iters, no_grad=no_grad, context=context,
                                on_round=on_round)
    for name, timing in times.items():
        rows[name][key] = timing.median_ms
        rows[name]["samples_ms"] = list(timing.samples_ms)


def param_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers, each tensor counted once."""
    seen = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in seen.values())


def free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ the JSON

def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def package_version(*names: str) -> str | None:
    """'name version' of the first installed distribution of `names`, or None."""
    for name in names:
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def run_info(device, argv: list[str] | None = None, module: str | None = None) -> dict:
    """Device, torch version, date (UTC) and the command line of this run."""
    module = module or _main_module()
    args = list(sys.argv[1:] if argv is None else argv)
    return {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": shlex.join(["python", "-m", module, *map(str, args)])}


def _main_module() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None and spec.name.startswith("tools.") else "tools.?"


def write_json(path, payload, *, device, argv: list[str] | None = None, module: str | None = None) -> None:
    """Write `payload` (a dict, or a list stored under "rows") with a "run" record (run_info) to
    `path`, atomically: a run cut short keeps the last complete file."""
    body = dict(payload) if isinstance(payload, dict) else {"rows": payload}
    body = {"run": run_info(device, argv, module), **body}
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(body, fh, indent=1, default=str)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- the zoo

class LlamaMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases, as in Llama."""

    def __init__(self, hidden: int = 4096, intermediate: int = 14336):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


MODELS = ("resnet50", "vit_b_16", "bert", "bert_base", "bert_large", "gpt2", "gpt2_medium", "llama_mlp")

_TINY = {"bert": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
         "gpt2": dict(n_embd=64, n_layer=2, n_head=4)}
_FULL = {"bert": {}, "bert_base": {},
         "bert_large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
         "gpt2": {}, "gpt2_medium": dict(n_embd=1024, n_layer=24, n_head=16)}
# (batch, sequence length or image size): full size as measured, small for CPU smoke runs
_SHAPES = {"resnet50": ((128, 224), (4, 64)), "vit_b_16": ((64, 224), (4, 32)), "bert": ((32, 128), (4, 32)),
           "bert_base": ((32, 128), (4, 32)), "bert_large": ((32, 384), (4, 32)), "gpt2": ((8, 512), (4, 32)),
           "gpt2_medium": ((8, 1024), (4, 32)), "llama_mlp": ((8, 1024), (2, 16))}


def llama_mlp(small: bool = False) -> LlamaMLP:
    """The zoo's Llama MLP: hidden 4096, intermediate 14336 (small: 64, 224), random init."""
    return LlamaMLP(64, 224) if small else LlamaMLP(4096, 14336)


def _unknown(name: str, choices) -> SystemExit:
    return SystemExit(f"unknown model {name!r}: choose from {', '.join(choices)}")


def hf_config(name: str, small: bool = False, **overrides):
    """The transformers config of a BERT or GPT-2 in the zoo (GPT-2 without a KV cache), with overrides."""
    from transformers import BertConfig, GPT2Config

    if name not in _FULL:
        raise _unknown(name, _FULL)
    family = "bert" if name.startswith("bert") else "gpt2"
    kw = dict(_TINY[family] if small else _FULL[name])
    if family == "gpt2":
        kw["use_cache"] = False
    kw.update(overrides)
    return (BertConfig if family == "bert" else GPT2Config)(**kw)


def default_shape(name: str, small: bool = False) -> tuple[int, int]:
    """(batch, sequence length or image size) a model of the zoo is measured at."""
    if name not in _SHAPES:
        raise _unknown(name, _SHAPES)
    return _SHAPES[name][1 if small else 0]


def build_model(name: str, *, small: bool = False, device="cpu", batch: int | None = None,
                seq: int | None = None, seed: int = 0):
    """(model, args, kwargs): a model of MODELS, random-init (torch seed `seed`), fp32, eval mode, and
    its inputs, on `device`. Token ids are drawn from a generator seeded with `seed`; BERT also gets an
    all-ones attention mask; torchvision's zero-initialised ViT head is removed (compare features).
    `small` swaps in tiny configs (ResNet-18 for ResNet-50)."""
    if name not in MODELS:
        raise _unknown(name, MODELS)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    b, s = default_shape(name, small)
    b, s = batch or b, seq or s
    args, kwargs = (), {}
    if name == "llama_mlp":
        model = llama_mlp(small)
        args = (torch.randn(b, s, model.gate_proj.in_features, generator=g),)
    elif name in ("resnet50", "vit_b_16"):
        import torchvision

        if name == "resnet50":
            model = torchvision.models.resnet18() if small else torchvision.models.resnet50()
        else:
            model = (torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                          hidden_dim=64, mlp_dim=128)
                     if small else torchvision.models.vit_b_16())
            model.heads = nn.Identity()
        args = (torch.randn(b, 3, s, s, generator=g),)
    else:
        from transformers import BertModel, GPT2Model

        cfg = hf_config(name, small)
        model = (BertModel if name.startswith("bert") else GPT2Model)(cfg)
        ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
        kwargs = {"input_ids": ids}
        if name.startswith("bert"):
            kwargs["attention_mask"] = torch.ones_like(ids)
    device = torch.device(device)
    return (model.eval().to(device), tuple(a.to(device) for a in args),
            {k: v.to(device) for k, v in kwargs.items()})
