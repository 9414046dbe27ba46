"""ONNX backend: exported BERT, GPT-2 and ResNet-style models on the ONNX Runtime CPU EP.

Structure is asserted on the file (checker, Cast counts, initializer and io dtypes, op/dtype counts),
numerics against the converted PyTorch model with explicit per-model floors, at two batch sizes.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.utils._pytree as pytree

import rewriter
from rewriter.backends.onnx import ExportReport, cast_chains, count_casts, export_onnx, ort_session
from rewriter.backends.onnx.fusion import precision_kept
from rewriter import meta
from rewriter.errors import ConfigError, InputError, RewriterError
from tests.helpers import rel_l2

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")

# relative L2 error floors vs the converted PyTorch model (fp16). The CPU EP runs some fp16 ops in fp32
# (it has no fp16 kernel for them), PyTorch CPU runs them in fp16: measured 7e-6 .. 6e-4.
TOLERANCE = {"bert": 3e-3, "gpt2": 3e-3, "resnet": 3e-3}


def _bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()

    def inputs(batch, gen):
        ids = torch.randint(0, 100, (batch, 16), generator=gen)
        mask = torch.ones(batch, 16, dtype=torch.long)
        mask[0, 12:] = 0
        return (ids,), {"attention_mask": mask}
    return model, inputs


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                  use_cache=False, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()

    def inputs(batch, gen):
        return (torch.randint(0, 100, (batch, 16), generator=gen),), {}
    return model, inputs


def _resnet():
    from torchvision.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)

    def inputs(batch, gen):
        return (torch.randn(batch, 3, 32, 32, generator=gen),), {}
    return model, inputs


MODELS = {"bert": _bert, "gpt2": _gpt2, "resnet": _resnet}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            model, make_inputs = MODELS[name]()
            args, kwargs = make_inputs(2, torch.Generator().manual_seed(1))
            gm = rewriter.convert(model, args, kwargs, precision="fp16")
            path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = export_onnx(gm, path)
            cache[name] = (model, make_inputs, gm, report, str(path))
        return cache[name]
    return get


def _float_casts_in(gm) -> int:
    """Float-to-float casts the converted model performs, one per (value, dtype): its explicit casts
    plus the up-casts of ops that read mixed dtypes (add(fp16, fp32) computes in fp32)."""
    casts = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten._to_copy.default:
            if meta.is_float_dtype(node.kwargs.get("dtype")) and meta.is_float_dtype(meta.value_dtype(node.args[0])):
                casts.add((node.args[0], node.kwargs["dtype"]))
            continue
        decision = meta.get(node, meta.DECISION)
        if decision:
            want = meta.dtype_from_name(decision["dtype"])
            for value in node.all_input_nodes:
                have = meta.value_dtype(value)
                if meta.is_float_dtype(have) and have != want:
                    casts.add((value, want))
    return len(casts)


@pytest.mark.parametrize("name", ["bert", "gpt2", "resnet"])
def test_structure(exported, name):
    _, _, gm, report, path = exported(name)
    assert isinstance(report, ExportReport)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)

    # Casts: one per cast of the converted model, no chains, none added or lost by the export
    assert cast_chains(proto) == 0
    assert count_casts(proto) == report.cast_count
    assert report.float_casts == _float_casts_in(gm)
    assert report.precision_mismatches == []

    # initializers stored 16-bit where the converted model stores them 16-bit
    params = {k: v.dtype for k, v in list(gm.named_parameters()) + list(gm.named_buffers())}
    inits = {i.name: i.data_type for i in proto.graph.initializer}
    onnx_dtype = {torch.float16: onnx.TensorProto.FLOAT16, torch.float32: onnx.TensorProto.FLOAT}
    shared = [k for k in inits if k in params and params[k] in onnx_dtype]
    assert len(shared) >= 5
    for key in shared:
        assert inits[key] == onnx_dtype[params[key]], key
    assert sum(1 for t in inits.values() if t == onnx.TensorProto.FLOAT16) >= 10

    # inputs and outputs keep the original dtypes, batch dimension symbolic
    elem = {i.name: i.type.tensor_type.elem_type for i in list(proto.graph.input) + list(proto.graph.output)}
    if name == "resnet":
        assert elem == {"x": onnx.TensorProto.FLOAT, "output": onnx.TensorProto.FLOAT}
    else:
        assert all(elem[i.name] == onnx.TensorProto.INT64 for i in proto.graph.input)
        assert all(elem[o.name] == onnx.TensorProto.FLOAT for o in proto.graph.output)
    for value in list(proto.graph.input) + list(proto.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"

    # node names carry the module path of the fx node they came from
    names = [n.name for n in proto.graph.node]
    prefix = {"bert": "encoder.layer.0.attention.self/", "gpt2": "transformer.h.0.attn.c_attn/",
              "resnet": "layer1.0.conv1/"}[name]
    assert any(n.startswith(prefix) for n in names)


def test_precision_islands_bert(exported):
    _, _, _, report, path = exported("bert")
    fp16, fp32 = report.ops_by_dtype["float16"], report.ops_by_dtype["float32"]
    assert fp32["LayerNormalization"] == 5 and "LayerNormalization" not in fp16
    assert fp16["MatMul"] >= 12 and fp16["Softmax"] == 2 and "MatMul" not in fp32
    assert report.cast_count == 11 and report.float_casts == 10
    # each LayerNormalization reads fp32, each attention MatMul fp16
    proto = onnx.shape_inference.infer_shapes(onnx.load(path))
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output)}
    types.update({i.name: i.data_type for i in proto.graph.initializer})
    for node in proto.graph.node:
        if node.op_type == "LayerNormalization":
            assert {types[i] for i in node.input if i} == {onnx.TensorProto.FLOAT}, node.name


def test_precision_islands_resnet(exported):
    _, _, _, report, _ = exported("resnet")
    assert report.ops_by_dtype["float16"]["Conv"] == 12
    assert report.cast_count == 2  # input -> fp16, logits -> fp32
    assert report.initializer_dtypes.get("FLOAT", 0) == 0


@pytest.mark.parametrize("name", ["bert", "gpt2", "resnet"])
def test_matches_pytorch_at_two_batch_sizes(exported, name):
    _, make_inputs, gm, _, path = exported(name)
    session = ort_session(path, device="cpu")
    for batch in (2, 5):
        args, kwargs = make_inputs(batch, torch.Generator().manual_seed(10 + batch))
        got = session(*args, **kwargs)
        with torch.no_grad():
            want = [t.float().numpy() for t in pytree.tree_leaves(gm(*args, **kwargs))]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == np.float32 and g.shape == w.shape
            assert rel_l2(w, g) <= TOLERANCE[name], (name, batch, rel_l2(w, g))


def test_cpu_fallbacks_name_nodes(exported):
    _, _, _, _, path = exported("bert")
    session = ort_session(path, device="cpu")
    names = {n.name for n in onnx.load(path).graph.node}
    for message in session.fallbacks:
        node = message.split("'")[1]
        assert node in names and "kept fp32" in message


def test_fusion_keeps_precision_bert(exported, tmp_path):
    _, make_inputs, gm, plain, _ = exported("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_onnx(gm, tmp_path / "bert-fused.onnx", optimize=True)
    proto = onnx.load(report.path)
    onnx.checker.check_model(proto, full_check=True)
    assert report.fusions.get("Attention", 0) + report.fusions.get("MultiHeadAttention", 0) == 2
    assert report.fusions.get("SkipLayerNormalization") == 4
    assert report.float_casts == plain.float_casts and cast_chains(proto) == 0
    assert report.ops_by_dtype["float32"]["SkipLayerNormalization"] == 4
    assert any("precision decisions kept" in n for n in report.fusion_notes)
    args, kwargs = make_inputs(3, torch.Generator().manual_seed(7))
    got = ort_session(report.path, device="cpu")(*args, **kwargs)
    with torch.no_grad():
        want = [t.numpy() for t in pytree.tree_leaves(gm(*args, **kwargs))]
    for g, w in zip(got, want):
        assert rel_l2(w, g) <= TOLERANCE["bert"]


def test_fusion_guard_rejects_moved_island(exported):
    _, _, _, _, path = exported("bert")
    before = onnx.load(path)
    after = onnx.load(path)
    cast = next(n for n in after.graph.node if n.op_type == "Cast"
                and next(a.i for a in n.attribute if a.name == "to") == onnx.TensorProto.FLOAT)
    for node in after.graph.node:  # bypass one fp16 -> fp32 boundary, as a careless fusion would
        for i, name in enumerate(node.input):
            if name == cast.output[0]:
                node.input[i] = cast.input[0]
    after.graph.node.remove(cast)
    reason = precision_kept(before, after)
    assert reason is not None and "Casts" in reason


# ------------------------------------------------------------------------------------- bad inputs


class _TopK(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        values, indices = torch.topk(self.fc(x), 3, dim=-1)
        return values, indices


def test_no_fp16_kernel_kept_fp32_with_message(tmp_path):
    x = torch.randn(4, 8)
    gm = rewriter.convert(_TopK().eval(), (x,), precision="fp16")
    with pytest.warns(UserWarning, match="TopK"):
        report = export_onnx(gm, tmp_path / "topk.onnx")
    assert len(report.fallbacks) == 1
    assert "'topk' (TopK)" in report.fallbacks[0] and "kept fp32" in report.fallbacks[0]
    assert report.ops_by_dtype["float32"]["TopK"] == 1 and report.cast_chains == 0
    values, indices = ort_session(report.path, device="cpu")(x)
    want_values, want_indices = gm(x)
    np.testing.assert_array_equal(indices, want_indices.numpy())
    assert rel_l2(want_values.numpy(), values) <= 1e-3

    with pytest.raises(RewriterError, match=r"'topk' \(TopK\).*refused"):
        export_onnx(gm, tmp_path / "topk2.onnx", fallback="error")


@torch.library.custom_op("rewriter_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_opaque.register_fake
def _(x):
    return torch.empty_like(x)


class _Opaque(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(8, 8)

    def forward(self, x):
        return _opaque(self.head(x))


def test_op_without_onnx_export_is_refused(tmp_path):
    gm = rewriter.convert(_Opaque().eval(), (torch.randn(4, 8),), precision="fp16")
    with pytest.raises(RewriterError, match=r"refused at node %opaque.*rewriter_test\.opaque.*refused"):
        export_onnx(gm, tmp_path / "opaque.onnx")


def test_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="rewriter.convert"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    gm = rewriter.convert(torch.nn.Sequential(torch.nn.Linear(8, 8)).eval(), (torch.randn(2, 8),))
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(gm, tmp_path / "x.onnx", opset=9)
    with pytest.raises(ConfigError, match="fallback"):
        export_onnx(gm, tmp_path / "x.onnx", fallback="ignore")
    with pytest.raises(InputError, match="does not exist"):
        export_onnx(gm, tmp_path / "missing" / "x.onnx")
    with pytest.raises(InputError, match="no ONNX model"):
        ort_session(tmp_path / "nothing.onnx", device="cpu")


def test_cuda_unavailable_names_package(exported):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA EP")
    _, _, _, _, path = exported("resnet")
    with pytest.raises(RewriterError, match=r"onnxruntime \S+.*onnxruntime-gpu"):
        ort_session(path, device="cuda")


def test_bf16_for_cuda_ep_refused_on_cpu_ep_naming_node(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    gm = rewriter.convert(model, (torch.randn(2, 8),), precision="bf16")
    report = export_onnx(gm, tmp_path / "bf16.onnx", target="ort-cuda")  # bf16 GEMMs: the file needs CUDA
    onnx.checker.check_model(onnx.load(report.path), full_check=True)
    assert report.initializer_dtypes.get("BFLOAT16", 0) >= 2 and report.cast_chains == 0
    with pytest.raises(RewriterError, match=r"no kernel for \w+-\d+ node '0/linear.*refused"):
        ort_session(report.path, device="cpu")


def test_import_stays_lazy():
    import subprocess
    import sys

    code = "import sys, rewriter; print('rewriter.backends.onnx' in sys.modules, 'onnxscript' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    assert callable(rewriter.export_onnx)
