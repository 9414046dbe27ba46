"""InsertCasts: every node computes in its decided dtype, one shared cast per (value, dtype), model
inputs and outputs keep their dtypes, every cast says why it exists."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rewriter.passes.analysis import Assign, Classify
from rewriter.passes.graph_utils import is_cast
from rewriter.passes.infra import PassManager
from rewriter.passes import InsertCasts
from rewriter import meta
from rewriter.capture import capture
from rewriter.config import ConvertConfig

F16, BF16, F32 = "float16", "bfloat16", "float32"
_SKIP = {"_assert_tensor_metadata", "getitem", "sym_size"}


def _prepared(model, *inputs, **config):
    torch.manual_seed(0)
    gm = capture(model.eval(), inputs, {}).graph_module
    cfg = ConvertConfig(**config)
    PassManager([Classify(), Assign(cfg)])(gm)
    return gm, cfg


def _op(node) -> str:
    if is_cast(node):
        return "_to_copy"
    return (meta.get(node, meta.OP_CLASS) or {}).get("op", node.name)


def _trace(gm) -> list[tuple[str, str]]:
    """(op, dtype of its result) of the compute nodes and activation casts, in graph order."""
    rows = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or _op(node) in _SKIP:
            continue
        if is_cast(node) and node.args[0].op == "get_attr":
            continue  # weight casts: cast_weights turns them into 16-bit storage
        rows.append((_op(node), meta.dtype_name(meta.value_dtype(node))))
    return rows


def _insert(gm, cfg):
    result = PassManager([InsertCasts(cfg)])(gm)
    gm.graph.lint()
    return result


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.ln = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return torch.softmax(self.fc2(self.ln(F.gelu(self.fc1(x)))), -1)


@pytest.mark.parametrize("precision, low", [("fp16", F16), ("bf16", BF16)])
def test_ops_run_in_their_decided_dtype(precision, low):
    gm, cfg = _prepared(_Mlp(), torch.randn(4, 16), precision=precision)
    assert _insert(gm, cfg).modified is True
    assert _trace(gm) == [
        ("_to_copy", low), ("linear", low), ("gelu", low),
        ("_to_copy", F32), ("layer_norm", F32),
        ("_to_copy", low), ("linear", low),
        ("_to_copy", F32), ("softmax", F32),
    ]
    for node in gm.graph.nodes:  # the annotation matches what the graph computes
        decision = meta.get(node, meta.DECISION)
        if decision is not None:
            assert meta.dtype_name(meta.value_dtype(node)) == decision["dtype"], node.format_node()


def test_losses_reductions_exp_and_log_run_fp32():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 10)

        def forward(self, x, target):
            logits = self.fc(x)
            return (F.cross_entropy(logits, target), torch.exp(logits).sum(-1),
                    torch.log(torch.softmax(logits, -1)), F.mse_loss(logits, torch.zeros_like(logits)))

    gm, cfg = _prepared(Net(), torch.randn(4, 16), torch.randint(0, 10, (4,)))
    _insert(gm, cfg)
    rows = [row for row in _trace(gm) if row[0] != "broadcast_tensors"]
    assert rows == [
        ("_to_copy", F16), ("linear", F16),
        ("_to_copy", F32), ("cross_entropy_loss", F32), ("exp", F32), ("sum", F32),
        ("softmax", F32), ("log", F32),
        ("zeros_like", F16),                     # made in the dtype of its template, as autocast would
        ("_to_copy", F32), ("_to_copy", F32), ("mse_loss", F32),
    ]
    linear = next(n for n in gm.graph.nodes if _op(n) == "linear")
    up = [u for u in linear.users if is_cast(u)]
    assert len(up) == 1   # one fp32 copy of the logits, read by cross_entropy, exp and softmax
    assert sorted(_op(u) for u in up[0].users) == ["cross_entropy_loss", "exp", "softmax"]


def test_second_run_changes_nothing():
    gm, cfg = _prepared(_Mlp(), torch.randn(4, 16))
    assert _insert(gm, cfg).modified is True
    code = gm.code
    assert _insert(gm, cfg).modified is False
    assert gm.code == code


def test_values_match_autocast_placement():
    model = _Mlp().eval()
    x = torch.randn(4, 16)
    gm, cfg = _prepared(model, x)
    _insert(gm, cfg)
    with torch.no_grad():
        h = F.gelu(F.linear(x.half(), model.fc1.weight.half(), model.fc1.bias.half()))
        h = F.layer_norm(h.float(), (32,), model.ln.weight, model.ln.bias)
        want = torch.softmax(F.linear(h.half(), model.fc2.weight.half(), model.fc2.bias.half()).float(), -1)
        got = gm(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same ops in the same dtypes


def test_one_cast_per_value_and_dtype_shared_by_consumers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.a(x) * self.b(x) + self.c(x)

    gm, cfg = _prepared(Net(), torch.randn(2, 8))
    _insert(gm, cfg)
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    casts = [u for u in x.users if is_cast(u)]
    assert len(casts) == 1 and len(casts[0].users) == 3
    assert sum(1 for n in gm.graph.nodes if is_cast(n) and n.args[0].op != "get_attr") == 2  # x in, y out


def test_every_cast_records_the_pass_and_the_consumer():
    gm, cfg = _prepared(_Mlp(), torch.randn(4, 16))
    _insert(gm, cfg)
    casts = [n for n in gm.graph.nodes if is_cast(n)]
    assert casts
    for cast in casts:
        created = meta.get(cast, meta.CREATED)
        assert created["pass"] == "insert_casts"
        assert created["reason"], cast.format_node()
    ln_in = next(n for n in gm.graph.nodes if _op(n) == "layer_norm").args[0]
    assert meta.get(ln_in, meta.CREATED)["reason"] == (
        "layer_norm 'layer_norm' runs in float32 (op-table) but reads gelu in float16")


@pytest.mark.parametrize("keep_io_types", [True, False])
def test_model_inputs_and_outputs_keep_their_dtypes(keep_io_types):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x, ids):
            return self.fc(x), ids + 1, x

    x, ids = torch.randn(2, 8), torch.arange(6).reshape(2, 3)
    gm, cfg = _prepared(Net(), x, ids, keep_io_types=keep_io_types)
    _insert(gm, cfg)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [meta.value_dtype(p) for p in placeholders] == [torch.float32, torch.int64]
    assert not any(is_cast(u) for u in placeholders[1].users)  # integers are never cast
    out, plus, same = gm(x, ids)
    assert out.dtype == (torch.float32 if keep_io_types else torch.float16)
    assert plus.dtype == torch.int64 and same.dtype == torch.float32
    torch.testing.assert_close(same, x, rtol=0, atol=0)


def test_batch_norm_reads_its_statistics_in_fp32():
    # autocast leaves batch-norm parameters alone: the kernel reads a 16-bit input with fp32 statistics.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 32)
            self.bn = nn.BatchNorm1d(32)

        def forward(self, x):
            return torch.relu(self.bn(self.fc(x)))

    model = Net()
    with torch.no_grad():  # statistics that bf16 cannot hold exactly
        model.bn.running_mean.copy_(torch.randn(32) * 3)
        model.bn.running_var.copy_(torch.rand(32) * 5 + 0.1)
        model.bn.weight.copy_(1 + torch.randn(32) * 0.3)
        model.bn.bias.copy_(torch.randn(32) * 0.3)
    x = torch.randn(8, 16)
    gm, cfg = _prepared(model, x, precision="bf16")
    _insert(gm, cfg)
    bn = next(n for n in gm.graph.nodes if "batch_norm" in _op(n))
    assert meta.dtype_name(meta.value_dtype(bn.args[0])) == BF16
    assert all(arg.op == "get_attr" for arg in bn.all_input_nodes[1:])  # no casts on the statistics
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model.eval()(x)
    torch.testing.assert_close(gm(x), want.float(), rtol=0, atol=0)


def test_dtype_asserts_follow_the_rewrite():
    # torch.export guards `.float()` with an assert of the traced dtype; the linear is now fp16.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x).float() * 2

    model = Net().eval()
    x = torch.randn(2, 8)
    gm, cfg = _prepared(model, x)
    assert _insert(gm, cfg).modified is True
    asserts = [n for n in gm.graph.nodes if _op(n) == "_assert_tensor_metadata"]
    assert len(asserts) == 1
    assert meta.value_dtype(asserts[0].args[0]) == torch.float16
    assert torch.float16 in (*asserts[0].args, *asserts[0].kwargs.values())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=2e-3, atol=2e-3)  # runs, and is right
    assert _insert(gm, cfg).modified is False


def test_tensor_factories_follow_their_templates_dtype():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            h = self.fc(x)
            return torch.zeros_like(h) + 1, h.new_ones(h.shape)

    x = torch.randn(2, 8)
    gm, cfg = _prepared(Net(), x)
    _insert(gm, cfg)
    rows = dict(_trace(gm))
    assert rows["zeros_like"] == F16 and rows["new_ones"] == F16
    outputs = gm(x)
    assert [o.dtype for o in outputs] == [torch.float32, torch.float32]
    torch.testing.assert_close(outputs[0], torch.ones(2, 8), rtol=0, atol=0)


class _Lerp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x, y):
        return torch.lerp(self.fc(x), y, 0.5)


class _IndexPut(_Lerp):
    def forward(self, x, y):
        return y.index_put((torch.tensor([0, 2]),), self.fc(x)[:2])


class _MseLoss(_Lerp):
    def forward(self, x, y):
        return F.mse_loss(self.fc(x), y * 1e5)   # targets beyond fp16's range


@pytest.mark.parametrize("model_cls, op", [(_Lerp, "lerp"), (_IndexPut, "index_put"),
                                           (_MseLoss, "broadcast_tensors")])
def test_promote_ops_that_need_equal_dtypes_get_their_inputs_cast(model_cls, op):
    # add(fp16, fp32) promotes inside its kernel; lerp, index_put and broadcast_tensors do not, so the
    # fp16 input is cast up to the widest dtype, as autocast's promote policy does.
    torch.manual_seed(0)
    model = model_cls().eval()
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    gm, cfg = _prepared(model, x, y)
    _insert(gm, cfg)
    node = next(n for n in gm.graph.nodes if _op(n) == op)
    assert meta.get(node, meta.DECISION)["dtype"] == F32
    assert {meta.value_dtype(n) for n in node.all_input_nodes if meta.is_float_dtype(meta.value_dtype(n))} \
        == {torch.float32}
    with torch.no_grad():
        got, want = gm(x, y), model(x, y)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def test_natively_promoting_ops_read_mixed_inputs_without_a_cast():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 4)

        def forward(self, x, y):
            return torch.where(y > 0, self.fc(x), y) + y

    x, y = torch.randn(8, 16), torch.randn(8, 4)
    gm, cfg = _prepared(Net(), x, y)
    _insert(gm, cfg)
    where = next(n for n in gm.graph.nodes if _op(n) == "where")
    linear = next(n for n in gm.graph.nodes if _op(n) == "linear")
    assert linear in where.all_input_nodes                  # reads the fp16 linear directly ...
    assert meta.value_dtype(where) == torch.float32         # ... and computes in fp32
    assert gm(x, y).dtype == torch.float32
