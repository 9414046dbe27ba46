"""convert never harms its input and is safe under threads (issue 19 items 3, 4 and 9 of the report).

The fallback model calls a numpy helper (wrapped for torch.fx), so torch.export fails on it and
convert takes the torch.fx.symbolic_trace path.
"""
import copy
import threading

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn as nn

import rewriter


def _numpy_double(x):
    return torch.from_numpy(x.detach().float().numpy() * np.float32(2.0)).to(x.dtype)


torch.fx.wrap("_numpy_double")


class _Fallback(nn.Module):
    """conv -> batch norm -> numpy (export fails here) -> linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = _numpy_double(torch.relu(self.bn(self.conv(x))))
        return self.fc(y.mean((2, 3)))


class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.steps.add_(1)
        return self.fc(x)


def _state(model):
    return {k: (v.dtype, v.detach().clone()) for k, v in model.state_dict().items()}


def _assert_same_state(model, before):
    after = model.state_dict()
    assert set(after) == set(before), "buffers or parameters were added or deleted"
    for key, (dtype, value) in before.items():
        assert type(after[key]) in (torch.Tensor, nn.Parameter), f"{key} is a {type(after[key]).__name__}"
        assert after[key].dtype == dtype, f"{key} changed dtype to {after[key].dtype}"
        assert torch.equal(after[key], value), f"{key} changed value"


def _bn_with_stats(model):
    torch.manual_seed(0)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_fallback_leaves_the_model_alone(precision):
    model = _bn_with_stats(_Fallback())
    x = torch.randn(2, 3, 8, 8)
    before, ref = _state(model), model(x)
    fast = rewriter.convert(model, (x,), precision=precision)
    assert fast.meta["rewriter"]["capture"] == "torch.fx.symbolic_trace"
    assert fast(x).dtype == torch.float32
    _assert_same_state(model, before)
    assert torch.equal(model(x), ref), "the original model no longer computes what it did"
    assert all(m.training is False for m in model.modules())


def test_reference_run_buffer_writes_are_undone():
    model = _Counter().eval()
    rewriter.convert(model, (torch.randn(2, 8),), precision="bf16")
    assert model.steps.item() == 0


def _convert_in_threads(models, x, n=4):
    results, errors = [None] * n, []

    def work(i):
        try:
            results[i] = rewriter.convert(models[i], (x,), precision="bf16")
        except Exception as exc:  # collected, the test reports them
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


@pytest.mark.parametrize("shared", [True, False], ids=["one-model", "copies"])
def test_four_threads_convert(shared):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    before, ref = _state(model), model(x)
    models = [model] * 4 if shared else [copy.deepcopy(model) for _ in range(4)]
    results, errors = _convert_in_threads(models, x)
    assert errors == []
    for m in models:
        _assert_same_state(m, before)
    for gm in results:
        out = gm(x)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert out.dtype == torch.float32 and err < 2e-2, f"relative L2 {err:.3g} vs fp32"


class _Distill(nn.Module):
    """A student trained against a teacher run under torch.no_grad(), plus a frozen projection."""

    def __init__(self):
        super().__init__()
        self.teacher = nn.Linear(8, 8)
        self.student = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8).requires_grad_(False)

    def forward(self, x):
        with torch.no_grad():
            target = torch.tanh(self.teacher(x))
        return self.student(x) - target + self.frozen(x)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_train_mode_honours_no_grad_regions(precision):
    torch.manual_seed(0)
    model = _Distill()
    x = torch.randn(4, 8)
    fast = rewriter.convert(model, (x,), precision=precision, mode="train")
    fast.train()
    before = {k: v.detach().clone() for k, v in fast.named_parameters()}
    opt = torch.optim.SGD([p for p in fast.parameters() if p.requires_grad], lr=0.5)
    fast(x).float().pow(2).mean().backward()
    grads = {k: p.grad is not None for k, p in fast.named_parameters()}
    assert grads == {"teacher.weight": False, "teacher.bias": False, "student.weight": True,
                     "student.bias": True, "frozen.weight": False, "frozen.bias": False}
    opt.step()
    after = dict(fast.named_parameters())
    for name in ("teacher.weight", "teacher.bias", "frozen.weight", "frozen.bias"):
        assert torch.equal(after[name], before[name]), f"{name} moved on the optimizer step"
    assert not torch.equal(after["student.weight"], before["student.weight"])
    detaches = [n for n in fast.graph.nodes if n.target is torch.ops.aten.detach.default]
    assert len(detaches) == 1 and detaches[0].meta["rewriter.rewritten"][0]["pass"] == "capture"


# ---------------------------------------------------------------- reported, not silent (item 6)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Softmax(-1), nn.Linear(16, 4)).eval()


@pytest.mark.parametrize("key,closest", [("sofmax", "softmax"), ("0.linaer", "linear"), ("3", None),
                                         ("re:encoder\\..*", None)])
def test_override_matching_nothing_is_an_error(key, closest):
    with pytest.raises(rewriter.ConfigError, match="matches no op or module") as info:
        rewriter.convert(_mlp(), (torch.randn(2, 8),), precision="fp16", overrides={key: "fp32"})
    if closest:
        assert f"did you mean {closest!r}" in str(info.value)
    else:
        assert "modules: 0, 1, 2" in str(info.value)


def test_cli_override_typo_exits_2(tmp_path, capsys):
    from rewriter.cli import main

    path = tmp_path / "mlp.pt2"
    model, x = _mlp(), torch.randn(2, 8)
    torch.export.save(torch.export.export(model, (x,)), path)
    assert main(["convert", str(path), "--override", "sofmax=fp32", "-o", str(tmp_path / "o.pt2")]) == 2
    assert "did you mean 'softmax'" in capsys.readouterr().err


def test_nan_weights_are_reported():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.warns(UserWarning, match=r"NaN or Inf values \(0\.weight\)"):
        fast = rewriter.convert(model, (torch.randn(2, 8),), precision="bf16")
    record = fast.meta["rewriter"]
    assert "0.weight" in record["warnings"][0]
    assert record["notes"][0].startswith("warning: the model's weights hold NaN")
    assert "NaN" in str(rewriter.diff(model, fast))


def test_train_mode_model_converted_for_eval_is_reported():
    model = _mlp().train()
    with pytest.warns(UserWarning, match="is in training mode but is converted with mode='eval'"):
        fast = rewriter.convert(model, (torch.randn(2, 8),), precision="bf16")
    assert "training mode" in fast.meta["rewriter"]["warnings"][0]
    assert model.training, "convert must leave the caller's train/eval flags alone"


def test_diff_of_unrelated_models_refused():
    other = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    fast = rewriter.convert(other, (torch.randn(2, 64),), precision="bf16")
    with pytest.raises(rewriter.InputError, match="is not a conversion of 'before'"):
        rewriter.diff(_mlp(), fast)
    assert "saved" in str(rewriter.diff(other, fast))


# ---------------------------------------------------------------- fallback: modules with their own weights (item 7)


class _Recurrent(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(8, 8)
        self.inner = {"lstm": nn.LSTM(8, 8, batch_first=True), "gru": nn.GRU(8, 8, batch_first=True),
                      "mha": nn.MultiheadAttention(8, 2, batch_first=True)}[kind]

    def forward(self, x):
        y = _numpy_double(self.fc(x))
        out, extra = self.inner(y, y, y) if self.kind == "mha" else self.inner(y)
        return out, extra


@pytest.mark.parametrize("kind", ["lstm", "gru", "mha"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_fallback_modules_with_own_weights_get_fp32(kind, precision):
    torch.manual_seed(0)
    model = _Recurrent(kind).eval()
    x = torch.randn(2, 5, 8)
    ref = torch.utils._pytree.tree_leaves(model(x))
    fast = rewriter.convert(model, (x,), precision=precision)
    assert fast.meta["rewriter"]["capture"] == "torch.fx.symbolic_trace"
    got = torch.utils._pytree.tree_leaves(fast(x))
    assert [t.dtype for t in got] == [t.dtype for t in ref]  # keep_io_types
    module_call = next(n for n in fast.graph.nodes if n.op == "call_module" and n.target == "inner")
    assert module_call.meta["rewriter.decision"]["dtype"] == "float32"
    budget = {"fp16": 5e-3, "bf16": 4e-2}[precision]
    for r, g in zip(ref, got):
        assert ((g - r).norm() / r.norm()).item() < budget
