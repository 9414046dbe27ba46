"""Batch-first self-attention for capture: nn.MultiheadAttention(batch_first=True) without its transposes.

nn.MultiheadAttention computes in sequence-first layout. With batch_first=True its traced (slow) path
transposes the input, runs the in-projection on the non-contiguous result, copies q, k and v apart,
reshapes and transposes them per head, and after attention permutes, copies and transposes back: on
ViT-B/16 those layout copies cost ~3 ms of an 11.6 ms forward on an H100 (~1.5 ms under torch.compile).

Before export, `capture` runs the model through `batch_first_copy`, which returns a copy of the module
tree in which every eligible nn.MultiheadAttention is a `BatchFirstSelfAttention`: the same object
layout, parameters and module paths (parameter names, node paths, overrides and diffs are unchanged),
only its class differs. Its forward, when the call is eligible, computes

    qkv = linear(x, in_proj_weight, in_proj_bias).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
    o = scaled_dot_product_attention(*qkv.unbind(0), mask, dropout, is_causal)   # [B, H, L, D]
    out = linear(o.transpose(1, 2).reshape(B, L, E), out_proj.weight, out_proj.bias)

with exactly the semantics of `F.multi_head_attention_forward` (masks canonicalised to additive float
masks of the query's dtype, the is_causal hint handled as there, the default 1/sqrt(D) scale, dropout
only in training), and otherwise calls nn.MultiheadAttention.forward unchanged.

Eligible module: exactly nn.MultiheadAttention (not a subclass, no instance-level forward), batch_first,
one packed in-projection (_qkv_same_embed_dim), no bias_k/bias_v, no add_zero_attn.
Eligible call: query is key is value (self-attention: an identity check the model's code fixes, so safe
under export), a 3-D dense query of width embed_dim, need_weights=False, attn_mask None or a bool/float
mask of shape (L, L) or (N*num_heads, L, L), key_padding_mask None or a bool/float mask of shape (N, L)
of the same dtype as attn_mask when both are given, is_causal only together with an attn_mask.
Anything else runs the original code (which raises the original errors for invalid arguments).

The user's model is never modified: `batch_first_copy` copies only the swapped modules and their
ancestors (shallowly: the copies share parameters, buffers and all other submodules with the original).
"""
from __future__ import annotations

import copy
import os

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from rewriter import meta

__all__ = ["BatchFirstSelfAttention", "module_is_eligible", "batch_first_copy", "record_swaps",
           "PASS_NAME"]

PASS_NAME = "capture"
_CALLS = "_rewriter_batch_first_calls"  # instance attribute of a swapped copy: its _CallLog


class _CallLog:
    """Whether each call of a swapped module ran batch-first. A plain object, not a list: export
    snapshots module attributes with pytree (copying lists) and puts the snapshot back afterwards."""

    def __init__(self):
        self.calls: list[bool] = []


def module_is_eligible(module: nn.Module) -> bool:
    """Whether `module` is an nn.MultiheadAttention whose eligible calls can run batch-first."""
    return type(module) is nn.MultiheadAttention and "forward" not in module.__dict__ \
        and _state_is_eligible(module)


