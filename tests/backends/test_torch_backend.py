"""Torch backend: eager / compile / cuda_graphs wiring, errors, and the CUDA-graph cache keying.

CUDA graphs cannot run without a GPU: here the capture is replaced by a fake that records what the real
one would capture, so the cache keying, static-buffer copies and output cloning are tested on the CPU;
the capture itself is covered by `tools/bench.py --modes cuda_graphs` on a GPU. torch.compile wiring
uses the cheap "aot_eager" and a counting compiler; one test compiles a tiny model with inductor.
"""
from __future__ import annotations

import copy
import os
import pickle
import shutil

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

import rewriter
from rewriter.backends.torch_backend import (CompiledModule, CUDAGraphModule, TorchBackendModule, _Graph,
                                    capture_problems, check_options, graph_module_of, input_signature,
                                    optimize)
from rewriter.config import ConvertConfig
from rewriter.errors import BackendError, ConfigError, InputError
from rewriter.pipeline import is_converted
from tests.fixtures_models import MLP_SHAPE, tiny_mlp
from tests.helpers import rel_l2


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = tiny_mlp()
    x = torch.randn(*MLP_SHAPE)
    return model, x, rewriter.convert(model, (x,), precision="bf16")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    import torch._dynamo

    torch._dynamo.reset()


def _counting_compiler(calls):
    def compiler(gm, example_inputs):
        calls.append([tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in example_inputs])
        return gm.forward
    return compiler


# ----------------------------------------------------------------------------- options and errors

def test_eager_is_the_graph_module_itself(mlp):
    _, x, gm = mlp
    assert optimize(gm) is gm and optimize(gm, mode="eager") is gm
    assert isinstance(gm, fx.GraphModule) and gm.meta["rewriter"]["config"]["backend"] == "eager"
    with pytest.raises(ConfigError, match="takes no options"):
        optimize(gm, mode="eager", compile_mode="max-autotune")


@pytest.mark.parametrize("mode, opts, message", [
    ("jit", {}, "unknown backend 'jit'"),
    ("compile", {"warmup": 3}, "unknown option 'warmup' for backend 'compile'"),
    ("compile", {"compile_mode": "fastest"}, "unknown compile_mode 'fastest'"),
    ("compile", {"compile_mode": "max-autotune", "options": {"epilogue_fusion": True}}, "not both"),
    ("compile", {"dynamic": "yes"}, "must be None, 'batch', True or False"),
    ("cuda_graphs", {"max_graphs": 0}, "max_graphs=0"),
    ("cuda_graphs", {"warmup": -1}, "warmup=-1"),
])
def test_bad_modes_and_options_are_config_errors(mode, opts, message):
    with pytest.raises(ConfigError, match=message):
        check_options(mode, opts)


def test_mode_aliases():
    assert check_options("torch.compile") == "compile"
    assert check_options("CUDA-Graphs") == "cuda_graphs"
    assert check_options("compile", {"compile_mode": "max-autotune-no-cudagraphs"}) == "compile"


