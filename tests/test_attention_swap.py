"""Batch-first nn.MultiheadAttention at capture (rewriter/attention_swap.py): torchvision's ViT exports
without the sequence-first transposes and copies, with the same parameters, module paths, outputs and
gradients, the user's model untouched, and every call the swap cannot mirror left on the original path.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import rewriter
import rewriter.capture as capture_module
from rewriter.passes.graph_utils import is_cast
from rewriter import meta
from rewriter.attention_swap import BatchFirstSelfAttention, batch_first_copy, module_is_eligible
from rewriter.capture import capture
from test_models import AUTOCAST_EPS, AUTOCAST_SLACK, MAX_REL_L2, max_rel_l2, per_sample_rel_l2
from test_training import assert_grads_like_autocast

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
LAYOUT_OPS = {torch.ops.aten.transpose.int, torch.ops.aten.permute.default, torch.ops.aten.clone.default}
ATTENTION = "encoder.layers.encoder_layer_0.self_attention"


def _vit() -> nn.Module:
    from torchvision.models import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64,
                              mlp_dim=128)
    model.heads = nn.Identity()  # the head is zero-initialised: compare the class-token features
    return model.eval()


def _images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _no_swap(monkeypatch):
    monkeypatch.setattr(capture_module, "batch_first_copy", lambda model: (model, []))


def _layout_ops(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in LAYOUT_OPS)


def _sdpa(gm) -> list:
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and "scaled_dot_product" in str(n.target)]


def _notes(node) -> list[dict]:
    return [r for r in meta.get(node, meta.REWRITTEN) or [] if r["pass"] == "capture"]


def _attention_classes(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def vit():
    return _vit()


@pytest.fixture(scope="module")
def converted(vit):
    """{precision: converted ViT}, each converted once, and the ViT's state before converting."""
    before = _state(vit)
    out = {p: rewriter.convert(vit, (_images(4, 0),), precision=p) for p in DTYPES}
    return out, before


# ------------------------------------------------------------------ the module, eager, fp32


class _Self(nn.Module):
    """One attention call, with whatever arguments the test passes."""

    def __init__(self, dropout: float = 0.0, **mha):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(32, 4, dropout=dropout, batch_first=True, **mha)
        with torch.no_grad():  # non-zero biases, so a wrong bias layout shows
            self.attn.in_proj_bias.normal_()
            self.attn.out_proj.bias.normal_()

    def forward(self, x, **kwargs):
        return self.attn(x, x, x, need_weights=False, **kwargs)[0]


def _masks(batch: int, length: int, heads: int) -> dict[str, dict]:
    gen = torch.Generator().manual_seed(3)
    keep_first = torch.zeros(batch, length, dtype=torch.bool)
    keep_first[0, length // 2:] = True  # padding at the end of the first sequence
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
    return {
        "none": {},
        "bool 2-D": {"attn_mask": (torch.rand(length, length, generator=gen) > 0.7)
                     & ~torch.eye(length, dtype=torch.bool)},  # True: not allowed; each row keeps one
        "float 2-D": {"attn_mask": torch.randn(length, length, generator=gen)},
        "bool 3-D": {"attn_mask": (torch.rand(batch * heads, length, length, generator=gen) > 0.7)
                     & ~torch.eye(length, dtype=torch.bool)},
        "float 3-D": {"attn_mask": torch.randn(batch * heads, length, length, generator=gen)},
        "bool padding": {"key_padding_mask": keep_first},
        "float padding": {"key_padding_mask": torch.randn(batch, length, generator=gen)},
        "bool 2-D + padding": {"attn_mask": causal, "key_padding_mask": keep_first},
        "float 3-D + padding": {"attn_mask": torch.randn(batch * heads, length, length, generator=gen),
                                "key_padding_mask": torch.randn(batch, length, generator=gen)},
        "causal": {"attn_mask": causal, "is_causal": True},
        "causal + padding": {"attn_mask": causal, "key_padding_mask": keep_first, "is_causal": True},
    }


def _output_and_grads(model, x, kwargs):
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x, **kwargs)
    out.square().sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(_masks(3, 7, 4)))
