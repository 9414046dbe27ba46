"""The eager fast forward (backends/fast_forward.py): same results as the standard fx forward, bit for
bit on the CPU, on transformer, convolution and HF models; the standard forward under tracing; weights
read at call time; gone after recompile()."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import transformers

import rewriter
from rewriter.backends import fast_forward
from tests.fixtures_models import tiny_mlp, tiny_transformer


def _convnet():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    return model, (torch.randn(2, 3, 16, 16),), {}


def _bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    return transformers.BertModel(cfg).eval(), (torch.randint(0, 100, (2, 12)),), {"attention_mask": mask}


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                  use_cache=False)
    return transformers.GPT2Model(cfg).eval(), (torch.randint(0, 100, (2, 12)),), {}


def _mlp():
    return tiny_mlp().eval(), (torch.randn(4, 16),), {}


def _transformer():
    model = tiny_transformer().eval()
    return model, (torch.randn(2, 8, 32),), {}


MODELS = {"mlp": _mlp, "transformer": _transformer, "convnet": _convnet, "bert": _bert, "gpt2": _gpt2}


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fast_forward_equals_standard_forward(name, precision):
    model, args, kwargs = MODELS[name]()
    fast = rewriter.convert(model, args, kwargs, precision=precision)
    assert fast_forward.is_installed(fast)
    record = fast.meta[fast_forward.RECORD_KEY]
    assert record["ops_bound"] > 0 and record["weights"] > 0
    with torch.no_grad():
        got = _first(fast(*args, **kwargs))
        fast_forward.uninstall(fast)
        assert not fast_forward.is_installed(fast)
        want = _first(fast(*args, **kwargs))
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_casts_bound_only_for_dtype_changes():
    model, args, kwargs = _bert()
    fast = rewriter.convert(model, args, kwargs, precision="fp16")
    for node in fast.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten._to_copy.default:
            bound = fast_forward.binding_for(node)
            changes = (set(node.kwargs) == {"dtype"}
                       and node.args[0].meta["val"].dtype != node.meta["val"].dtype)
            assert (bound is torch.Tensor.to) == changes


def test_weights_are_read_at_call_time():
    model, args, _ = _mlp()
    fast = rewriter.convert(model, args, precision="bf16")
    with torch.no_grad():
        before = fast(*args)
        state = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in fast.state_dict().items()}
        fast.load_state_dict(state)
        after = fast(*args)
        fast_forward.uninstall(fast)
        assert torch.equal(after, fast(*args))
    assert not torch.equal(before, after)
    # functional_call swaps tensors in the module's dictionaries: the fast forward sees them too
    fast_forward.install(fast)
    params = {k: torch.ones_like(v) for k, v in fast.named_parameters()}
    with torch.no_grad():
        got = torch.func.functional_call(fast, params, args)
        fast_forward.uninstall(fast)
        want = torch.func.functional_call(fast, params, args)
    assert torch.equal(got, want)


def test_tracing_runs_the_standard_forward():
    model, args, kwargs = _bert()
    fast = rewriter.convert(model, args, kwargs, precision="bf16")
    ops = {n.target for n in torch.export.export(fast, args, kwargs, strict=False).graph.nodes
           if n.op == "call_function"}
    assert torch.ops.aten.linear.default in ops  # traced through aten, not the bindings
    compiled = torch.compile(fast, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(_first(compiled(*args, **kwargs)), _first(fast(*args, **kwargs)))


def test_each_model_is_compiled_on_its_own():
    """torch.compile caches per code object: with one forward code object shared by every converted
    model, the (recompile_limit + 1)-th model compiled in a process ran eager (seen in
    tools/bench_fp8.py on the H100: the 9th compiled variant ran at eager speed).

    The limit is lowered with dynamo's own `config.patch`, not pytest's monkeypatch: pytest >= 9.2
    undoes a setattr on dynamo's config module with a delete, which removes the option for every later
    torch.compile in the worker."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(4, 16)
    models = [rewriter.convert(tiny_mlp(), (x,), precision="bf16") for _ in range(3)]
    assert len({id(type(m).forward.__code__) for m in models}) == 3
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            for m in models:
                with torch.no_grad():
                    assert torch.equal(torch.compile(m, backend=backend)(x), m(x))
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 3  # one graph per model: none fell back to eager


def test_recompile_and_copies_fall_back_to_the_standard_forward():
    model, args, _ = _transformer()
    fast = rewriter.convert(model, args, precision="bf16")
    twin = copy.deepcopy(fast)
    with torch.no_grad():
        assert torch.equal(twin(*args), fast(*args))
    fast.recompile()
    assert not fast_forward.is_installed(fast)
    record = fast_forward.install(fast)
    assert fast_forward.is_installed(fast) and record["ops_bound"] > 0
    fast_forward.install(fast)  # idempotent
    with torch.no_grad():
        assert torch.equal(twin(*args), fast(*args))


def test_training_module_keeps_its_forward():
    model, args, _ = _transformer()
    converted = rewriter.convert(model, args, precision="bf16", mode="train")
    assert not fast_forward.is_installed(converted)
    assert "skipped" in converted.meta[fast_forward.RECORD_KEY]
