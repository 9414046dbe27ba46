"""`rewriter.convert`: the one entry point, which sends a causal LM that generates to the generation path.

    convert(model, ...)  --causal LM, use_cache, supported family-->  generation_model.convert_for_generation
                         --everything else------------------------->  pipeline.convert

Both paths build their graphs with the same pass table (rewriter.pipeline.PASS_TABLE) and configuration.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch.nn as nn

from rewriter.config import ConvertConfig
from rewriter.generation import wants_generation
from rewriter.generation_model import convert_for_generation
from rewriter.pipeline import convert as convert_graph, reporter

__all__ = ["convert"]


def convert(model: nn.Module, example_inputs: Any = None, example_kwargs: dict | None = None, *,
            calibration: Iterable | None = None, progress: bool = False, config: ConvertConfig | None = None,
            generate: bool | None = None, max_cache_len: int | None = None, kv_cache: str | None = None,
            **options: Any):
    """Rewrite `model` for lower precision; see `rewriter.pipeline.convert` for every argument.

    Args (besides those of rewriter.pipeline.convert):
        generate: True converts a Hugging Face causal LM into a model that generates (prefill and
            decode graphs over a static KV cache, rewriter/generation_model.py); None (default) does so
            for causal LMs of a supported family (Llama, Mistral, Qwen2/3, Gemma, Gemma2, Phi3, GPT-2) whose
            config has use_cache=True, in mode="eval"; False keeps the forward graph.
        max_cache_len: with generate, the slots of the static KV cache (prompt + new tokens).
        kv_cache: with generate, "fp8" stores the KV cache as float8_e4m3fn with per-head scales.

    Returns:
        A torch.fx.GraphModule called like `model`, or for generation a `GenerativeLM` (an nn.Module with
        transformers' `generate()` and a prefill/decode step API).
    """
    if generate is None and (max_cache_len is not None or kv_cache is not None):
        generate = True
    built = ConvertConfig.from_options(config, **options)
    if generate or (generate is None and wants_generation(model, built.mode)):
        say = reporter(progress)
        return convert_for_generation(model, built, max_cache_len, say=say, kv_cache=kv_cache,
                                      example_inputs=example_inputs, example_kwargs=example_kwargs)
    return convert_graph(model, example_inputs, example_kwargs, calibration=calibration, progress=progress,
                         config=built)  # validated once, above

