"""The fast forward runs every op the standard forward runs, with the same results (bit for bit on the
CPU): a sweep over aten ops as torch.export captures them, tuple-returning ops included
(broadcast_tensors, split, chunk, unbind, topk, sort, max.dim, var_mean, native_layer_norm...), and
ops whose Python binding defaults differently from the schema (the losses' `reduction`)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rewriter
from rewriter.backends import fast_forward
from rewriter.capture import capture


def _x(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


A = _x(2, 3, 8)
B = _x(2, 3, 8, seed=1)
ROW = _x(8, seed=2)
IDX = torch.tensor([[0, 2, 1], [1, 0, 2]])

# name -> (function of (a, b), inputs)
OPS = {
    # tuple-returning ops
    "broadcast_tensors": lambda a, b: torch.broadcast_tensors(a, b[:1]),
    "split": lambda a, b: torch.split(a, 3, dim=-1),
    "split_with_sizes": lambda a, b: torch.split(a, [2, 6], dim=-1),
    "tensor_split": lambda a, b: torch.tensor_split(a, 3, dim=-1),
    "chunk": lambda a, b: a.chunk(4, dim=-1),
    "unbind": lambda a, b: a.unbind(1),
    "topk": lambda a, b: a.topk(3, dim=-1),
    "sort": lambda a, b: a.sort(dim=-1, descending=True),
    "max.dim": lambda a, b: a.max(dim=-1),
    "min.dim": lambda a, b: a.min(dim=1, keepdim=True),
    "aminmax": lambda a, b: torch.aminmax(a, dim=-1),
    "kthvalue": lambda a, b: a.kthvalue(2, dim=-1),
    "median.dim": lambda a, b: a.median(dim=-1),
    "mode": lambda a, b: a.round().mode(dim=-1),
    "cummax": lambda a, b: a.cummax(dim=-1),
    "var_mean": lambda a, b: torch.var_mean(a, dim=-1, correction=0),
    "std_mean": lambda a, b: torch.std_mean(a, dim=(1, 2)),
    "native_layer_norm": lambda a, b: torch.native_layer_norm(a, [8], ROW, ROW, 1e-5),
    "frexp": lambda a, b: torch.frexp(a),
    "meshgrid": lambda a, b: torch.meshgrid(a[0, 0], a[1, 1], indexing="ij"),
    "unsafe_split": lambda a, b: torch.unsafe_split(a, 4, dim=-1),
    # losses (the Python bindings default to reduction="none")
    "mse_loss": lambda a, b: F.mse_loss(a, b),
    "l1_loss": lambda a, b: F.l1_loss(a, b),
    "smooth_l1_loss": lambda a, b: F.smooth_l1_loss(a, b, beta=0.5),
    "huber_loss": lambda a, b: F.huber_loss(a, b, delta=0.7),
    "mse_loss_sum": lambda a, b: F.mse_loss(a, b, reduction="sum"),
    "kl_div": lambda a, b: F.kl_div(a.log_softmax(-1), b.softmax(-1), reduction="batchmean"),
    "cross_entropy": lambda a, b: F.cross_entropy(a.flatten(0, 1), IDX.flatten() % 8),
    "nll_loss": lambda a, b: F.nll_loss(a.flatten(0, 1).log_softmax(-1), IDX.flatten()),
    "bce_with_logits": lambda a, b: F.binary_cross_entropy_with_logits(a, b.sigmoid()),
    "cosine_embedding": lambda a, b: F.cosine_similarity(a, b, dim=-1),
    # ops whose torch.* name is a Python wrapper
    "einsum": lambda a, b: torch.einsum("bij,bkj->bik", a, b),
    "tensordot": lambda a, b: torch.tensordot(a, b, dims=([2], [2])),
    "norm": lambda a, b: torch.norm(a, dim=-1),
    "cdist": lambda a, b: torch.cdist(a, b),
    "block_diag": lambda a, b: torch.block_diag(a[0], b[0]),
    "cartesian_prod": lambda a, b: torch.cartesian_prod(a[0, 0, :3], b[0, 0, :3]),
    "atleast_3d": lambda a, b: torch.atleast_3d(a[0, 0]) + 1,
    # everyday ops
    "linear": lambda a, b: F.linear(a, b[0], ROW[:3]),
    "matmul": lambda a, b: a @ b.transpose(-1, -2),
    "baddbmm": lambda a, b: torch.baddbmm(a[:, :, :3], a, b.transpose(-1, -2), beta=0.5, alpha=2.0),
    "softmax": lambda a, b: a.softmax(-1),
    "log_softmax": lambda a, b: F.log_softmax(a, dim=1),
    "layer_norm": lambda a, b: F.layer_norm(a, (8,), ROW, ROW),
    "group_norm": lambda a, b: F.group_norm(a, 3),
    "gelu_tanh": lambda a, b: F.gelu(a, approximate="tanh"),
    "silu": lambda a, b: F.silu(a),
    "leaky_relu": lambda a, b: F.leaky_relu(a, 0.3),
    "hardtanh": lambda a, b: F.hardtanh(a, -0.5, 0.5),
    "elu": lambda a, b: F.elu(a),
    "softplus": lambda a, b: F.softplus(a, beta=2.0),
    "where": lambda a, b: torch.where(a > 0, a, b),
    "where_scalar": lambda a, b: torch.where(a > 0, a, -1.5),
    "masked_fill": lambda a, b: a.masked_fill(b > 0, -1e4),
    "clamp": lambda a, b: a.clamp(-0.5, 0.5),
    "clamp_min": lambda a, b: a.clamp(min=0.1),
    "pow": lambda a, b: a.abs().pow(1.5),
    "rsqrt": lambda a, b: (a.abs() + 1).rsqrt(),
    "div_mode": lambda a, b: torch.div(a, b.abs() + 1, rounding_mode="floor"),
    "sum_dim": lambda a, b: a.sum(dim=(0, 2)),
    "mean_keepdim": lambda a, b: a.mean(-1, keepdim=True),
    "amax": lambda a, b: a.amax(dim=1),
    "argmax": lambda a, b: a.argmax(dim=-1),
    "cumsum": lambda a, b: a.cumsum(-1),
    "logsumexp": lambda a, b: a.logsumexp(-1),
    "prod": lambda a, b: a.prod(-1),
    "var": lambda a, b: a.var(-1, unbiased=False),
    "cat": lambda a, b: torch.cat([a, b], dim=1),
    "stack": lambda a, b: torch.stack([a, b], dim=0),
    "flip": lambda a, b: a.flip(-1),
    "roll": lambda a, b: a.roll(2, dims=-1),
    "pad": lambda a, b: F.pad(a, (1, 2)),
    "pad_reflect": lambda a, b: F.pad(a, (1, 2), mode="reflect"),
    "gather": lambda a, b: a.gather(-1, IDX.unsqueeze(-1).expand(2, 3, 4)),
    "index_select": lambda a, b: a.index_select(-1, IDX[0]),
    "index": lambda a, b: a[:, IDX[0]],
    "scatter_add": lambda a, b: a.scatter_add(-1, IDX.unsqueeze(-1).expand(2, 3, 2), b[..., :2]),
    "index_put": lambda a, b: a.index_put((IDX[0] % 2,), b[0], accumulate=True),
    "expand": lambda a, b: ROW.expand(2, 3, 8) + a,
    "repeat": lambda a, b: a.repeat(1, 2, 1),
    "tril": lambda a, b: a.tril(),
    "triu_diag": lambda a, b: a.triu(1),
    "arange": lambda a, b: a + torch.arange(8, dtype=a.dtype),
    "full": lambda a, b: a + torch.full((8,), 0.25),
    "zeros_like": lambda a, b: torch.zeros_like(a) + a,
    "interpolate": lambda a, b: F.interpolate(a, scale_factor=2, mode="linear"),
    "avg_pool1d": lambda a, b: F.avg_pool1d(a, 2),
    "max_pool1d": lambda a, b: F.max_pool1d(a, 2),
    "adaptive_avg_pool1d": lambda a, b: F.adaptive_avg_pool1d(a, 3),
    "conv1d": lambda a, b: F.conv1d(a, b[:, :, :3], padding=1),
    "unfold": lambda a, b: a.unfold(-1, 4, 2),
    "sdpa": lambda a, b: F.scaled_dot_product_attention(a, b, b, is_causal=True),
    "dropout_eval": lambda a, b: F.dropout(a, 0.5, training=False),
    "to_dtype": lambda a, b: a.to(torch.bfloat16).float(),
    "type_as": lambda a, b: a.type_as(IDX).float(),
}


class _Op(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, a, b):
        return self.fn(a, b)


def _flat(out):
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _same(fast, standard) -> bool:
    fast, standard = _flat(fast), _flat(standard)
    return len(fast) == len(standard) and all(
        f.dtype == s.dtype and f.shape == s.shape and torch.equal(f, s) for f, s in zip(fast, standard))


@pytest.mark.parametrize("name", sorted(OPS))
def test_fast_forward_runs_every_op_like_the_standard_forward(name):
    gm = capture(_Op(OPS[name]), (A, B), {}, dynamic_batch=False).graph_module
    fast_forward.install(gm)
    standard = type(gm)._rw_standard_forward(gm, A, B)
    fast = gm(A, B)
    assert _same(fast, standard), name
    assert _same(standard, OPS[name](A, B)), name


def test_tuple_returning_ops_are_bound_and_wrapped_names_are_kept():
    """topk, sort, max.dim, var_mean, native_layer_norm, unbind go through their Python bindings;
    broadcast_tensors and split keep their OpOverload (torch.broadcast_tensors and torch.split are
    Python wrappers with other signatures)."""
    for name in ("topk", "sort", "max.dim", "var_mean", "native_layer_norm", "unbind", "mse_loss"):
        gm = capture(_Op(OPS[name]), (A, B), {}, dynamic_batch=False).graph_module
        assert fast_forward.install(gm)["ops_bound"] >= 1, name
    for name, op in (("broadcast_tensors", "aten.broadcast_tensors.default"), ("chunk", "aten.split.Tensor")):
        gm = capture(_Op(OPS[name]), (A, B), {}, dynamic_batch=False).graph_module
        assert fast_forward.install(gm)["ops_kept"].get(op) == 1, name


class _Losses(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, target):
        y = self.lin(x)
        return (F.mse_loss(y, target) + F.l1_loss(y, target) + F.smooth_l1_loss(y, target)
                + F.huber_loss(y, target))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_loss_models_run_after_conversion(precision):
    model = _Losses().eval()
    x, target = _x(4, 8), _x(4, 8, seed=3)
    fast = rewriter.convert(model, (x, target), precision=precision)
    assert fast_forward.is_installed(fast)
    out = fast(x, target)
    with torch.no_grad():
        ref = model(x, target)
    assert out.shape == ref.shape == torch.Size([])
    tol = {"fp16": 2e-3, "bf16": 2e-2}[precision]
    assert abs(out.item() - ref.item()) / abs(ref.item()) < tol
    assert torch.equal(out, type(fast)._rw_standard_forward(fast, x, target))
