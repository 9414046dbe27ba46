"""Models as they are: every decoder LM and encoder-decoder with its default (tiny) config returns a
cache object (DynamicCache / EncoderDecoderCache), and the converted model returns the same structure,
cache included, with the same contents within the bf16 budget; T5Model converts with use_cache in its
sub-configs; a capture failure names the first real cause."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.utils._pytree as pytree

import rewriter
from tools.zoo_cpu import rel_l2, structure
from tools.zoo_specs import specs

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES = ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neox", "opt", "bloom", "falcon",
            "t5", "bart", "whisper"]
_SPECS = {s.name: s for s in specs()}


@pytest.mark.parametrize("name", FAMILIES)
def test_cache_returning_family_converts_with_its_default_config(name):
    spec = _SPECS[name]
    model = spec.make_model()
    args, kwargs = spec.make_inputs(spec.batch, spec.size)
    fast = rewriter.convert(model, args, kwargs, precision="bf16", generate=False)  # the forward graph, cache included
    with torch.no_grad():
        ref, ours = model(*args, **kwargs), fast(*args, **kwargs)
    cache = ref["past_key_values"]
    assert type(cache).__name__ in ("DynamicCache", "EncoderDecoderCache")
    assert type(ours) is type(ref) and type(ours["past_key_values"]) is type(cache)
    assert structure(ours) == structure(ref)
    assert rel_l2(ref, ours) < 3e-2  # every leaf: logits / hidden states and each cached key and value
    # and at another batch and length
    args, kwargs = spec.make_inputs(spec.other_batch, spec.other_size)
    with torch.no_grad():
        ref, ours = model(*args, **kwargs), fast(*args, **kwargs)
    assert structure(ours) == structure(ref) and rel_l2(ref, ours) < 3e-2


def test_t5_model_converts_with_use_cache_in_its_sub_configs():
    import transformers

    config = transformers.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab_size=128)
    model = transformers.T5Model(config).eval()
    model.config.use_cache = False  # the sub-configs keep theirs: the failing case
    ids = torch.randint(0, 128, (2, 12))
    fast = rewriter.convert(model, (), {"input_ids": ids, "decoder_input_ids": ids[:, :5]}, precision="bf16")
    with torch.no_grad():
        ref = model(input_ids=ids, decoder_input_ids=ids[:, :5])
        ours = fast(ids, decoder_input_ids=ids[:, :5])  # positional input_ids, as the original takes it
    assert structure(ours) == structure(ref)
    assert rel_l2(ref.last_hidden_state, ours.last_hidden_state) < 3e-2


class _Unregistered:
    def __init__(self, t):
        self.t = t


class _Inner(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent: export fails here first
            x = x * 2
        return _Unregistered(x)


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.inner = _Inner()

    def forward(self, x):
        return self.inner(self.proj(x))


def test_capture_failure_reports_the_first_real_cause_with_module_and_line():
    import inspect

    line = inspect.getsourcelines(_Inner.forward)[1] + 1
    with pytest.raises(rewriter.CaptureError) as info:
        rewriter.convert(_Outer().eval(), (torch.randn(2, 4),), precision="bf16")
    message = str(info.value)
    assert "torch.export failed in module 'inner'" in message
    assert f"test_cache_outputs.py:{line}: if x.sum() > 0:" in message
    assert "UnboundLocalError" not in message
