"""What generation supports, and the facts about a model it needs: which Hugging Face causal LMs convert
for generation (`check_supported`, a one-paragraph ConfigError naming what is missing otherwise), the 4-D
mask their attention takes (`mask_kind`), the keyword their forward takes the cache by (`cache_argument`),
the example's (batch, prompt length) (`example_shape`) and whether a call fits the static cache
(`check_room`). rewriter/generation.py builds the step graphs on these.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

from rewriter.errors import ConfigError, InputError

__all__ = ["SUPPORTED_MODEL_TYPES", "MASK_KINDS", "wants_generation", "check_supported", "mask_kind",
           "cache_argument", "example_shape", "check_room"]

# model_type -> how its attention reaches the cache (every one calls cache.update(k, v, layer_idx) and
# takes a prepared 4-D mask as it is)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2")

def wants_generation(model: Any, mode: str = "eval") -> bool:
    """Whether `convert` returns a generating model by default: a Hugging Face causal LM that can
    generate, in evaluation mode, whose config asks for a cache (`use_cache=True`, the default).
    Models exported with `use_cache=False` keep the plain forward graph."""
    if str(getattr(mode, "value", mode)) != "eval":
        return False
    can = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    if not callable(can) or config is None or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        # other architectures keep the forward graph (caches in its output) unless generate=True asks
        return (bool(can()) and bool(getattr(config, "use_cache", False))
                and getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES)
    except Exception:
        return False


def check_supported(model: nn.Module, max_cache_len: int) -> None:
    """Raise ConfigError naming what is missing when `model` cannot be converted for generation."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if int(max_cache_len) < 4:
        raise ConfigError(f"max_cache_len={max_cache_len} leaves no room for a prompt and new tokens: pass "
                          "max_cache_len >= 4 (the longest prompt plus max_new_tokens)")
    if config is None or not callable(getattr(model, "can_generate", None)):
        raise ConfigError(f"generate=True needs a Hugging Face causal LM (a PreTrainedModel with a "
                          f"config and can_generate()); {name} has no "
                          f"{'config' if config is None else 'can_generate()'}. Convert it without "
                          "generate=True to get its forward graph")
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"{name} ({model_type}) is an encoder-decoder model: generation is built for "
                          f"decoder-only causal LMs ({', '.join(SUPPORTED_MODEL_TYPES)})")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{name} (model_type {model_type!r}) is not supported for generation: what is missing is a "
            "check that its attention layers write the cache through cache.update(key, value, layer_idx) "
            "and accept a prepared 4-D attention mask, which is verified for "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Convert it without generate=True for its forward graph")
    if not model.can_generate():
        raise ConfigError(f"{name} has no language-model head (can_generate() is False): convert its "
                          "...ForCausalLM / LMHeadModel class for generation")
    mask_kind(model)
    window = getattr(config, "sliding_window", None)
    if model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        window = None
    if window is not None and max_cache_len > window:
        raise ConfigError(f"{name} attends within a sliding window of {window} tokens, which the static "
                          f"cache does not implement: pass max_cache_len <= {window} (got {max_cache_len})")
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and max_cache_len > limit:
        raise ConfigError(f"max_cache_len={max_cache_len} exceeds the {limit} positions {name} was built "
                          f"for (config.max_position_embeddings): pass max_cache_len <= {limit}")


# attention implementation -> the 4-D mask it takes: SDPA a boolean one (True = attend), the eager
# attention of transformers an additive one (0 or finfo.min, added to the scores). Flash and flex
# attention take other masks (2-D padding masks, block masks) that the step graphs do not build.
MASK_KINDS = {"sdpa": "bool", "eager": "additive"}


def mask_kind(lm: nn.Module) -> str:
    """"bool" or "additive": the 4-D mask the attention of `lm` takes (config._attn_implementation)."""
    config = getattr(lm, "config", None)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    kind = MASK_KINDS.get(impl)
    if kind is None:
        raise ConfigError(f"{type(lm).__name__} uses attn_implementation={impl!r}, whose mask the generation "
                          "graphs do not build (they pass a prepared 4-D mask): load the model with "
                          "attn_implementation='sdpa' or 'eager' (e.g. AutoModelForCausalLM.from_pretrained(..., "
                          "attn_implementation='sdpa')) and convert it again")
    return kind


def cache_argument(lm: nn.Module) -> str:
    """The keyword the model's forward takes its cache by: `cache` (transformers >= 5.2x) or
    `past_key_values` (5.17 and before; an unknown keyword would be swallowed by **kwargs and the model
    would build a cache of its own)."""
    try:
        params = inspect.signature(lm.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def example_shape(example_inputs: Any, example_kwargs: dict | None) -> tuple[int, int]:
    """(batch, prompt length) of the user's example token ids (input_ids, or the first 2-D integer
    tensor), else (2, 4)."""
    from rewriter.capture import normalize_inputs

    try:
        args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    except InputError:
        return (2, 4)
    candidates = [kwargs.get("input_ids"), *args, *kwargs.values()]
    for t in candidates:
        if isinstance(t, torch.Tensor) and t.dim() == 2 and not t.is_floating_point():
            return int(t.shape[0]), int(t.shape[1])
    return (2, 4)


def check_room(needed: int, max_cache_len: int, what: str) -> None:
    if needed > max_cache_len:
        raise InputError(f"{what} needs {needed} cache slots but the static KV cache holds {max_cache_len}: "
                         f"convert with a larger max_cache_len (e.g. max_cache_len={needed}), or shorten the "
                         "prompt / max_new_tokens")