def _state_is_eligible(module: nn.Module) -> bool:
    """The module-level conditions, also re-read at call time (attributes can change after a swap)."""
    return (bool(getattr(module, "batch_first", False))
            and bool(getattr(module, "_qkv_same_embed_dim", False))
            and getattr(module, "in_proj_weight", None) is not None
            and getattr(module, "bias_k", None) is None
            and getattr(module, "bias_v", None) is None
            and not getattr(module, "add_zero_attn", False))


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """F._canonical_mask: a bool mask (True = not allowed) as an additive float mask of `dtype`."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))


class BatchFirstSelfAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention(batch_first=True) whose eligible self-attention calls skip the
    sequence-first transposes and copies. Only ever assigned as `__class__` of a copied module
    by `batch_first_copy`; its state is that of the nn.MultiheadAttention it came from."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        eligible = self._call_is_eligible(query, key, value, key_padding_mask, need_weights, attn_mask,
                                          is_causal)
        log = self.__dict__.get(_CALLS)
        if log is not None:
            log.calls.append(eligible)
        if not eligible:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        batch, length, embed = query.shape
        heads, head_dim = self.num_heads, self.head_dim

        # masks exactly as F.multi_head_attention_forward (need_weights=False branch) builds them
        key_padding_mask = _float_mask(key_padding_mask, query.dtype)
        if is_causal and key_padding_mask is None:
            attn_mask = None  # the hint goes to SDPA as is_causal
        else:
            attn_mask = _float_mask(attn_mask, query.dtype)
            if key_padding_mask is not None:
                is_causal = False  # the merged mask is no longer causal
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.view(1, 1, length, length)
            else:
                attn_mask = attn_mask.view(batch, heads, length, length)
        if key_padding_mask is not None:
            padding = key_padding_mask.view(batch, 1, 1, length)
            attn_mask = padding if attn_mask is None else attn_mask + padding

        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, L, D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0,
                                             is_causal=is_causal)
        out = out.transpose(1, 2).reshape(batch, length, embed)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias), None

    def _call_is_eligible(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                          is_causal) -> bool:
        if need_weights or query is not key or key is not value:
            return False
        if not isinstance(query, torch.Tensor) or query.is_nested or query.dim() != 3:
            return False
        if query.shape[-1] != self.embed_dim or not _state_is_eligible(self):
            return False
        batch, length, _ = query.shape
        if is_causal and attn_mask is None:
            return False  # the original raises "Need attn_mask if specifying the is_causal hint"
        for mask in (attn_mask, key_padding_mask):
            if mask is not None and (not isinstance(mask, torch.Tensor)
                                     or (mask.dtype != torch.bool and not torch.is_floating_point(mask))):
                return False
        if attn_mask is not None and key_padding_mask is not None \
                and attn_mask.dtype != key_padding_mask.dtype:
            return False  # deprecated mismatch: the original warns
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (length, length):
                    return False
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (batch * self.num_heads, length, length):
                    return False
            else:
                return False
        if key_padding_mask is not None and key_padding_mask.shape != (batch, length):
            return False
        return True


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object with the same state: parameters, buffers and submodules are shared, the
    registries holding them (and the hook registries) are the copy's own."""
    new = module.__class__.__new__(module.__class__)
    state = dict(module.__dict__)
    for name, value in state.items():
        if name.startswith("_") and isinstance(value, (dict, set)):
            state[name] = copy.copy(value)
    new.__dict__.update(state)
    return new


def batch_first_copy(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """(model, []) when `model` has no eligible nn.MultiheadAttention; else (a copy, swapped paths).

    The copy shares parameters, buffers and every module that neither is nor contains an eligible
    attention module with `model`; those that are or do are shallow copies, and the attention copies
    are `BatchFirstSelfAttention`. A module reachable under several names is copied once. ScriptModules
    are left alone. `model` itself is not touched.
    """
    memo: dict[int, nn.Module] = {}

    def rebuild(module: nn.Module) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        memo[id(module)] = module  # cycles end here
        if isinstance(module, torch.jit.ScriptModule):
            return module
        children = {name: rebuild(child) for name, child in module._modules.items() if child is not None}
        swap = module_is_eligible(module)
        if not swap and all(children[n] is module._modules[n] for n in children):
            return module
        new = _shallow_copy(module)
        new._modules.update(children)
        if swap:
            new.__class__ = BatchFirstSelfAttention
            new.__dict__[_CALLS] = _CallLog()
        memo[id(module)] = new
        return new

    root = rebuild(model)
    if root is model:
        return model, []
    paths = [name for name, m in root.named_modules() if isinstance(m, BatchFirstSelfAttention)]
    return root, paths


def _innermost_frame_file(node: fx.Node) -> str | None:
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    files = [line.strip() for line in str(trace).splitlines() if line.strip().startswith('File "')]
    return files[-1].split('"')[1] if files else None


def _is_sdpa(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", str(node.target))
    return "scaled_dot_product" in name


def record_swaps(gm: fx.GraphModule, swapped: nn.Module) -> list[str]:
    """Annotate the attention nodes of the swapped modules in `swapped` (the copy that was exported)
    that ran batch-first: meta.REWRITTEN gets {"pass": "capture", "reason": ...}. Returns the paths
    of the modules that ran batch-first at least once."""
    calls = {name: m.__dict__[_CALLS].calls for name, m in swapped.named_modules()
             if isinstance(m, BatchFirstSelfAttention) and _CALLS in m.__dict__}
    used = [name for name, log in calls.items() if any(log)]
    if not used:
        return []
    here = __file__
    for node in gm.graph.nodes:
        if not _is_sdpa(node):
            continue
        path = meta.module_path(node)
        if path not in used:
            continue
        if not all(calls[path]):  # called both ways: ours are the ones traced from this file
            where = _innermost_frame_file(node)
            if where is None or not _same_file(where, here):
                continue
        notes = list(meta.get(node, meta.REWRITTEN) or [])
        notes.append({"pass": PASS_NAME,
                      "reason": f"nn.MultiheadAttention at '{path}' run batch-first (no transposes, "
                                "same weights)"})
        meta.put(node, meta.REWRITTEN, notes)
    return used


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.basename(a) == os.path.basename(b)