def test_batch_first_forward_matches_nn_multihead_attention(case, train):
    model = _Self().train(train)
    swapped, paths = batch_first_copy(model)
    assert paths == ["attn"] and type(swapped.attn) is BatchFirstSelfAttention
    assert swapped.attn.in_proj_weight is model.attn.in_proj_weight  # the very same parameters
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1))
    kwargs = _masks(3, 7, 4)[case]
    want, want_dx, want_dw = _output_and_grads(model, x, kwargs)
    got, got_dx, got_dw = _output_and_grads(swapped, x, kwargs)
    assert swapped.attn.__dict__["_rewriter_batch_first_calls"].calls == [True]  # it did run batch-first
    torch.testing.assert_close(got, want, **FP32_TOL)
    torch.testing.assert_close(got_dx, want_dx, **FP32_TOL)
    assert set(got_dw) == set(want_dw)
    for name in want_dw:
        torch.testing.assert_close(got_dw[name], want_dw[name], **FP32_TOL, msg=name)


def test_dropout_in_training_uses_the_same_random_numbers():
    model = _Self(dropout=0.5).train()
    swapped, _ = batch_first_copy(model)
    x = torch.randn(2, 5, 32)
    torch.manual_seed(7)
    want = model(x)
    torch.manual_seed(7)
    got = swapped(x)
    assert swapped.attn.__dict__["_rewriter_batch_first_calls"].calls == [True]
    torch.testing.assert_close(got, want, **FP32_TOL)


class _Calls(nn.Module):
    """Attention calls the swap must leave to nn.MultiheadAttention."""

    def __init__(self, call: str):
        super().__init__()
        torch.manual_seed(0)
        self.call = call
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        if self.call == "need_weights":
            out, weights = self.attn(x, x, x)  # need_weights defaults to True
            return out + weights.sum(-1, keepdim=True)
        if self.call == "cross":
            memory = x * 2
            return self.attn(x, memory, memory, need_weights=False)[0]
        if self.call == "key_is_not_value":
            return self.attn(x, x, x + 1, need_weights=False)[0]
        if self.call == "mixed":  # one module, called both ways
            memory = x * 2
            return self.attn(x, x, x, need_weights=False)[0] + self.attn(x, memory, memory,
                                                                           need_weights=False)[0]
        raise AssertionError(self.call)


@pytest.mark.parametrize("call", ["need_weights", "cross", "key_is_not_value"])
def test_calls_it_cannot_mirror_keep_the_original_path_and_say_nothing(call):
    model = _Calls(call).eval()
    x = torch.randn(2, 6, 32)
    captured = capture(model, (x,), {})
    gm = captured.graph_module
    assert captured.batch_first_attention == []
    assert not any("batch-first" in note for note in captured.notes)
    assert not any(_notes(n) for n in gm.graph.nodes)
    assert any(n.target is torch.ops.aten.transpose.int for n in gm.graph.nodes if n.op == "call_function")
    with torch.no_grad():
        torch.testing.assert_close(gm(torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(2))),
                                   model(torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(2))),
                                   **FP32_TOL)


def test_a_module_called_both_ways_records_only_its_batch_first_call():
    model = _Calls("mixed").eval()
    x = torch.randn(2, 6, 32)
    captured = capture(model, (x,), {})
    gm = captured.graph_module
    assert captured.batch_first_attention == ["attn"]
    sdpa = _sdpa(gm)
    assert len(sdpa) == 2
    assert [bool(_notes(n)) for n in sdpa] == [True, False]  # graph order is call order
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), **FP32_TOL)