def test_config_validates_and_records_backend():
    cfg = ConvertConfig(precision="bf16", backend="cudagraphs", backend_options={"clone_outputs": False})
    assert cfg.backend == "cuda_graphs" and cfg.backend_kwargs() == {"clone_outputs": False}
    assert cfg.to_dict()["backend"] == "cuda_graphs"
    assert cfg.to_dict()["backend_options"] == {"clone_outputs": False}
    with pytest.raises(ConfigError, match="inference only"):
        ConvertConfig(backend="cuda_graphs", mode="train")
    with pytest.raises(ConfigError, match="unknown option 'compile_mode' for backend 'cuda_graphs'"):
        ConvertConfig(backend="cuda_graphs", backend_options={"compile_mode": "default"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_graphs_without_gpu_is_a_clear_error(mlp):
    model, x, gm = mlp
    with pytest.raises(BackendError, match="needs a CUDA GPU.*backend='eager' or backend='compile'"):
        optimize(gm, mode="cuda_graphs")
    with pytest.raises(BackendError, match="needs a CUDA GPU"):  # refused before capturing
        rewriter.convert(model, (x,), precision="bf16", backend="cuda_graphs")


def test_graph_module_of_unwraps_everything(mlp):
    _, x, gm = mlp
    wrapped = optimize(gm, mode="compile", compiler="aot_eager")
    assert graph_module_of(wrapped) is gm
    assert graph_module_of(nn.DataParallel(wrapped)) is gm
    assert graph_module_of(torch.compile(gm, backend="eager")) is gm
    assert graph_module_of(optimize(wrapped, mode="compile", compiler="eager")) is gm  # re-optimize
    assert optimize(wrapped, mode="eager") is gm
    assert is_converted(wrapped)
    with pytest.raises(InputError, match="expected the GraphModule returned by rewriter.convert"):
        graph_module_of(nn.Linear(2, 2))


# ----------------------------------------------------------------------------- compile

def test_compile_wrapper_keeps_graph_and_meta(mlp):
    _, x, gm = mlp
    fast = optimize(gm, mode="compile", compiler="aot_eager")
    assert isinstance(fast, CompiledModule) and isinstance(fast, TorchBackendModule)
    assert fast.graph_module is gm and fast.graph is gm.graph and fast.meta is gm.meta
    assert fast.backend_mode == "compile" and fast.backend_options == {"compiler": "aot_eager"}
    assert set(fast.state_dict()) == {f"graph_module.{k}" for k in gm.state_dict()}
    with torch.no_grad():
        torch.testing.assert_close(fast(x), gm(x), rtol=0, atol=0)
    clone = copy.deepcopy(fast)
    assert isinstance(clone, CompiledModule) and clone.graph_module is not gm
    with pytest.raises(BackendError, match="cannot be pickled"):
        pickle.dumps(fast)


def test_compile_is_static_first_then_batch_dynamic(mlp):
    _, x, gm = mlp
    calls = []
    fast = optimize(copy.deepcopy(gm), mode="compile", compiler=_counting_compiler(calls))
    with torch.no_grad():
        for batch in (4, 7, 3, 9):
            xb = torch.randn(batch, MLP_SHAPE[1])
            torch.testing.assert_close(fast(xb), gm(xb), rtol=0, atol=0)
    assert len(calls) == 2, f"a static compile, then one with the batch dynamic; got {calls}"
    assert all(isinstance(c, tuple) for c in calls[0])  # fixed sizes: tensors only
    assert any(not isinstance(c, tuple) for c in calls[1])  # the symbolic batch comes in as a size


def test_compile_keeps_the_batch_dynamic_from_the_start_on_request(mlp):
    _, x, gm = mlp
    assert gm.meta["rewriter"]["dynamic_batch"]
    calls = []
    fast = optimize(copy.deepcopy(gm), mode="compile", dynamic="batch", compiler=_counting_compiler(calls))
    with torch.no_grad():
        for batch in (4, 7, 3):
            xb = torch.randn(batch, MLP_SHAPE[1])
            torch.testing.assert_close(fast(xb), gm(xb), rtol=0, atol=0)
    assert len(calls) == 1, f"one compile for every batch size, got {calls}"

    static_calls = []
    fast = optimize(copy.deepcopy(gm), mode="compile", dynamic=False, compiler=_counting_compiler(static_calls))
    with torch.no_grad():
        for batch in (4, 7):
            fast(torch.randn(batch, MLP_SHAPE[1]))
    assert len(static_calls) == 2, "dynamic=False compiles per shape"


def test_convert_backend_argument(mlp):
    model, x, gm = mlp
    fast = rewriter.convert(model, (x,), precision="bf16", backend="compile",
                            backend_options={"compiler": "aot_eager"})
    assert isinstance(fast, CompiledModule) and is_converted(fast)
    assert fast.meta["rewriter"]["config"]["backend"] == "compile"
    assert fast.meta["rewriter"]["config"]["backend_options"] == {"compiler": "aot_eager"}
    with torch.no_grad():
        torch.testing.assert_close(fast(x), gm(x), rtol=0, atol=0)
    # an already converted model only gets the backend applied (no second conversion)
    again = rewriter.convert(gm, (x,), precision="bf16", backend="compile",
                             backend_options={"compiler": "aot_eager"})
    assert isinstance(again, CompiledModule) and again.graph_module is gm
    assert rewriter.convert(fast, (x,), precision="bf16") is fast.graph_module


@pytest.mark.skipif(os.environ.get("REWRITER_SKIP_INDUCTOR") == "1", reason="REWRITER_SKIP_INDUCTOR=1")
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="inductor on the CPU needs a C++ compiler; covered by tools/bench.py on a GPU")
def test_inductor_numerics_match_eager(mlp):
    """Real torch.compile (inductor, CPU): 10-20 s for this 5-op model, cold cache included."""
    _, x, gm = mlp
    fast = optimize(copy.deepcopy(gm), mode="compile")
    with torch.no_grad():
        for batch in (4, 9):
            xb = torch.randn(batch, MLP_SHAPE[1])
            out, ref = fast(xb), gm(xb)
            assert out.dtype == ref.dtype == torch.float32
            assert rel_l2(ref, out) < 1e-2


# ----------------------------------------------------------------------------- CUDA graphs, faked capture

class _FakeCUDAGraph:
    """Stands in for torch.cuda.CUDAGraph: replay() recomputes the static outputs in place."""

    def __init__(self, gm, static, spec, outputs):
        self.gm, self.static, self.spec, self.outputs = gm, static, spec, outputs
        self.replays = 0

    def replay(self):
        args, kwargs = pytree.tree_unflatten(self.static, self.spec)
        fresh = pytree.tree_leaves(self.gm(*args, **kwargs))
        for buf, value in zip(self.outputs, fresh):
            buf.copy_(value)
        self.replays += 1


class FakeCUDAGraphModule(CUDAGraphModule):
    """CUDAGraphModule with the GPU parts replaced: same cache, static buffers and output handling."""

    def _check_environment(self):
        pass

    def _capture(self, flat, spec):
        static = [x.clone() if isinstance(x, torch.Tensor) else x for x in flat]
        args, kwargs = pytree.tree_unflatten(static, spec)
        with torch.no_grad():
            out = self.graph_module(*args, **kwargs)
        outputs, out_spec = pytree.tree_flatten(out)
        self.captures += 1
        graph = _FakeCUDAGraph(self.graph_module, static, spec, outputs)
        return _Graph(graph, [s if isinstance(s, torch.Tensor) else None for s in static], outputs, out_spec)


def test_cuda_graph_cache_is_keyed_by_shape_dtype_and_structure(mlp):
    _, x, gm = mlp
    fast = FakeCUDAGraphModule(gm)
    assert fast.backend_mode == "cuda_graphs" and fast.graph is gm.graph
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(a), gm(a), rtol=0, atol=0)
        torch.testing.assert_close(fast(b), gm(b), rtol=0, atol=0)  # new values, same graph
        assert fast.captures == 1 and fast.num_graphs == 1
        fast(b.t().contiguous().t())  # other strides, same shape: copied into the same static buffer
        assert fast.captures == 1
        c = torch.randn(7, 16)
        torch.testing.assert_close(fast(c), gm(c), rtol=0, atol=0)
        assert fast.captures == 2
        fast(a)
        assert fast.captures == 2  # batch 4 graph still cached
        fast(a.double().float())  # same dtype again
        assert fast.captures == 2 and fast.num_graphs == 2
    fast.to(torch.device("cpu"))  # moving the module drops every graph (they read old memory)
    assert fast.num_graphs == 0


