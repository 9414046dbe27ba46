"""Converted causal language models that generate: a prefill and a decode graph over a static KV cache.

    >>> fast = rewriter.convert(causal_lm, {"input_ids": ids}, precision="bf16", generate=True)
    >>> fast.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    >>> logits = fast.prefill(ids, mask); logits = fast.decode(logits.argmax(-1))   # own loop

The Hugging Face decoder is exported twice around one small step module whose KV cache is a list of
graph inputs, one [batch, kv_heads, max_cache_len, head_dim] tensor per layer for keys and one for
values, in the computing precision (bf16 for bf16 and fp8, fp16 for fp16):

    prefill(input_ids[B, S], position_ids[B, S], cache_position[S], mask[B, 1, S, C], cache) -> logits[B, V]
    decode (input_ids[B, 1], position_ids[B, 1], cache_position[1], mask[B, 1, 1, C], cache) -> logits[B, V]

S (prompt length, 2..C) and B are dynamic in the prefill graph; the decode graph has one token and
fixed shapes apart from the batch (CUDA graphs and torch.compile see the same shapes on every step).
The attention layers write their new keys and values with `index_copy_` at `cache_position`; the
mask is built outside the graph from the padding mask (left padding works, padded keys are never
attended); it enters the graph as booleans, which SDPA attention takes as they are and eager attention
(Gemma2's default) takes as an additive 0 / finfo.min mask made inside the graph (mask_kind). Both
graphs go through the passes of rewriter.pipeline.PASS_TABLE with one configuration, so they make the same precision decisions; afterwards (this module, not a table pass: it exists only
for these graphs) the functional `index_copy` + write-back `copy_` that export makes of the cache
update becomes one in-place `index_copy_` (node.meta[REWRITTEN] says so): a step writes S slots
instead of copying the whole cache twice per layer.

FP8 KV cache (opt-in, `kv_cache="fp8"`): keys and values stored as float8_e4m3fn (one byte, held as
uint8 bits because index_copy has no float8 kernel), one fp32 scale per layer, key/value and KV head,
set by every prefill from the prompt (amax x 2 / 448) and kept by the decode steps (a later value
beyond twice the prompt's largest saturates at 448 x scale). Attention reads the cache dequantized to
the computing precision, so the cache takes half the memory of bf16 but a step is not faster without
an attention kernel that reads FP8. Stated error (tests/test_generation.py): next-token logits within
0.25 relative L2 of fp32 at every step of the trained test decoder (measured 0.14; bf16 autocast
0.015), 0.1 on average, greedy tokens unchanged.

Weights: both graphs read the same tensors (one copy, shared after conversion), owned by the
converted model, never by the user's model. A model already in bf16 is never copied to fp32: export
and the passes read its tensors as they are, and the only copies made are of tensors the passes cast
(none for bf16 -> bf16) plus one clone per tensor still shared with the user's model.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
import torch.nn as nn

from rewriter import autocast_regions, meta
from rewriter.config import ConvertConfig
from rewriter.errors import ConfigError
from rewriter.generation_support import (SUPPORTED_MODEL_TYPES, cache_argument, check_room, check_supported,
                                         example_shape, mask_kind, wants_generation)

__all__ = ["SUPPORTED_MODEL_TYPES", "wants_generation", "check_supported", "StepGraphs", "convert_steps",
           "capture_steps", "cache_in_place", "share_weights", "own_weights", "new_cache", "new_scales",
           "step_mask", "mask_kind", "cache_argument", "check_room", "example_shape"]

_A = torch.ops.aten


FP8_MAX = 448.0     # largest float8_e4m3fn value
FP8_HEADROOM = 2.0  # calibrated scales leave room for keys and values twice the prompt's largest


class _StaticKV:
    """The cache object the decoder sees while it is exported: update() writes the new keys and values
    into the cache tensors at `positions`, in place, and returns the whole cache in the dtype the
    attention computes in (a cast the passes fold away when attention runs in the cache's dtype).

    With `scales` (FP8 cache): the cache tensors are uint8 holding float8_e4m3fn bits (index_copy has
    no float8 kernel); a value is stored as e4m3(x / scale) with one fp32 scale per layer, key/value
    and KV head. With `calibrate` (the prefill) the scales are first set from the prompt:
    amax over batch, positions and head_dim x FP8_HEADROOM / 448.
    """

    is_compileable = True

    def __init__(self, tensors: list[torch.Tensor], positions: torch.Tensor, scales=None, calibrate=False):
        self.tensors, self.positions, self.scales, self.calibrate = tensors, positions, scales, calibrate

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        out = []
        for i, states in ((2 * layer_idx, key_states), (2 * layer_idx + 1, value_states)):
            cache = self.tensors[i]
            if self.scales is None:
                cache.index_copy_(2, self.positions, states.to(cache.dtype))
                out.append(cache.to(states.dtype))
                continue
            scale = self.scales[i]
            wide = states.float()
            if self.calibrate:
                amax = wide.abs().amax(dim=(0, 2, 3), keepdim=True)
                scale.copy_((amax * (FP8_HEADROOM / FP8_MAX)).clamp_min(1e-12))
            stored = (wide / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            cache.index_copy_(2, self.positions, stored.view(torch.uint8))
            out.append((cache.view(torch.float8_e4m3fn).float() * scale).to(states.dtype))
        return out[0], out[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


_STEP_ATTR = "lm"  # the attribute of _Step that holds the user's model


class _Step(nn.Module):
    """One generation step of `lm` over the cache: logits of the last position only (the prefill of a
    512-token prompt does not compute 512 x vocabulary logits)."""

    def __init__(self, lm: nn.Module, calibrate: bool = False):
        super().__init__()
        self.lm, self.calibrate = lm, calibrate
        self.additive = mask_kind(lm) == "additive"

    def forward(self, input_ids, position_ids, cache_position, mask, cache: list[torch.Tensor],
                scales: list[torch.Tensor] | None = None):
        kv = _StaticKV(cache, cache_position, scales, self.calibrate)
        if self.additive:  # eager attention adds its mask to the scores (a boolean one would add 0 or 1)
            dtype = self.lm.get_input_embeddings().weight.dtype
            mask = torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), torch.finfo(dtype).min)
        out = self.lm(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                      use_cache=True, logits_to_keep=1, **{cache_argument(self.lm): kv})
        logits = out["logits"] if isinstance(out, dict) else out[0]
        return logits[:, -1]


def cache_layout(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a Hugging Face decoder config."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer")
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head")
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd")
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return int(layers), int(kv_heads), int(head_dim)


def new_cache(config, batch: int, max_cache_len: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
    """Key and value tensors of every layer; an FP8 cache (dtype float8_e4m3fn) is held as uint8 bits."""
    layers, kv_heads, head_dim = cache_layout(config)
    dtype = torch.uint8 if dtype == torch.float8_e4m3fn else dtype
    return [torch.zeros(batch, kv_heads, max_cache_len, head_dim, dtype=dtype, device=device)
            for _ in range(2 * layers)]


def new_scales(config, device) -> list[torch.Tensor]:
    """One fp32 scale per layer, key/value and KV head ([1, kv_heads, 1, 1]) of an FP8 cache."""
    layers, kv_heads, _ = cache_layout(config)
    return [torch.ones(1, kv_heads, 1, 1, dtype=torch.float32, device=device) for _ in range(2 * layers)]


def step_mask(valid: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """Boolean mask [B, 1, S, C]: query i (at slot cache_position[i]) attends key slot j when j is at or
    before it and holds a real token; every query attends its own slot, so a padded query row is never
    empty (its output is discarded, an empty row would be NaN)."""
    slots = torch.arange(valid.shape[1], device=valid.device)
    before = slots[None, :] <= cache_position[:, None]                     # [S, C]
    own = slots[None, :] == cache_position[:, None]
    return (before[None] & (valid[:, None, :] | own[None]))[:, None]      # [B, 1, S, C]


@dataclasses.dataclass
class StepGraphs:
    """The converted prefill and decode graphs of one causal LM and what they were made with."""

    prefill: fx.GraphModule
    decode: fx.GraphModule
    cache_dtype: torch.dtype
    max_cache_len: int
    record: dict


def _export(step: _Step, args: tuple, dynamic_shapes) -> fx.GraphModule:
    # The model's own autocast regions are kept as capture keeps them for the forward graph: a rotary
    # embedding computed under `maybe_autocast(enabled=False)` (transformers <= 5.17's Llama family:
    # `freqs = inv_freq @ position_ids`) stays fp32 here too; plain run_decompositions would inline the
    # region without a trace and its matmul would turn 16-bit in the prefill and decode graphs only.
    with autocast_regions.visible():
        ep = torch.export.export(step, args, dynamic_shapes=dynamic_shapes, strict=False)
    gm = autocast_regions.decompose(ep).module()
    _user_module_paths(gm)
    from rewriter.capture import _views_to_reshapes

    _views_to_reshapes(gm)
    return gm


def _user_module_paths(gm: fx.GraphModule) -> None:
    """Module paths as in the user's model: drop the _Step wrapper and its `lm` attribute from every
    node's nn_module_stack ("lm.model.layers.0.mlp" -> "model.layers.0.mlp"), so overrides, region
    records and `rewrite diff` name the modules as they are named in the model that was converted."""
    def user(path: str) -> str | None:
        if path in ("", _STEP_ATTR):
            return None
        return path[len(_STEP_ATTR) + 1:] if path.startswith(_STEP_ATTR + ".") else path

    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {key: (user(entry[0]), *entry[1:]) for key, entry in stack.items()
                                            if user(entry[0]) is not None}
        record = meta.get(node, meta.AUTOCAST)
        if record and record.get("module") is not None:
            meta.put(node, meta.AUTOCAST, {**record, "module": user(record["module"])})


def capture_steps(lm: nn.Module, max_cache_len: int, cache_dtype: torch.dtype,
                  kv_dtype: torch.dtype | None = None, example: tuple[int, int] = (2, 4)) -> tuple[fx.GraphModule, ...]:
    """Export the prefill (dynamic batch and prompt length) and decode (dynamic batch) step graphs.
    With kv_dtype=torch.float8_e4m3fn the cache holds FP8 bits and both graphs take a list of scales,
    which the prefill graph sets from the prompt (see _StaticKV). `example` (batch, prompt length) sizes
    the example inputs, whose shapes the passes read as the typical workload (the FP8 cost model)."""
    device = next(lm.parameters()).device
    vocab = int(lm.get_input_embeddings().num_embeddings)
    fp8 = kv_dtype == torch.float8_e4m3fn
    batch = torch.export.Dim("batch", min=1, max=4096)
    graphs = []
    rows = max(2, int(example[0]))  # a batch of 1 would fix the batch dimension
    for length in (min(max(2, int(example[1])), max_cache_len - 1), 1):
        step = _Step(lm, calibrate=fp8 and length > 1).eval()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (rows, length), generator=g).to(device)
        positions = torch.arange(length, device=device).expand(rows, length).contiguous()
        cache_position = torch.arange(length, device=device)
        valid = torch.zeros(rows, max_cache_len, dtype=torch.bool, device=device)
        valid[:, :length] = True
        mask = step_mask(valid, cache_position)
        cache = new_cache(lm.config, rows, max_cache_len, kv_dtype or cache_dtype, device)
        if length > 1:
            seq = torch.export.Dim("prompt", min=2, max=max_cache_len)
            shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: seq}, {0: batch, 2: seq},
                      [{0: batch} for _ in cache])
        else:
            shapes = ({0: batch}, {0: batch}, None, {0: batch}, [{0: batch} for _ in cache])
        args = (ids, positions, cache_position, mask, cache)
        if fp8:
            args, shapes = args + (new_scales(lm.config, device),), shapes + ([None] * len(cache),)
        with torch.no_grad():
            gm = _export(step, args, shapes)
        gm.meta[meta.GENERATION_STEP] = "prefill" if length > 1 else "decode"  # plan/fp8_cost reads it
        graphs.append(gm)
    return tuple(graphs)


def cache_in_place(gm: fx.GraphModule) -> int:
    """Turn export's functional cache update into the in-place update the step meant.

    Before: new = index_copy(cache_k, 2, pos, k) ... attention(new) ... copy_(cache_k, new)
    After:  new = index_copy_(cache_k, 2, pos, k) ... attention(new)

    Only where the cache input is read by nothing but that index_copy and its write-back (and export's
    metadata checks, size reads and input guards), so no reader can see the cache before the update. Returns the count rewritten.
    """
    count = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is _A.copy_.default):
            continue
        dst, src = node.args[0], node.args[1]
        if dst.op != "placeholder" or not isinstance(src, fx.Node) or src.target is not _A.index_copy.default \
                or src.args[0] is not dst:
            continue
        readers = [u for u in dst.users if u is not node and u is not src and not _reads_shape_only(u)]
        if readers:
            continue
        src.target = _A.index_copy_.default
        meta.put(src, meta.REWRITTEN, [*(meta.get(src, meta.REWRITTEN) or []), {
            "pass": "generation.cache_in_place", "reason":
            f"the KV cache input {dst.name} is updated in place (export made a functional copy and a "
            "write-back of the whole cache)"}])
        gm.graph.erase_node(node)
        count += 1
    gm.graph.lint()
    gm.recompile()
    return count


def _reads_shape_only(node: fx.Node) -> bool:
    """Export's size reads, metadata checks and input-guard call see the cache's shape, never its values."""
    if node.op == "call_module":
        return str(node.target).startswith("_guards")
    return node.target in (_A.sym_size.int, _A.sym_stride.int, _A.sym_numel.default,
                           _A._assert_tensor_metadata.default)


def _tensors(gm: fx.GraphModule) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    out = {}
    for path, mod in gm.named_modules():
        for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None:
                out[f"{path}.{name}".lstrip(".")] = (mod, name, t)
    return out


def _set(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in mod._parameters:
        mod._parameters[name] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, False)
    else:
        mod._buffers[name] = value


def share_weights(first: fx.GraphModule, gm: fx.GraphModule) -> int:
    """Make `gm` read `first`'s tensor wherever both hold an equal one (same name, dtype, shape and
    values): the prefill and decode graphs keep one copy of every weight. Returns the count shared."""
    mine = _tensors(first)
    shared = 0
    for key, (mod, name, t) in _tensors(gm).items():
        other = mine.get(key)
        if other is not None and other[2] is not t and other[2].dtype == t.dtype \
                and other[2].shape == t.shape and torch.equal(other[2], t):
            _set(mod, name, other[2])
            shared += 1
    return shared


def own_weights(graphs: tuple[fx.GraphModule, ...], model: nn.Module) -> int:
    """Clone, once, every tensor the graphs still share with the user's `model` (convert never lets
    later changes to the user's model leak into the converted one). Returns the count cloned."""
    user = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())
            if t.numel()}
    clones: dict[int, torch.Tensor] = {}
    for gm in graphs:
        for key, (mod, name, t) in _tensors(gm).items():
            if t.numel() and t.untyped_storage().data_ptr() in user:
                if id(t) not in clones:
                    copy = t.detach().clone()
                    clones[id(t)] = nn.Parameter(copy, False) if isinstance(t, nn.Parameter) else copy
                _set(mod, name, clones[id(t)])
        gm.requires_grad_(False)
    return len(clones)