class _Encoder(nn.Module):
    """nn.TransformerEncoderLayer with a padding mask and a causal mask: masks through export."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(6))

    def forward(self, x, padding):
        return self.layer(x, src_mask=self.causal, src_key_padding_mask=padding, is_causal=True)


def test_masks_and_a_dynamic_batch_survive_export():
    model = _Encoder().eval()

    def inputs(batch, seed):
        gen = torch.Generator().manual_seed(seed)
        padding = torch.zeros(batch, 6, dtype=torch.bool)
        padding[0, 4:] = True
        return torch.randn(batch, 6, 32, generator=gen), padding

    captured = capture(model, inputs(4, 0), {})
    assert captured.dynamic_batch and captured.batch_first_attention == ["layer.self_attn"]
    assert [bool(_notes(n)) for n in _sdpa(captured.graph_module)] == [True]
    for batch in (1, 5):
        x, padding = inputs(batch, batch)
        want = model(x, padding).detach()  # autograd on: not the fused encoder fast path
        torch.testing.assert_close(captured.graph_module(x, padding), want, **FP32_TOL)


@pytest.mark.parametrize("kwargs", [dict(batch_first=False), dict(add_bias_kv=True), dict(add_zero_attn=True),
                                    dict(kdim=16, vdim=16)], ids=lambda k: next(iter(k)))
def test_ineligible_modules_are_left_as_they_are(kwargs):
    attn = nn.MultiheadAttention(32, 4, **kwargs)
    assert not module_is_eligible(attn)
    model = nn.Sequential(nn.Linear(32, 32), nn.Sequential(attn))
    copied, paths = batch_first_copy(model)
    assert copied is model and paths == []


def test_subclasses_and_patched_instances_are_not_swapped():
    class Mine(nn.MultiheadAttention):
        pass

    patched = nn.MultiheadAttention(32, 4, batch_first=True)
    patched.forward = lambda *a, **k: (a[0], None)
    for module in (Mine(32, 4, batch_first=True), patched):
        assert not module_is_eligible(module)
        assert batch_first_copy(nn.Sequential(module))[1] == []


def test_the_copy_shares_everything_but_the_path_to_the_attention(vit):
    copied, paths = batch_first_copy(vit)
    assert paths == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    assert copied is not vit and copied.conv_proj is vit.conv_proj
    assert copied.encoder.layers.encoder_layer_0.mlp is vit.encoder.layers.encoder_layer_0.mlp
    assert [n for n, _ in copied.named_parameters()] == [n for n, _ in vit.named_parameters()]
    assert all(a is b for a, b in zip(copied.parameters(), vit.parameters()))
    assert _attention_classes(vit) == {nn.MultiheadAttention}
    assert not any("_rewriter_batch_first_calls" in m.__dict__ for m in vit.modules())


# ------------------------------------------------------------------ ViT converted end to end


def test_vit_in_projection_reads_the_activations_directly(vit, converted, monkeypatch):
    graphs, _ = converted
    before = capture(vit, (_images(4, 0),), {}).graph_module
    _no_swap(monkeypatch)
    old = capture(vit, (_images(4, 0),), {}).graph_module
    assert _layout_ops(before) < _layout_ops(old), (_layout_ops(before), _layout_ops(old))
    for gm in (before, *graphs.values()):
        in_proj = [n for n in gm.graph.nodes if n.op == "call_function"
                   and n.target is torch.ops.aten.linear.default
                   and str(n.args[1].target).endswith("in_proj_weight")]
        assert len(in_proj) == 2
        for node in in_proj:
            source = node.args[0]
            while is_cast(source):
                source = source.args[0]
            assert source.target is torch.ops.aten.layer_norm.default, source.format_node()


@pytest.mark.parametrize("precision", list(DTYPES))
def test_vit_output_matches_fp32_as_closely_as_before(vit, converted, precision):
    gm = converted[0][precision]
    assert gm.meta["rewriter"]["dynamic_batch"] is True
    for batch in (4, 1, 7):
        x = _images(batch, 10 + batch)
        with torch.no_grad():
            error = max_rel_l2(vit(x), gm(x))
        assert error <= MAX_REL_L2[precision], (precision, batch, error)
    x = _images(16, 99)
    with torch.no_grad():
        reference = vit(x)
        ours = per_sample_rel_l2(reference, gm(x))
    with torch.autocast("cpu", dtype=DTYPES[precision]):  # autograd on: no fused fast path
        autocast = per_sample_rel_l2(reference, vit(x).detach())
    assert ours <= autocast * AUTOCAST_SLACK + AUTOCAST_EPS, (ours, autocast)


@pytest.mark.parametrize("precision", list(DTYPES))
def test_vit_records_the_swap_and_leaves_the_users_model_alone(vit, converted, precision):
    graphs, before = converted
    gm = graphs[precision]
    assert _attention_classes(vit) == {nn.MultiheadAttention}
    assert not any("_rewriter_batch_first_calls" in m.__dict__ for m in vit.modules())
    after = vit.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == torch.float32 for k in before)
    sdpa = _sdpa(gm)
    assert [meta.module_path(n) for n in sdpa] == [f"encoder.layers.encoder_layer_{i}.self_attention"
                                                    for i in range(2)]
    for node in sdpa:
        assert _notes(node) == [{"pass": "capture", "reason": f"nn.MultiheadAttention at "
                                 f"'{meta.module_path(node)}' run batch-first (no transposes, same weights)"}]
        assert meta.get(node, meta.DECISION)["dtype"] == meta.dtype_name(DTYPES[precision])
    assert any("run batch-first" in note for note in gm.meta["rewriter"]["notes"])
    entries = {e.name: e for e in rewriter.diff(vit, gm).nodes}
    assert "run batch-first" in entries[sdpa[0].name].reason


def test_vit_parameter_names_and_overrides_are_unchanged(vit, converted, monkeypatch):
    gm = converted[0]["bf16"]
    names = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {f"{ATTENTION}.in_proj_weight", f"{ATTENTION}.out_proj.weight"} <= names
    _no_swap(monkeypatch)
    old = rewriter.convert(vit, (_images(4, 0),), precision="bf16")
    assert names == {n.target for n in old.graph.nodes if n.op == "get_attr"}
    assert [n for n, _ in gm.named_parameters()] == [n for n, _ in old.named_parameters()]
    monkeypatch.undo()
    kept = rewriter.convert(vit, (_images(4, 0),), precision="bf16", overrides={ATTENTION: "fp32"})
    decisions = {meta.module_path(n): meta.get(n, meta.DECISION)["dtype"] for n in _sdpa(kept)}
    assert decisions == {ATTENTION: "float32", "encoder.layers.encoder_layer_1.self_attention": "bfloat16"}


def _grads(model, x, target, autocast_dtype=None):
    model.zero_grad(set_to_none=True)
    if autocast_dtype is None:
        out = model(x)
    else:
        with torch.autocast("cpu", dtype=autocast_dtype):
            out = model(x)
    (out.float() * target).sum().backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("precision", list(DTYPES))
def test_vit_training_conversion_gives_matching_gradients(vit, precision):
    gm = rewriter.convert(vit, (_images(4, 0),), precision=precision, mode="train")
    for graph in gm.graphs().values():
        sdpa = [n for n in graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target)]
        assert len(sdpa) == 2 and all(_notes(n) for n in sdpa)
    x, target = _images(8, 5), torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    model = copy.deepcopy(vit).train()
    ref = _grads(model, x, target)
    amp = _grads(model, x, target, DTYPES[precision])
    ours = _grads(gm.train(), x, target)
    assert_grads_like_autocast(ours, ref, amp, precision)
    assert _attention_classes(vit) == {nn.MultiheadAttention}
    assert not vit.training


def test_export_failure_in_the_swapped_module_falls_back_to_the_original(monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("batch-first attention broke")

    monkeypatch.setattr(BatchFirstSelfAttention, "forward", broken)
    model = _Self().eval()
    x = torch.randn(2, 6, 32)
    captured = capture(model, (x,), {})
    assert captured.method == "torch.export" and captured.batch_first_attention == []
    assert any("batch-first attention broke" in note for note in captured.notes)
    with torch.no_grad():
        torch.testing.assert_close(captured.graph_module(x), model(x), **FP32_TOL)
