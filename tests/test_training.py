"""Training mode: fp32 master weights, gradients through the casts, train()/eval() like the original,
loss scaling that rescues underflowing fp16 gradients and skips overflowing steps, and a CNN that
trains to fp32's accuracy in fp16 and bf16."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rewriter
from rewriter.passes.graph_utils import is_cast
from rewriter import meta
from rewriter.errors import ConfigError
from rewriter.loss_scale import LossScaler, make_scaler
from rewriter.training import TrainEvalGraphModule
from helpers import rel_l2


# Relative L2 error of each parameter gradient against fp32, and the most it may exceed autocast's
# error on the same model and batch (measured: fp16 ~1e-3, bf16 ~4e-2 on the batch-norm bias, both
# within 10 % of autocast's).
GRAD_FLOOR = {"fp16": 5e-3, "bf16": 8e-2}
VS_AUTOCAST = 1.5


class Net(nn.Module):
    """conv-BN-ReLU, linear, layer_norm, dropout, linear: every kind of op training mode touches."""

    def __init__(self, dropout: float = 0.3):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)  # bias before BN has no gradient
        self.bn = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 8 * 8, 64)
        self.ln = nn.LayerNorm(64)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc2(self.drop(F.gelu(self.ln(self.fc1(h)))))


def _data(n=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Net()


@pytest.fixture(scope="module")
def converted(net):
    """{precision: converted Net}; tests that train deep-copy them."""
    x, _ = _data()
    return {p: rewriter.convert(net, (x,), precision=p, mode="train") for p in ("fp16", "bf16")}


def _grads(model, x, y, *, autocast_dtype=None, seed=1):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout mask in every run
    if autocast_dtype is None:
        out = model(x)
    else:
        with torch.autocast("cpu", dtype=autocast_dtype):
            out = model(x)
    F.cross_entropy(out.float(), y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_grads_like_autocast(ours: dict, ref: dict, amp: dict, precision: str) -> None:
    """Every gradient is fp32 (master weights), within GRAD_FLOOR of fp32's and no more than
    VS_AUTOCAST times autocast's error."""
    assert set(ours) == set(ref)
    for name in ref:
        assert ours[name].dtype == torch.float32, name
        err, amp_err = rel_l2(ref[name], ours[name]), rel_l2(ref[name], amp[name])
        assert err <= GRAD_FLOOR[precision], (name, err)
        assert err <= VS_AUTOCAST * amp_err + 1e-4, (name, err, amp_err)


# ---------------------------------------------------------------- master weights and structure


def test_parameters_are_fp32_trainable_shared_and_named_like_the_original(net, converted):
    gm = converted["fp16"]
    assert isinstance(gm, TrainEvalGraphModule) and gm.training == net.training
    # convert ran the model in training mode, yet left its batch-norm statistics alone
    assert int(net.bn.num_batches_tracked) == 0 and not net.bn.running_mean.any()
    params = dict(gm.named_parameters())
    assert list(params) == [n for n, _ in net.named_parameters()]
    assert set(gm.state_dict()) == set(net.state_dict())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params.values())
    for graph in gm.graphs().values():
        getters = [n for n in graph.nodes if n.op == "get_attr" and n.target in params]
        assert {n.target for n in getters} == set(params)
        for node in getters:  # both graphs read the very objects the optimizer updates
            assert gm.get_parameter(node.target) is params[node.target]
        # the casts sit inside the graph, after the fp32 parameters
        cast_weights = {n.args[0].target for n in graph.nodes
                        if is_cast(n) and n.args[0].op == "get_attr" and n.kwargs["dtype"] == torch.float16}
        assert cast_weights == {"conv.weight", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    for node in gm.graph.nodes:  # batch norm: 16-bit input, fp32 parameters and statistics
        if node.op == "call_function" and "batch_norm" in str(node.target):
            assert [a.op for a in node.args[1:5]] == ["get_attr"] * 4


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_gradients_match_fp32_as_closely_as_autocast(net, converted, precision, dtype):
    x, y = _data()
    model = copy.deepcopy(net).train()
    ref = _grads(model, x, y)
    amp = _grads(model, x, y, autocast_dtype=dtype)
    ours = _grads(copy.deepcopy(converted[precision]).train(), x, y)
    assert_grads_like_autocast(ours, ref, amp, precision)


def test_master_weights_stay_fp32_after_optimizer_steps(net, converted):
    gm = copy.deepcopy(converted["fp16"]).train()
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    ids = {n: id(p) for n, p in gm.named_parameters()}
    opt = torch.optim.AdamW(gm.parameters(), lr=1e-2)
    scaler = make_scaler(gm)
    x, y = _data()
    for _ in range(3):
        opt.zero_grad()
        scaler.backward(F.cross_entropy(gm(x), y))
        assert not scaler.step(opt, max_grad_norm=1.0).skipped
    for n, p in gm.named_parameters():
        assert p.dtype == torch.float32 and p.requires_grad and id(p) == ids[n]
        assert not torch.equal(p, before[n]), f"{n} was not updated"
        assert all(v.dtype == torch.float32 for v in opt.state[p].values() if v.is_floating_point())
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), converted["fp16"].parameters()))