def convert_steps(model: nn.Module, config: ConvertConfig, max_cache_len: int, say=None,
                  kv_cache: str | None = None, example: tuple[int, int] = (2, 4)) -> StepGraphs:
    """Capture and convert the prefill and decode graphs of `model` with `config` (PASS_TABLE).
    kv_cache="fp8" stores the cache as float8_e4m3fn with per-head scales set by each prefill."""
    from rewriter.pipeline import INFO_KEY, build_passes
    from rewriter.passes.infra import PassManager

    say = say or (lambda step, text: None)
    check_supported(model, max_cache_len)
    if config.tolerance is not None:
        raise ConfigError("generate=True does not take a tolerance (measured decisions need calibration "
                          "batches of the step graphs); convert without tolerance")
    cache_dtype = config.precision.island_dtype
    if kv_cache not in (None, "fp8"):
        raise ConfigError(f"kv_cache={kv_cache!r}: write kv_cache='fp8' (float8_e4m3fn with per-head scales) "
                          "or leave it out (the cache in the computing precision)")
    kv_dtype = torch.float8_e4m3fn if kv_cache == "fp8" else None
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        say("capture", f"prefill and decode graphs of {type(model).__name__}, cache {max_cache_len} x "
                       f"{meta.dtype_name(cache_dtype)}")
        graphs = capture_steps(model, max_cache_len, cache_dtype, kv_dtype, example)
    finally:
        for m, flag in flags:
            m.training = flag
    in_place, shared = [], [0]

    def after_pass(kind, gm, name, seconds, modified):
        say(f"{kind} {name}", f"{seconds:.2f}s{' (modified)' if modified else ''}")
        if gm is not graphs[0] and modified:  # share each new tensor (fused, cast) as soon as it exists
            shared[0] += share_weights(graphs[0], gm)

    for kind, gm in zip(("prefill", "decode"), graphs):
        PassManager(build_passes(config, progress=say),
                    on_pass=lambda name, s, m, kind=kind, gm=gm: after_pass(kind, gm, name, s, m))(gm)
        in_place.append(cache_in_place(gm))
    shared[0] += share_weights(graphs[0], graphs[1])
    weights = {"shared_between_graphs": shared[0], "cloned_from_user_model": own_weights(graphs, model)}
    layers = cache_layout(model.config)[0]
    record = {
        "config": config.to_dict(), "capture": "torch.export (generation steps)", "model": type(model).__name__,
        "generation": {
            "max_cache_len": max_cache_len, "cache_dtype": meta.dtype_name(kv_dtype or cache_dtype),
            "cache_dtype_reason": (f"the computing precision of {config.precision.value} (attention reads the "
                                   "cache in the dtype its matmuls run in; no cast per step)") if kv_dtype is None else
            ("kv_cache='fp8' asked for it: half the cache bytes of bf16 (longer contexts or larger batches in "
             "the same memory). Scales per layer, key/value and KV head, set by each prefill from the prompt "
             f"(amax x {FP8_HEADROOM:g} / {FP8_MAX:g}; later tokens beyond that saturate). Attention reads the "
             "cache dequantized to the computing precision: without an attention kernel that reads FP8 the "
             "step does not get faster"),
            "cache_updates_in_place": {"prefill": in_place[0], "decode": in_place[1], "expected": 2 * layers},
            **weights,
        },
    }
    fp8 = {kind: gm.meta[meta.FP8] for kind, gm in zip(("prefill", "decode"), graphs) if meta.FP8 in gm.meta}
    if fp8:  # each graph has its own FP8 plan: a prefill GEMM is compute-bound, a decode GEMM reads weights
        record["generation"]["fp8_gemms"] = {
            kind: {"fp8": len(plan.get("planned", [])), "kept": len(plan.get("kept", {})),
                   "kept_because": sorted(set(plan.get("kept", {}).values()))[:3],
                   "kernels": _kernels(graphs[kind == "decode"]), "weight_bytes_fp8": plan.get("weight_bytes_fp8", 0)}
            for kind, plan in fp8.items()}
    for kind, gm in zip(("prefill", "decode"), graphs):
        gm.meta[INFO_KEY] = {**record, "graph": kind}
    return StepGraphs(graphs[0], graphs[1], kv_dtype or cache_dtype, max_cache_len, record)


def _kernels(gm: fx.GraphModule) -> dict:
    """How many GEMMs of `gm` run each FP8 op (fp8_linear: torch._scaled_mm; fp8_weight_linear: weight-only)."""
    out: dict[str, int] = {}
    for node in gm.graph.nodes:
        packet = getattr(node.target, "_overloadpacket", None) if node.op == "call_function" else None
        name = str(getattr(packet, "__name__", "")).split("::")[-1].split(".")[-1]
        if name.startswith("fp8_"):
            out[name] = out.get(name, 0) + 1
    return out