def test_cuda_graph_outputs_cloned_or_overwritten(mlp):
    _, _, gm = mlp
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    with torch.no_grad():
        safe = FakeCUDAGraphModule(gm)
        first = safe(a)
        kept = first.clone()
        safe(b)
        torch.testing.assert_close(first, kept, rtol=0, atol=0)  # cloned: survives the next call

        raw = FakeCUDAGraphModule(gm, clone_outputs=False)
        first = raw(a)
        second = raw(b)
        assert first.data_ptr() == second.data_ptr()  # the static output buffer, documented overwrite
        torch.testing.assert_close(first, gm(b), rtol=0, atol=0)


def test_cuda_graph_lru_limit(mlp):
    _, _, gm = mlp
    fast = FakeCUDAGraphModule(gm, max_graphs=1)
    assert fast.backend_options == {"max_graphs": 1}
    with torch.no_grad():
        for batch in (4, 7, 4):
            fast(torch.randn(batch, 16))
    assert fast.captures == 3 and fast.num_graphs == 1


def test_input_signature():
    t = torch.zeros(2, 3)
    assert input_signature((t,)) == input_signature((torch.ones(2, 3).t().contiguous().t(),))
    assert input_signature((t,)) != input_signature((torch.zeros(3, 2),))
    assert input_signature((t,)) != input_signature((t.half(),))
    assert input_signature((t, 1)) != input_signature((t, 2))  # non-tensor values are baked in
    assert input_signature((t,), {"mask": t}) != input_signature((t, t))
    assert input_signature(([1, 2],)) == input_signature(([1, 2],))