# ---------------------------------------------------------------- train() / eval()


def test_train_and_eval_switch_dropout_and_batch_norm_like_the_original(net, converted):
    gm = copy.deepcopy(converted["bf16"])
    model = copy.deepcopy(net)
    x, _ = _data()
    gm.train()
    stats = gm.bn.running_mean.clone()
    torch.manual_seed(3)
    gm(x)
    torch.manual_seed(3)
    model.train()(x)
    assert not torch.equal(gm.bn.running_mean, stats), "batch-norm statistics were not updated"
    assert torch.allclose(gm.bn.running_mean, model.bn.running_mean, rtol=2e-2, atol=1e-3)
    assert torch.allclose(gm.bn.running_var, model.bn.running_var, rtol=2e-2, atol=1e-3)
    assert int(gm.bn.num_batches_tracked) == int(model.bn.num_batches_tracked) == 1
    assert not torch.equal(gm(x), gm(x)), "dropout is off in train()"
    gm.eval()
    model.eval()
    stats = gm.bn.running_mean.clone()
    a, b = gm(x), gm(x)
    assert torch.equal(a, b), "dropout is on in eval()"
    assert torch.equal(gm.bn.running_mean, stats), "eval() updated batch-norm statistics"
    assert rel_l2(model(x), a) < 3e-2
    assert torch.equal(copy.deepcopy(gm)(x), a), "a deep copy runs the same graphs"


class _AuxHead(nn.Module):
    """Returns an auxiliary output in training only (GoogLeNet style): a Python branch on training."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(8, 8), nn.Linear(8, 2), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.body(x))
        if self.training:
            return self.head(h), self.aux(h)
        return self.head(h)


def test_mode_dependent_python_branches_and_output_structure():
    torch.manual_seed(0)
    model, x = _AuxHead(), torch.randn(4, 8)
    gm = rewriter.convert(model, (x,), precision="bf16", mode="train")
    out = gm.train()(x)
    assert isinstance(out, tuple) and len(out) == 2
    sum(o.float().sum() for o in out).backward()
    assert gm.aux.weight.grad is not None
    assert isinstance(gm.eval()(x), torch.Tensor)
    assert rel_l2(model.eval()(x), gm(x)) < 2e-2


def test_state_dict_round_trip_and_tied_weights():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(20, 16), nn.Linear(16, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    torch.manual_seed(0)
    model, ids = Tied(), torch.randint(0, 20, (4, 6))
    gm = rewriter.convert(model, (ids,), precision="fp16", mode="train")
    assert len(list(gm.parameters())) == 1, "tied weights must stay one parameter"
    gm(ids).float().sum().backward()
    model(ids).sum().backward()
    assert rel_l2(model.emb.weight.grad, gm.emb.weight.grad) < 5e-3  # both uses reach one gradient
    other = Tied()
    gm.load_state_dict(other.state_dict())  # strict: same keys as the original
    assert torch.equal(gm.head.weight, other.emb.weight)


# ---------------------------------------------------------------- overrides and measurements


def test_overrides_apply_to_both_graphs_in_train_mode(net):
    x, y = _data()
    gm = rewriter.convert(net, (x,), precision="fp16", mode="train", overrides={"fc2": "fp32"})
    for graph in gm.graphs().values():
        linears = {meta.module_path(n): meta.get(n, meta.DECISION) for n in graph.nodes
                   if n.op == "call_function" and n.target is torch.ops.aten.linear.default}
        assert linears["fc2"]["dtype"] == "float32" and linears["fc2"]["rule"] == "override:module"
        assert linears["fc1"]["dtype"] == "float16"
    gm.train()
    F.cross_entropy(gm(x), y).backward()
    assert all(p.grad is not None for p in gm.parameters())


class _Overflow(nn.Module):
    """`big` produces ~1e5: over fp16's 65504, so calibration must keep it fp32."""

    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.big = nn.Linear(16, 32), nn.Dropout(0.1), nn.Linear(32, 32)
        self.norm, self.head = nn.LayerNorm(32), nn.Linear(32, 4)
        with torch.no_grad():
            self.big.weight.mul_(1e5)

    def forward(self, x):
        return self.head(self.norm(self.big(self.drop(torch.relu(self.fc1(x))))))


def test_calibration_decisions_apply_to_both_graphs_in_train_mode():
    torch.manual_seed(0)
    model, x = _Overflow(), torch.randn(8, 16)
    calibration = [(torch.randn(8, 16),) for _ in range(2)]
    gm = rewriter.convert(model, (x,), precision="fp16", mode="train", calibration=calibration)
    for graph in gm.graphs().values():
        linears = {meta.module_path(n): meta.get(n, meta.DECISION) for n in graph.nodes
                   if n.op == "call_function" and n.target is torch.ops.aten.linear.default}
        assert (linears["big"]["dtype"], linears["big"]["rule"]) == ("float32", "analysis:range")
        assert linears["fc1"]["dtype"] == linears["head"]["dtype"] == "float16"
    out = gm.train()(x)
    assert out.isfinite().all()
    out.sum().backward()
    assert gm.big.weight.grad.isfinite().all()


