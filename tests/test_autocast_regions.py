"""The model's own autocast regions (rewriter/autocast_regions.py + analysis/assign): a region with
autocast off keeps its traced dtype, a region with another autocast dtype keeps that dtype, the
decision names the region (module path and source line), on the torch.export and the
symbolic_trace paths; numerics within 1.5x of autocast's error where autocast gets them right."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import rewriter
from rewriter import autocast_regions, capture_fx, meta
from rewriter.config import ConvertConfig
from rewriter.passes.infra import PassManager
from rewriter.pipeline import build_passes
from tools.autocast_regions_bench import FreqsModel, build, rel_l2

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _decisions(gm, op: str) -> list[dict]:
    return [meta.get(n, meta.DECISION) for n in gm.graph.nodes
            if (meta.get(n, meta.OP_CLASS) or {}).get("op") == op and meta.get(n, meta.DECISION)]


def _autocast(model, args, precision):
    with torch.no_grad(), torch.autocast("cpu", dtype=_DTYPES[precision]):
        return model(*args)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_matmul_with_autocast_off_stays_fp32_and_names_the_region(precision):
    model = FreqsModel(dim=32).eval()
    positions = torch.arange(2048, dtype=torch.float32)[None].expand(2, -1).contiguous()
    fast = rewriter.convert(model, (positions,), precision=precision)
    (matmul,) = _decisions(fast, "matmul")
    assert matmul["dtype"] == "float32" and matmul["rule"] == "autocast-region"
    assert "enabled=False" in matmul["reason"]
    assert "autocast_regions_bench.py" in matmul["reason"] and "inv.float() @ positions" in matmul["reason"]
    ref = model(positions)
    ours = rel_l2(fast(positions), ref)
    assert ours <= 1.5 * rel_l2(_autocast(model, (positions,), precision), ref) + 1e-7
    assert ours < 1e-7  # the whole model lies in fp32 here: the region and the cos/sin it feeds


def test_without_the_region_the_matmul_would_be_16_bit(monkeypatch):
    """The failure the regions fix: the same model with the regions ignored loses ~0.45 in bf16."""
    monkeypatch.setattr(autocast_regions, "decompose", lambda ep: ep.run_decompositions({}))
    model = FreqsModel(dim=32).eval()
    positions = torch.arange(2048, dtype=torch.float32)[None].expand(2, -1).contiguous()
    fast = rewriter.convert(model, (positions,), precision="bf16")
    assert _decisions(fast, "matmul")[0]["dtype"] == "bfloat16"
    assert rel_l2(fast(positions), model(positions)) > 0.1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_llama_with_autocast_off_rotary_within_autocast_error(precision):
    model, args = build("llama_autocast_rope", 256, 2, True, torch.device("cpu"))
    fast = rewriter.convert(model, args, precision=precision)
    regions = autocast_regions.regions_of(fast)
    assert len(regions) == 1 and regions[0]["module"] == "rotary_emb" and not regions[0]["enabled"]
    matmuls = [n for n in fast.graph.nodes if (meta.get(n, meta.OP_CLASS) or {}).get("op") == "matmul"
               and meta.get(n, meta.AUTOCAST)]
    assert matmuls and all(meta.get(n, meta.DECISION)["dtype"] == "float32" for n in matmuls)
    with torch.no_grad():
        ref = model(*args)
        ours = rel_l2(fast(*args), ref)
    assert ours <= 1.5 * rel_l2(_autocast(model, args, precision), ref)


class _Nested(nn.Module):
    """A bf16 region around lin2, and inside it a region with autocast off around lin3."""

    def __init__(self, device_type: str = "cpu"):
        super().__init__()
        self.device_type = device_type
        self.lin1, self.lin2, self.lin3 = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = self.lin1(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.lin2(h)
            with torch.autocast(self.device_type, enabled=False):
                h = self.lin3(h.float())
        return h


def _intended(model: _Nested, x):
    """What _Nested asks for in an fp16 conversion: lin1 in fp16, lin2 in bf16, lin3 in fp32."""
    def lin(m, h, dtype):
        return torch.nn.functional.linear(h.to(dtype), m.weight.to(dtype), m.bias.to(dtype))
    return lin(model.lin3, lin(model.lin2, lin(model.lin1, x, torch.float16), torch.bfloat16), torch.float32)


def _linears(gm) -> dict[str, dict]:
    return {meta.module_path(n): meta.get(n, meta.DECISION) for n in gm.graph.nodes
            if (meta.get(n, meta.OP_CLASS) or {}).get("op") == "linear"}


def test_bf16_region_inside_an_fp16_conversion_keeps_bf16():
    torch.manual_seed(0)
    model, x = _Nested().eval(), torch.randn(4, 16)
    fast = rewriter.convert(model, (x,), precision="fp16")
    linears = _linears(fast)
    assert linears["lin1"]["dtype"] == "float16" and linears["lin1"]["rule"] == "op-table"
    assert linears["lin2"]["dtype"] == "bfloat16" and linears["lin2"]["rule"] == "autocast-region"
    assert "dtype=torch.bfloat16" in linears["lin2"]["reason"]
    assert linears["lin3"]["dtype"] == "float32" and linears["lin3"]["rule"] == "autocast-region"
    assert "enabled=False" in linears["lin3"]["reason"]
    lin1 = next(n for n in fast.graph.nodes if meta.module_path(n) == "lin1"
                and (meta.get(n, meta.OP_CLASS) or {}).get("op") == "linear")
    assert meta.get(lin1, meta.AUTOCAST) is None
    with torch.no_grad():
        ref = model(x)
        assert rel_l2(fast(x), ref) <= 1.5 * rel_l2(_autocast(model, (x,), "fp16"), ref) + 1e-6
        assert torch.allclose(fast(x), _intended(model, x), rtol=1e-5, atol=1e-6)


def test_user_override_beats_the_region():
    model = FreqsModel(dim=32).eval()
    positions = torch.arange(64, dtype=torch.float32)[None].expand(2, -1).contiguous()
    fast = rewriter.convert(model, (positions,), precision="bf16", overrides={"matmul": "bf16"})
    (matmul,) = _decisions(fast, "matmul")
    assert matmul["dtype"] == "bfloat16" and matmul["rule"] == "override:op"


def test_symbolic_trace_path_records_regions():
    """The symbolic_trace fallback records the same regions (the graph it makes holds no autocast at
    all, so without them lin2 and lin3 would follow the conversion)."""
    torch.manual_seed(0)
    model, x = _Nested("cuda").eval(), torch.randn(4, 16)
    # a copy: the symbolic_trace graph shares the model's submodules, and CastWeights rewrites them
    gm = capture_fx.symbolic_trace(copy.deepcopy(model), (x,), {})
    PassManager(build_passes(ConvertConfig(precision="fp16")))(gm)
    linears = _linears(gm)
    assert linears["lin1"]["dtype"] == "float16"
    assert linears["lin2"]["dtype"] == "bfloat16" and linears["lin2"]["rule"] == "autocast-region"
    assert linears["lin3"]["dtype"] == "float32" and linears["lin3"]["rule"] == "autocast-region"
    assert "the top-level forward" in linears["lin3"]["reason"]
    assert "with torch.autocast(self.device_type, enabled=False)" in linears["lin3"]["reason"]
    with torch.no_grad():
        assert torch.allclose(gm(x), _intended(model, x), rtol=1e-5, atol=1e-6)


def test_fp8_conversion_keeps_a_bf16_region_in_bf16():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.b(self.a(x).float())

    fast = rewriter.convert(Model().eval(), (torch.randn(32, 64),), precision="fp8")
    records = {meta.module_path(n): meta.get(n, meta.FP8) for n in fast.graph.nodes if meta.get(n, meta.FP8)}
    assert records["b"]["use"] is False and records["b"]["rule"] == "autocast-region"
    assert "dtype=torch.bfloat16" in records["b"]["reason"]


def test_a_torch_that_cannot_retrace_the_markers_still_converts(monkeypatch):
    """Should run_decompositions refuse the marked bodies, the program is decomposed without them and
    the user is told the regions are converted like the rest."""
    original = torch.export.ExportedProgram.run_decompositions
    calls = []

    def refuse_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("unsupported call_function target")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", refuse_once)
    model = FreqsModel(dim=32).eval()
    positions = torch.arange(64, dtype=torch.float32)[None].expand(2, -1).contiguous()
    with pytest.warns(UserWarning, match="could not be marked"):
        fast = rewriter.convert(model, (positions,), precision="bf16")
    assert _decisions(fast, "matmul")[0]["rule"] == "op-table"
    assert not autocast_regions.regions_of(fast)
    assert fast(positions).shape == model(positions).shape


def test_regions_transformers_maybe_autocast_would_hide_are_kept():
    """GPT-2's upcast attention runs under transformers' maybe_autocast(enabled=False), which is a
    nullcontext when autocast is off (as it is at capture): the region is still found, and the
    helper is itself again afterwards."""
    import transformers
    from transformers.models.gpt2 import modeling_gpt2
    from transformers.utils import generic

    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, use_cache=False,
                                  reorder_and_upcast_attn=True, attn_implementation="eager",
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(cfg).eval()
    ids = torch.randint(0, 100, (2, 12))
    fast = rewriter.convert(model, (ids,), precision="fp16")
    regions = autocast_regions.regions_of(fast)
    assert [r["module"] for r in regions] == ["h.0.attn", "h.1.attn"]
    baddbmms = _decisions(fast, "baddbmm")
    assert len(baddbmms) == 2 and all(d["dtype"] == "float32" and d["rule"] == "autocast-region" for d in baddbmms)
    assert modeling_gpt2.maybe_autocast is generic.maybe_autocast
    assert generic.maybe_autocast.__qualname__ == "maybe_autocast"
    with torch.no_grad():
        ref = model(ids).last_hidden_state
        assert rel_l2(fast(ids).last_hidden_state, ref) <= 1.5 * rel_l2(_autocast(model, (ids,), "fp16")
                                                                      .last_hidden_state, ref) + 1e-4


def test_any_transformers_maybe_autocast_is_seen(monkeypatch):
    """transformers has moved its `maybe_autocast` helper between releases (5.17's Llama rotary reads it from
    another module than 5.24's): every transformers module's helper of that name is made visible."""
    import contextlib
    import sys
    import types

    helper_module = types.ModuleType("transformers._rw_test_helpers")

    def maybe_autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
        if torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type, dtype=dtype, enabled=enabled)
        return contextlib.nullcontext()

    helper_module.maybe_autocast = maybe_autocast
    monkeypatch.setitem(sys.modules, "transformers._rw_test_helpers", helper_module)

    class Rotary(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("inv", 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)))
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x, pos):
            with helper_module.maybe_autocast(device_type="cpu", enabled=False):
                freqs = self.inv[:, None] @ pos[None, :]
            return self.proj(x) + freqs.cos().sum()

    x, pos = torch.randn(2, 16), torch.arange(2048).float()
    gm = rewriter.convert(Rotary().eval(), (x, pos), precision="bf16")
    matmuls = [n for n in gm.graph.nodes if n.op == "call_function" and "matmul" in str(n.target)
               and meta.get(n, meta.AUTOCAST)]
    assert matmuls and all(meta.get(n, meta.DECISION)["dtype"] == "float32" for n in matmuls)


class _NoGradRotary(nn.Module):
    """transformers 5.17's Llama rotary embedding in miniature: `@torch.no_grad()` on the forward
    (export makes it a wrap_with_set_grad_enabled op) around the autocast-off matmul."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv", 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)))

    @torch.no_grad()
    def forward(self, x, pos):
        with torch.autocast("cpu", enabled=False):
            freqs = (self.inv[:, None] @ pos[None, :]).t()
        return x * freqs.cos().sum(-1, keepdim=True)


class _WithNoGradRotary(nn.Module):
    def __init__(self):
        super().__init__()
        self.rotary, self.proj = _NoGradRotary(), nn.Linear(8, 8)

    def forward(self, x, pos):
        return self.rotary(self.proj(x), pos)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_region_inside_a_no_grad_forward_is_kept(precision):
    """The region sits in the body of torch.no_grad's op, not at the top of the program: it is still
    found (this was lost on transformers 5.17, whose Llama error was 6x autocast's on the H200)."""
    model = _WithNoGradRotary().eval()
    x, pos = torch.randn(2048, 8), torch.arange(2048).float()
    fast = rewriter.convert(model, (x, pos), precision=precision)
    regions = autocast_regions.regions_of(fast)
    assert [r["module"] for r in regions] == ["rotary"] and not regions[0]["enabled"]
    (matmul,) = _decisions(fast, "matmul")
    assert matmul["dtype"] == "float32" and matmul["rule"] == "autocast-region"
    with torch.no_grad():
        ref = model(x, pos)
        assert rel_l2(fast(x, pos), ref) <= 1.5 * rel_l2(_autocast(model, (x, pos), precision), ref) + 1e-6