def _graph_of(build) -> fx.GraphModule:
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(build(graph, x))
    return fx.GraphModule(nn.Module(), graph)


def test_uncapturable_graphs_are_refused_with_the_reason():
    nonzero = _graph_of(lambda g, x: g.call_function(torch.ops.aten.nonzero.default, (x,)))
    certain, _ = capture_problems(nonzero)
    assert len(certain) == 1 and "nonzero" in certain[0] and "depends on the values" in certain[0]
    with pytest.raises(BackendError, match="cannot capture this graph.*nonzero"):
        FakeCUDAGraphModule(nonzero)

    item = _graph_of(lambda g, x: g.call_function(torch.ops.aten._local_scalar_dense.default, (x,)))
    with pytest.raises(BackendError, match=r"\.item\(\).*CPU reads a GPU value"):
        FakeCUDAGraphModule(item)

    on_cpu = _graph_of(lambda g, x: g.call_function(
        torch.ops.aten.add.Tensor,
        (x, g.call_function(torch.ops.aten.arange.default, (4,), {"device": torch.device("cpu")}))))
    certain, suspects = capture_problems(on_cpu)
    assert not certain and len(suspects) == 1 and "creates a tensor on the CPU" in suspects[0]


def test_cuda_graphs_refuses_cpu_inputs(mlp):
    _, x, gm = mlp

    class Checked(CUDAGraphModule):  # real input checks, no GPU needed to reach them
        def _check_environment(self):
            pass

    with pytest.raises(BackendError, match=r"every tensor input on a CUDA device; input #0 .* is on cpu"):
        Checked(gm)(x)


# ----------------------------------------------------------------------------- CUDA graphs, mocked CUDA

class _MockCUDA:
    """Just enough of torch.cuda for CUDAGraphModule._capture to run on the CPU: streams and devices
    are no-ops, `torch.cuda.graph` runs its body eagerly (so the "static outputs" hold real values of
    the capture inputs) and replay() only counts. `fail` makes the capture raise like a sync op does."""

    def __init__(self, monkeypatch, fail: str | None = None):
        import contextlib

        self.replays = self.captures = 0
        mock = self

        class Stream:
            def __init__(self, *a, **k):
                pass

            def wait_stream(self, other):
                pass

        class Graph:
            def replay(self):
                mock.replays += 1

        @contextlib.contextmanager
        def graph(g, pool=None, **kwargs):
            mock.captures += 1
            yield
            if fail:
                raise RuntimeError(fail)

        for name, value in {"Stream": Stream, "current_stream": lambda *a: Stream(),
                            "stream": lambda s: contextlib.nullcontext(),
                            "device": lambda d: contextlib.nullcontext(),
                            "graph_pool_handle": lambda: ("pool",), "CUDAGraph": Graph,
                            "graph": graph}.items():
            monkeypatch.setattr(torch.cuda, name, value)