# ---------------------------------------------------------------- loss scaling


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _regression_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 32, generator=g), torch.randn(64, 4, generator=g)


def _regression(model, steps, *, scaled, tiny=1e-7):
    """SGD on loss * tiny with lr / tiny: in exact arithmetic the same updates as plain SGD, but fp16
    gradients of ~1e-9 flush to zero unless the loss is scaled."""
    x, target = _regression_data()
    scaler = make_scaler(model) if scaled else LossScaler(False, device="cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1 / tiny)
    losses, zero_grads = [], 0
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        losses.append(loss.item())
        scaler.backward(loss * tiny)
        zero_grads += all(float(p.grad.abs().max()) == 0.0 for p in model.parameters() if p.dim() == 2)
        scaler.step(opt)
    return losses, zero_grads, scaler


def test_planted_underflow_trains_with_scaling_and_stalls_without():
    torch.manual_seed(0)
    model = _MLP()
    fp16 = rewriter.convert(model, (_regression_data()[0],), precision="fp16", mode="train")
    ref, _, _ = _regression(model, 20, scaled=False)
    stalled, zero_grads, _ = _regression(copy.deepcopy(fp16), 20, scaled=False)
    rescued, rescued_zero, scaler = _regression(copy.deepcopy(fp16), 20, scaled=True)
    assert ref[-1] < 0.7 * ref[0]
    assert zero_grads == 20 and stalled[-1] == stalled[0], "fp16 gradients should flush to zero"
    assert rescued_zero == 0 and scaler.enabled and not scaler.skipped
    assert abs(rescued[-1] - ref[-1]) <= 0.02 * ref[-1], (rescued[-1], ref[-1])


def test_overflow_step_is_skipped_and_the_scale_backs_off(converted):
    gm = copy.deepcopy(converted["fp16"]).train()
    opt = torch.optim.SGD(gm.parameters(), lr=1e-2)
    scaler = make_scaler(gm, growth_interval=3)
    assert scaler.enabled and scaler.scale == 2.0 ** 16
    x, y = _data()

    def step(factor=1.0):
        opt.zero_grad()
        scaler.backward(F.cross_entropy(gm(x), y) * factor)
        return scaler.step(opt, max_grad_norm=10.0)

    assert not step().skipped
    before = [p.detach().clone() for p in gm.parameters()]
    info = step(factor=1e6)  # 1e6 * 2^16 overflows fp16 in backward
    assert info.skipped and info.scale == 2.0 ** 16
    assert all(torch.equal(a, b) for a, b in zip(before, gm.parameters())), "a skipped step moved weights"
    assert scaler.scale == 2.0 ** 15 and scaler.skipped == [1]
    for _ in range(3):
        assert not step().skipped
    assert scaler.scale == 2.0 ** 16, "the scale grows back after growth_interval clean steps"
    assert scaler.history == [(0, 2.0 ** 16), (2, 2.0 ** 15), (5, 2.0 ** 16)]
    state = scaler.state_dict()
    again = make_scaler("fp16", device="cpu")
    again.load_state_dict(state)
    assert again.scale == scaler.scale and again.history == scaler.history


def test_bf16_needs_no_scaling_and_says_so(converted):
    scaler = make_scaler(converted["bf16"])
    assert not scaler.enabled and "exponent range" in scaler.reason and scaler.scale == 1.0
    assert "disabled" in repr(scaler)
    assert make_scaler(converted["fp16"]).enabled
    assert make_scaler(Net()).enabled is False  # an unconverted fp32 model
    with pytest.raises(ConfigError, match="backoff_factor"):
        LossScaler(device="cpu", backoff_factor=1.0)


# ---------------------------------------------------------------- distributed wrapping


def test_converted_model_is_wrappable_by_ddp_and_fsdp2(converted, tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.fsdp import fully_shard

    x, y = _data()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(converted["bf16"]).train())
        F.cross_entropy(ddp(x), y).backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ddp.parameters())

        sharded = fully_shard(copy.deepcopy(converted["bf16"]).train())
        opt = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(sharded(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        assert [n for n, _ in sharded.named_parameters()] == [n for n, _ in converted["bf16"].named_parameters()]
        sharded.eval()
        assert torch.equal(sharded(x), sharded(x))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- the demo's CNN


def _train_demo():
    from tools import train_demo

    return train_demo


def test_digits_cnn_reaches_fp32_accuracy_in_fp16_and_bf16():
    demo = _train_demo()
    task = demo.digits_task(seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small kernels: one thread is fastest, and the suite runs 2 workers
    try:
        runs = {p: demo.train(task, p, steps=200, seed=0) for p in ("fp32", "fp16", "bf16")}
    finally:
        torch.set_num_threads(threads)
    assert runs["fp32"].accuracy > 0.95
    for p in ("fp16", "bf16"):
        gap = 100 * (runs["fp32"].accuracy - runs[p].accuracy)
        assert gap <= 1.0, f"{p} is {gap:.2f} percentage points below fp32"
    assert runs["fp16"].scale_history[0] == (0, 2.0 ** 16)
    assert runs["bf16"].scale_history == [(0, 1.0)]
