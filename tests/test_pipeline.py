"""convert() end to end on small models: fp16 overflow handled where a blanket .half() fails,
idempotence on converted models, the input model never mutated, the call structure kept."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rewriter
from rewriter.pipeline import is_converted
from helpers import rel_l2

FP16_MAX_REL_L2 = 2e-3  # one rounding of the activations before an fp32 reduction


# ------------------------------------------------------------------ overflow


class _Energy(nn.Module):
    """|h| stays below 65504 but h**2 does not: fp16 overflows in pow and in the sum."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        h = self.fc(x) * 300
        return h.pow(2).sum(-1)


class _RmsNorm(nn.Module):
    """T5/Llama-style RMSNorm over large activations: mean(h**2) overflows fp16."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.out = nn.Linear(64, 16)

    def forward(self, x):
        h = self.fc(x) * 300
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.out(h)


@pytest.mark.parametrize("model_cls", [_Energy, _RmsNorm])
def test_fp16_overflow_in_reductions_is_avoided(model_cls):
    torch.manual_seed(0)
    model = model_cls().eval()
    x = torch.randn(8, 64)
    with torch.no_grad():
        want = model(x)
        hidden = model.fc(x) * 300
        blanket = copy.deepcopy(model).half()(x.half())
    assert hidden.abs().max() < torch.finfo(torch.float16).max  # the activation itself fits fp16
    assert not torch.isfinite(blanket).all() or rel_l2(want, blanket) > 0.5  # .half() is broken
    gm = rewriter.convert(model, (x,), precision="fp16")
    with torch.no_grad():
        got = gm(x)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert rel_l2(want, got) <= FP16_MAX_REL_L2
    assert {p.dtype for p in gm.parameters()} == {torch.float16}


# ------------------------------------------------------------------ idempotence


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.conv(x)))).mean((2, 3))
        return self.fc(self.ln(h))


def test_converting_a_converted_model_returns_it_unchanged():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = rewriter.convert(_Small().eval(), (x,), precision="bf16")
    assert is_converted(gm)
    code, state = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    again = rewriter.convert(gm, (x,), precision="bf16")
    assert again is gm
    assert gm.code == code
    assert all(torch.equal(v, gm.state_dict()[k]) and v.dtype == gm.state_dict()[k].dtype
               for k, v in state.items())


def test_converting_a_converted_model_to_another_precision_is_refused():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = rewriter.convert(_Small().eval(), (x,), precision="bf16")
    with pytest.raises(rewriter.ConfigError, match="already converted to bf16"):
        rewriter.convert(gm, (x,), precision="fp16")


# ------------------------------------------------------------------ the input model is not mutated


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_convert_does_not_mutate_the_input_model(mode):
    torch.manual_seed(0)
    model = _Small()
    with torch.no_grad():  # non-trivial statistics, so a change would show
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    model.train()
    model.ln.eval()   # mixed flags must come back exactly as they were
    flags = {name: m.training for name, m in model.named_modules()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    model.fc.weight.requires_grad_(False)
    grads["fc.weight"] = False
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 8, 8)
    x_before = x.clone()

    gm = rewriter.convert(model, (x,), precision="fp16", mode=mode)

    after = model.state_dict()
    assert list(after) == list(state)
    for key, value in state.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key], value), key
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads
    assert torch.equal(x, x_before)
    # and the converted model does not share storage with it
    originals = {t.data_ptr() for t in model.state_dict().values() if t.numel()}
    assert not any(t.data_ptr() in originals for t in gm.state_dict().values() if t.numel())


# ------------------------------------------------------------------ call structure


def test_converted_model_is_called_like_the_original():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.ln = nn.LayerNorm(8)

        def forward(self, x, *, scale=None, mask):
            h = self.fc(x) * (1 if scale is None else scale)
            return {"logits": self.ln(h), "pair": (h.masked_fill(mask, 0.0), mask.sum())}

    torch.manual_seed(0)
    model = Net().eval()
    x, mask = torch.randn(4, 8), torch.rand(4, 8) > 0.5
    gm = rewriter.convert(model, (x,), {"mask": mask}, precision="fp16")
    x2, mask2 = torch.randn(6, 8), torch.rand(6, 8) > 0.5
    with torch.no_grad():
        want, got = model(x2, mask=mask2), gm(x2, mask=mask2)
    assert set(got) == {"logits", "pair"} and isinstance(got["pair"], tuple)
    assert got["logits"].dtype == torch.float32 and got["pair"][0].dtype == torch.float32
    assert got["pair"][1].dtype == torch.int64 and int(got["pair"][1]) == int(want["pair"][1])
    assert rel_l2(want["logits"], got["logits"]) <= 2e-3
    assert rel_l2(want["pair"][0], got["pair"][0]) <= 2e-3