class _OnCPU(CUDAGraphModule):
    def _check_environment(self):
        pass

    def _check_inputs(self, flat):
        return torch.device("cpu")


def test_capture_path_runs_warmup_capture_and_replay(mlp, monkeypatch):
    _, _, gm = mlp
    cuda = _MockCUDA(monkeypatch)
    runs = []
    handle = gm.register_forward_pre_hook(lambda m, a: runs.append(1))
    try:
        fast = _OnCPU(gm, warmup=3)
        a, b = torch.randn(4, 16), torch.randn(4, 16)
        with torch.inference_mode():
            out = fast(a)
        assert len(runs) == 3 + 1 and cuda.captures == 1 and cuda.replays == 1  # warm-up, capture
        torch.testing.assert_close(out, gm(a), rtol=0, atol=0)
        runs.clear()
        fast(b)  # no longer under inference mode: the static buffers still take the copy
        assert not runs and cuda.captures == 1 and cuda.replays == 2
        entry = next(iter(fast._graphs.values()))
        torch.testing.assert_close(entry.static_inputs[0], b, rtol=0, atol=0)
    finally:
        handle.remove()


def test_failed_capture_names_the_reason(mlp, monkeypatch):
    _, x, gm = mlp
    _MockCUDA(monkeypatch, fail="CUDA error: operation not permitted when stream is capturing")
    with pytest.raises(BackendError, match=r"could not capture .*synchronised with the CPU.*\.item\(\)"):
        _OnCPU(gm)(x)


class _LibraryOutput(dict):
    """An output class registered the way transformers registers ModelOutput: its unflatten looks the
    class up through importlib, a call torch.compile refuses to trace ("marked as skipped")."""


def _unflatten_library_output(values, context):
    import importlib

    cls = getattr(importlib.import_module(__name__), context)
    return cls(zip(["hidden", "pooled"], values))


pytree.register_pytree_node(_LibraryOutput, lambda o: (list(o.values()), "_LibraryOutput"),
                            _unflatten_library_output)


class _ReturnsLibraryOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, scale=None):
        h = self.lin(x)
        return _LibraryOutput(hidden=h, pooled=h.mean(1) if scale is None else h.mean(1) * scale)


def test_compile_keeps_output_unflattening_out_of_the_compiled_graph():
    """A library output type whose unflatten dynamo cannot trace still compiles (GPT-2 and Mistral
    failed so on the H200 zoo): the compiled graph is flat, (un)flattening runs in Python."""
    model, x = _ReturnsLibraryOutput().eval(), torch.randn(4, 8)
    fast = rewriter.convert(model, (x,), {"scale": torch.tensor(2.0)}, precision="bf16", backend="compile",
                            backend_options={"compiler": "aot_eager"})
    eager = rewriter.convert(model, (x,), {"scale": torch.tensor(2.0)}, precision="bf16")
    with torch.no_grad():
        out, ref = fast(x, scale=torch.tensor(2.0)), eager(x, scale=torch.tensor(2.0))
        assert type(out) is _LibraryOutput and list(out) == ["hidden", "pooled"]
        torch.testing.assert_close(out["pooled"], ref["pooled"], rtol=0, atol=0)
        out6 = fast(torch.randn(6, 8), scale=torch.tensor(3.0))  # another batch, the same checks
        assert out6["hidden"].shape == (6, 8)
        with pytest.raises(InputError):
            fast(torch.randn(6, 9), scale=torch.tensor(3.0))
