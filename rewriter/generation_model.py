"""GenerativeLM: a converted causal LM that generates (transformers' generate()) or steps (prefill/decode).

    >>> fast = rewriter.convert(lm, {"input_ids": ids}, precision="bf16", generate=True, max_cache_len=256)
    >>> out = fast.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    >>> logits = fast.prefill(ids, attention_mask=mask)       # [B, V], the next token's logits
    >>> logits = fast.decode(logits.argmax(-1))               # one token per sequence -> [B, V]

It is an nn.Module with transformers' GenerationMixin: it keeps the source model's `config` and
`generation_config`, so greedy and sampled decoding, logits processors, stop tokens (`eos_token_id`)
and batched left-padded prompts behave as they do on the Hugging Face model. It is stateful like a
static cache: `generate()` and `prefill()` start a new sequence batch; each forward after the first
feeds one token. Its graphs are `prefill_graph` and `decode_graph` (rewriter.generation).
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn

from rewriter.errors import InputError
from rewriter.generation import StepGraphs, check_room, new_cache, new_scales, step_mask

try:
    from transformers import GenerationMixin
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError:  # pragma: no cover - generation needs transformers, the library does not
    GenerationMixin = object
    CausalLMOutputWithPast = None

__all__ = ["GenerativeLM"]


class GenerativeLM(nn.Module, GenerationMixin):
    """The converted prefill and decode graphs of a causal LM, with its config, over a static KV cache.

    Args:
        steps: the converted graphs (rewriter.generation.convert_steps).
        config: the source model's transformers config.
        generation_config: the source model's generation config.
        main_input_name: the source model's main input ("input_ids").
    """

    _is_stateful = False
    _supports_cache_class = False

    def __init__(self, steps: StepGraphs, config, generation_config, main_input_name: str = "input_ids"):
        super().__init__()
        self.training = False
        self.prefill_graph = steps.prefill
        self.decode_graph = steps.decode
        self.config = config
        self.generation_config = generation_config
        self.main_input_name = main_input_name
        self.cache_dtype = steps.cache_dtype
        self.max_cache_len = steps.max_cache_len
        self.record = steps.record
        self.cache: list[torch.Tensor] = []
        self.scales: list[torch.Tensor] | None = None  # FP8 cache: per layer, key/value and KV head
        self._valid: torch.Tensor | None = None      # [B, C] slots holding real tokens
        self._next_position: torch.Tensor | None = None  # [B] position id of the next token
        self._length = 0                                # slots written so far (same for every row)
        self._fresh = True                              # the next forward is a prefill
        from rewriter.backends import fast_forward

        for gm in (self.prefill_graph, self.decode_graph):  # the eager backend's fast forward
            fast_forward.install(gm)
        self.set_decode_backend("eager")

    def set_decode_backend(self, backend: str = "eager", compile_mode: str = "max-autotune-no-cudagraphs",
                           inductor_options: dict | None = None):
        """How the decode graph runs: "eager", "compile" (torch.compile, static shapes), "cuda_graphs"
        (captured once per batch size and replayed; CUDA only) or "compile+cuda_graphs".

        `inductor_options` (compile only) replace `compile_mode` by inductor options, e.g.
        {"max_autotune": True, "coordinate_descent_tuning": True}: with coordinate-descent tuning
        inductor turns a one-row GEMM into a fused multiply-reduce, so a weight-only FP8 GEMM reads
        each weight byte once (widened in registers) instead of materialising the widened weight.
        (On CUDA with triton, weight-only FP8 GEMMs of up to 16 rows run our Triton GEMV instead,
        rewriter/runtime/fp8_gemv.py, under every backend: compiled, inductor launches its kernels.)

        The decode step's shapes never change for a batch size and the cache tensors keep their
        addresses, so one CUDA graph per batch size replays every step. Returns self.
        """
        from rewriter.errors import ConfigError

        choices = ("eager", "compile", "cuda_graphs", "compile+cuda_graphs")
        if backend not in choices:
            raise ConfigError(f"decode backend {backend!r}: write one of {', '.join(map(repr, choices))}")
        self._decode_fn = self.decode_graph
        if backend.startswith("compile"):
            how = {"options": dict(inductor_options)} if inductor_options else {"mode": compile_mode}
            self._decode_fn = torch.compile(self.decode_graph, dynamic=False, fullgraph=True, **how)
        self._cuda_graphs = backend.endswith("cuda_graphs")
        self._graphs: dict = {}
        self.decode_backend = backend
        return self

    def train(self, mode: bool = True) -> "GenerativeLM":
        """eval() (train(False)) is accepted and changes nothing: the graphs were converted for inference
        (exported graphs refuse train()). train(True) is a ConfigError."""
        from rewriter.errors import ConfigError

        if mode:
            raise ConfigError("a GenerativeLM runs inference only: train the Hugging Face model and convert it "
                              "again (rewriter.convert(model, ..., generate=True))")
        self.training = False
        return self

    # ------------------------------------------------------------------ what GenerationMixin reads

    @property
    def device(self) -> torch.device:
        for t in self.prefill_graph.parameters():
            return t.device
        for t in self.prefill_graph.buffers():
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cache_dtype == torch.float8_e4m3fn else self.cache_dtype

    def _extra(self, device) -> tuple:
        """The scales argument of an FP8 cache's graphs (nothing for a 16-bit cache)."""
        if self.cache_dtype != torch.float8_e4m3fn:
            return ()
        if self.scales is None or self.scales[0].device != device:
            self.scales = new_scales(self.config, device)
        return (self.scales,)

    @classmethod
    def can_generate(cls) -> bool:
        return True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the static cache lives here; generate() must not make a DynamicCache

    def get_experts_implementation(self) -> dict:
        return {}  # no mixture-of-experts layers to switch for decoding

    def set_experts_implementation(self, implementation) -> None:
        pass

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs) -> dict:
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def generate(self, *args, **kwargs):
        """transformers' generate() on the converted graphs (a new batch of sequences each call).

        A prompt and max_new_tokens that need more cache slots than max_cache_len are an InputError
        before anything runs (the last new token is never fed back: S + max_new_tokens - 1 slots);
        beam search (num_beams > 1) is a ConfigError."""
        self._fresh = True
        beams = kwargs["num_beams"] if "num_beams" in kwargs else getattr(
            kwargs.get("generation_config") or self.generation_config, "num_beams", 1)
        if beams is not None and int(beams) > 1:
            from rewriter.errors import ConfigError

            # beam search reorders the cache between steps (cache.reorder_cache(beam_idx)); this cache
            # lives inside the model and is not handed to generate(), so beams would read other beams' keys
            raise ConfigError(f"generate(num_beams={beams}): beam search is not supported by a converted "
                              "GenerativeLM (its static KV cache is not reordered between beams); use greedy "
                              "(do_sample=False, num_beams=1) or sampling, or run beam search on the Hugging "
                              "Face model")
        ids = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("input_ids")
        new = kwargs.get("max_new_tokens")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and isinstance(new, int) and new > 0:
            check_room(ids.shape[1] + new - 1, self.max_cache_len,
                       f"generate() of a {ids.shape[1]}-token prompt with max_new_tokens={new}")
        return super().generate(*args, **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Next-token logits [B, 1, V] as a CausalLMOutputWithPast: the whole sequence on the first call
        after generate() / reset(), else the last token of `input_ids` (the one just generated)."""
        if self._fresh or self._valid is None or input_ids.shape[0] != self._valid.shape[0] \
                or input_ids.shape[1] != self._length + 1:
            logits = self.prefill(input_ids, attention_mask)
        else:
            logits = self.decode(input_ids[:, -1])
        return CausalLMOutputWithPast(logits=logits[:, None])

    def reset(self) -> None:
        """Forget the cached sequences: the next forward is a prefill."""
        self._fresh = True

    # ------------------------------------------------------------------ step API

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt [B, S] (left-padded where attention_mask is 0) into a fresh cache.

        Returns:
            the logits of the next token, [B, vocab], in the source model's output dtype.
        """
        if input_ids.dim() != 2:
            raise InputError(f"prefill expects input_ids of shape [batch, length], got {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        check_room(length + 1, self.max_cache_len, f"a prompt of {length} tokens")
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                             f"{tuple(input_ids.shape)}: they must match")
        real = attention_mask.to(device=device, dtype=torch.bool)
        if not self.cache or self.cache[0].shape[0] != batch or self.cache[0].device != device:
            self.cache = new_cache(self.config, batch, self.max_cache_len, self.cache_dtype, device)
        self._valid = torch.zeros(batch, self.max_cache_len, dtype=torch.bool, device=device)
        self._valid[:, :length] = real
        positions = (real.long().cumsum(-1) - 1).clamp_min(0)
        cache_position = torch.arange(length, device=device)
        mask = step_mask(self._valid, cache_position)
        graph = self.prefill_graph if length > 1 else self.decode_graph
        # (an FP8 cache's 1-token prompt runs the decode graph: it keeps the scales it has, 1.0 at first)
        logits = graph(input_ids, positions, cache_position, mask, self.cache, *self._extra(device))
        self._next_position = real.long().sum(-1)
        self._length = length
        self._fresh = False
        return logits

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence ([B] or [B, 1]) after prefill(); returns the next logits [B, vocab]."""
        if self._fresh or self._valid is None:
            raise InputError("decode() needs a prefill() first: call fast.prefill(input_ids, attention_mask)")
        tokens = tokens.reshape(-1, 1)
        if tokens.shape[0] != self._valid.shape[0]:
            raise InputError(f"decode got {tokens.shape[0]} tokens for a batch of {self._valid.shape[0]} "
                             "sequences: pass one token per sequence")
        check_room(self._length + 1, self.max_cache_len, f"token {self._length + 1} of the sequence")
        slot = self._length
        self._valid[:, slot] = True
        cache_position = torch.full((1,), slot, dtype=torch.long, device=tokens.device)
        mask = self._valid[:, None, None, :]
        inputs = (tokens, self._next_position[:, None], cache_position, mask)
        if self._cuda_graphs and tokens.is_cuda:
            logits = self._replay(inputs)
        else:
            logits = self._decode_fn(*inputs, self.cache, *self._extra(tokens.device))
        self._next_position = self._next_position + 1
        self._length = slot + 1
        return logits

    def _replay(self, inputs: tuple) -> torch.Tensor:
        """The decode step from a CUDA graph captured for this batch size and these cache tensors."""
        key = (inputs[0].shape[0], self.cache[0].data_ptr())
        entry = self._graphs.get(key)
        if entry is None:
            static = tuple(t.clone() for t in inputs)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up writes this step's keys and values, as the replay will
                for _ in range(2):
                    self._decode_fn(*static, self.cache, *self._extra(static[0].device))
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._decode_fn(*static, self.cache, *self._extra(static[0].device))
            entry = self._graphs[key] = (graph, static, out)
        graph, static, out = entry
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        graph.replay()
        return out.clone()

    @torch.no_grad()
    def greedy(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               max_new_tokens: int = 16) -> tuple[torch.Tensor, dict]:
        """A plain greedy loop on the step API (no transformers machinery).

        Returns:
            (new tokens [B, max_new_tokens], {"ttft_s": ..., "decode_tokens_per_s": ...}) where the
            rate counts the tokens of all sequences of the batch.
        """
        sync = torch.cuda.synchronize if input_ids.is_cuda else (lambda: None)
        start = time.perf_counter()
        token = self.prefill(input_ids, attention_mask).argmax(-1)
        sync()
        first = time.perf_counter()
        out = [token]
        for _ in range(max_new_tokens - 1):
            token = self.decode(token).argmax(-1)
            out.append(token)
        sync()
        end = time.perf_counter()
        steps = max(max_new_tokens - 1, 1)
        return torch.stack(out, 1), {"ttft_s": first - start,
                                     "decode_tokens_per_s": steps * input_ids.shape[0] / max(end - first, 1e-9)}

    def extra_repr(self) -> str:
        return (f"cache={self.max_cache_len} x {str(self.cache_dtype).replace('torch.', '')}, "
                f"model={self.record.get('model')}")


def convert_for_generation(model: nn.Module, config, max_cache_len: int | None = None, say=None,
                           kv_cache: str | None = None, example_inputs: Any = None,
                           example_kwargs: dict | None = None) -> GenerativeLM:
    """The GenerativeLM of a Hugging Face causal LM converted with `config` (a ConvertConfig); the
    example token ids' (batch, length) size the prefill graph's example (what the passes plan for)."""
    from rewriter.errors import ConfigError
    from rewriter.generation import convert_steps, example_shape

    if isinstance(model, GenerativeLM):
        raise ConfigError(f"this model is already converted (GenerativeLM, {model.record['config']['precision']}, "
                          f"cache {model.max_cache_len}): convert the original Hugging Face model instead")

    if max_cache_len is None:
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 1024)
        max_cache_len = int(min(limit, 1024))
    steps = convert_steps(model, config, int(max_cache_len), say=say, kv_cache=kv_cache,
                          example=example_shape(example_inputs, example_kwargs))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is None:
        from transformers import GenerationConfig

        generation_config = GenerationConfig.from_model_config(model.config)
    import copy

    fast = GenerativeLM(steps, copy.deepcopy(model.config), copy.deepcopy(generation_config),
                        getattr(model, "main_input_name", "input_ids"))
    # backend="compile" / "cuda_graphs" apply to the decode graph, the one that runs per token
    decode = {"eager": "eager", "compile": "compile", "cuda_graphs": "cuda_graphs"}[config.backend]
    options = config.backend_kwargs()
    if decode == "compile" and options.get("compile_mode"):
        return fast.set_decode_backend(decode, compile_mode=options["compile_mode"])
    return fast.set_decode_backend(decode)
