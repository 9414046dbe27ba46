"""Capture failures the user can act on: untraceable control flow (CaptureError) and example inputs the
model rejects (InputError), each naming the module and the source line or shapes."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn as nn

import rewriter
from rewriter.capture import capture


class _Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: neither export nor fx can follow it
            return x * 2
        return x - 1


class _Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.gate = _Gate()

    def forward(self, x):
        return self.gate(self.body(x))


def test_untraceable_model_names_the_module_and_the_source_line():
    _, first_line = inspect.getsourcelines(_Gate.forward)
    line = first_line + 1
    with pytest.raises(rewriter.CaptureError) as info:
        rewriter.convert(_Gated().eval(), (torch.randn(4, 8),), precision="fp16")
    message = str(info.value)
    assert "could not capture _Gated" in message
    assert "torch.export failed in module 'gate'" in message
    assert "torch.fx.symbolic_trace failed in module 'gate'" in message
    assert f"{__file__}:{line}: if x.sum() > 0:" in message
    assert "torch.where or torch.cond" in message  # what to do about it
    assert isinstance(info.value, rewriter.RewriterError)


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 8)

    def forward(self, x):
        return self.proj(x)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = _Encoder()

    def forward(self, x):
        return torch.relu(self.encoder(x))


def test_wrong_input_shape_names_the_module_and_the_shapes():
    with pytest.raises(rewriter.InputError) as info:
        rewriter.convert(_Net().eval(), (torch.randn(4, 7),), precision="fp16")
    message = str(info.value)
    assert "the model _Net failed on the example inputs (arg0=Tensor(4, 7) float32)" in message
    assert "in module 'encoder.proj'" in message
    assert "(4x7 and 16x8)" in message
    assert "shapes and dtypes the model's forward expects" in message
    assert isinstance(info.value, ValueError)  # InputError is also a ValueError


def test_keyword_inputs_are_named_in_the_message():
    with pytest.raises(rewriter.InputError, match=r"\(x=Tensor\(2, 3\) float32\) in module 'encoder.proj'"):
        rewriter.convert(_Net().eval(), {"x": torch.randn(2, 3)})


def test_missing_inputs_and_non_modules_are_input_errors():
    with pytest.raises(rewriter.InputError, match="convert needs example inputs"):
        rewriter.convert(_Net().eval())
    with pytest.raises(rewriter.InputError, match="expects a torch.nn.Module, got function"):
        capture(lambda x: x, (torch.randn(2),), {})


def test_capture_keeps_the_batch_dimension_dynamic_and_says_how_it_captured():
    captured = capture(_Net().eval(), (torch.randn(4, 16),), {})
    assert captured.method == "torch.export" and captured.dynamic_batch is True
    assert captured.graph_module(torch.randn(9, 16)).shape == (9, 8)


def test_captured_graph_does_not_depend_on_traced_strides():
    # CPU scaled_dot_product_attention with a float bias: the fake tensors export traces with report a
    # [B, S, H, D] layout, the kernel run with autograd on returns [B, H, S, D]. Decomposing
    # `.contiguous()` on the fake strides drops the copy, and the `.view()` after it fails at run time
    # unless views are reshapes.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=1,
                                   num_heads=2, use_cache=False, decoder_start_token_id=0)
    model = transformers.T5Model(config).eval()

    def inputs(batch):
        return {"input_ids": torch.randint(0, 64, (batch, 16)),
                "decoder_input_ids": torch.randint(0, 64, (batch, 8))}

    gm = capture(model, (), inputs(4), dynamic_batch=True).graph_module
    for batch in (4, 7):
        example = inputs(batch)
        torch.testing.assert_close(gm(**example).last_hidden_state, model(**example).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
