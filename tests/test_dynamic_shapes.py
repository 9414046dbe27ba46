"""Dynamic shapes by default: a model converted at one batch and length (or image size) runs at others
within the autocast budget; a shape outside what was captured is an InputError that names the input,
the dimension, the value and the allowed range; static=True and dynamic_shapes= do what they say;
calls bind by the original signature (positional <-> keyword)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

import rewriter
from rewriter import meta

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# bf16 on CPU: ours within 1.5x CPU autocast's relative L2 plus a small floor (fp32-noise differences)
BUDGET_FACTOR, BUDGET_FLOOR = 1.5, 1e-3


def _rel_l2(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    return float((got - ref).norm() / ref.norm())


def _within_autocast_budget(model, fast, kwargs, field):
    with torch.no_grad():
        ref = getattr(model(**kwargs), field)
        ours = getattr(fast(**kwargs), field)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = getattr(model(**kwargs), field)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    ours_err, auto_err = _rel_l2(ref, ours), _rel_l2(ref, auto.float())
    assert ours_err <= BUDGET_FACTOR * auto_err + BUDGET_FLOOR, (ours_err, auto_err)


def _text_inputs(batch, length, padded=True, seed=0):
    g = torch.Generator().manual_seed(seed * 100 + batch * 10 + length)
    ids = torch.randint(3, 128, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded and batch > 1:
        mask[-1, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def bert():
    import transformers
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    return model, rewriter.convert(model, _text_inputs(2, 32), precision="bf16")


@pytest.fixture(scope="module")
def llama():
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64)
    model = transformers.LlamaForCausalLM(config).eval()
    return model, rewriter.convert(model, _text_inputs(2, 32, padded=False), precision="bf16", generate=False)


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("length", [7, 48, 64])
def test_bert_runs_at_other_lengths_and_batches(bert, batch, length):
    model, fast = bert
    _within_autocast_budget(model, fast, _text_inputs(batch, length), "last_hidden_state")


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("length", [5, 48, 100])
def test_llama_runs_at_other_lengths_and_batches(llama, batch, length):
    model, fast = llama
    _within_autocast_budget(model, fast, _text_inputs(batch, length, padded=False), "logits")


def test_bert_beyond_its_position_table_is_an_input_error(bert):
    _, fast = bert
    with pytest.raises(rewriter.InputError) as info:
        fast(**_text_inputs(2, 80))
    message = str(info.value)
    assert "input 'input_ids' dimension 1 is 80" in message
    assert "outside the range 1..64" in message  # max_position_embeddings=64
    assert "Call it within the range" in message
    assert "Guard failed" not in message


def test_mismatched_lengths_name_both_inputs(bert):
    _, fast = bert
    kwargs = _text_inputs(2, 20)
    kwargs["attention_mask"] = kwargs["attention_mask"][:, :19]
    with pytest.raises(rewriter.InputError) as info:
        fast(**kwargs)
    assert "input 'attention_mask' dimension 1 is 19, but input 'input_ids' dimension 1 is 20" in str(info.value)


def test_keyword_conversion_accepts_positional_calls(bert):
    model, fast = bert
    kwargs = _text_inputs(3, 12)
    with torch.no_grad():
        by_name = fast(**kwargs).last_hidden_state
        by_position = fast(kwargs["input_ids"], kwargs["attention_mask"]).last_hidden_state
        mixed = fast(kwargs["input_ids"], attention_mask=kwargs["attention_mask"]).last_hidden_state
    assert torch.equal(by_name, by_position) and torch.equal(by_name, mixed)
    with pytest.raises(rewriter.InputError, match="'attention_mask' missing"):
        fast(kwargs["input_ids"])
    with pytest.raises(rewriter.InputError, match="'token_type_ids' was not among the example inputs"):
        fast(**kwargs, token_type_ids=torch.zeros_like(kwargs["input_ids"]))
    with torch.no_grad():  # an input left at its default (None) is the same call
        assert torch.equal(fast(**kwargs, token_type_ids=None).last_hidden_state, by_name)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, scale):
        return self.proj(x) * scale


def test_positional_conversion_accepts_keyword_calls():
    model = _TwoInputs().eval()
    x, scale = torch.randn(4, 8), torch.rand(4, 1)
    fast = rewriter.convert(model, (x, scale), precision="bf16")
    with torch.no_grad():
        assert torch.equal(fast(x=x, scale=scale), fast(x, scale))
        assert torch.equal(fast(x, scale=scale), fast(x, scale))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def test_vision_model_runs_at_two_other_resolutions():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    fast = rewriter.convert(model, torch.randn(2, 3, 64, 64), precision="bf16")
    dims = fast.meta[meta.INPUT_SHAPES][0]["dims"]
    assert dims[1] == 3 and all(isinstance(d, dict) for d in (dims[0], dims[2], dims[3]))  # B, H, W dynamic
    for shape in ((3, 3, 96, 96), (1, 3, 80, 48)):
        x = torch.randn(*shape)
        with torch.no_grad():
            ref, ours = model(x), fast(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                auto = model(x).float()
        assert _rel_l2(ref, ours) <= BUDGET_FACTOR * _rel_l2(ref, auto) + BUDGET_FLOOR


def test_static_fixes_every_dimension_and_says_how_to_change_it():
    model = _Net().eval()
    fast = rewriter.convert(model, torch.randn(2, 3, 16, 16), precision="bf16", static=True)
    assert fast.meta[meta.INPUT_SHAPES][0]["dims"] == [2, 3, 16, 16]
    fast(torch.randn(2, 3, 16, 16))
    with pytest.raises(rewriter.InputError) as info:
        fast(torch.randn(2, 3, 16, 20))
    message = str(info.value)
    assert "input 'x' dimension 3 is 20, but it is static at 16" in message
    assert "convert without static=True" in message


def test_dynamic_shapes_are_used_as_given():
    model = _Net().eval()
    height = torch.export.Dim("height", min=8, max=32)
    fast = rewriter.convert(model, torch.randn(2, 3, 16, 16), precision="bf16",
                            dynamic_shapes={"x": {2: height}})
    dims = fast.meta[meta.INPUT_SHAPES][0]["dims"]
    assert dims[0] == 2 and dims[3] == 16 and dims[2]["max"] == 32
    fast(torch.randn(2, 3, 24, 16))
    with pytest.raises(rewriter.InputError, match="input 'x' dimension 2 is 40, outside the range"):
        fast(torch.randn(2, 3, 40, 16))
    with pytest.raises(rewriter.ConfigError, match="contradict"):
        rewriter.convert(model, torch.randn(2, 3, 16, 16), static=True, dynamic_shapes={"x": {2: height}})


def test_dynamic_batch_false_keeps_only_the_batch_static():
    model = _Net().eval()
    fast = rewriter.convert(model, torch.randn(2, 3, 16, 16), precision="bf16", dynamic_batch=False)
    dims = fast.meta[meta.INPUT_SHAPES][0]["dims"]
    assert dims[:2] == [2, 3] and isinstance(dims[2], dict)
    fast(torch.randn(2, 3, 24, 24))
    with pytest.raises(rewriter.InputError, match="dimension 0 is 3, but it is static at 2"):
        fast(torch.randn(3, 3, 16, 16))


def test_raft_converted_at_batch_2_runs_at_batch_1():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.optical_flow.raft_small(weights=None).eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 128, 128, generator=g), torch.randn(2, 3, 128, 128, generator=g)
    fast = rewriter.convert(model, (a, b), {"num_flow_updates": 2}, precision="bf16")
    with torch.no_grad():
        ref = model(a[:1], b[:1], num_flow_updates=2)
        ours = fast(a[:1], b[:1], num_flow_updates=2)
    assert isinstance(ours, list) and len(ours) == len(ref) == 2
    assert ours[-1].shape == ref[-1].shape == (1, 2, 128, 128)
    assert torch.isfinite(ours[-1]).all()
