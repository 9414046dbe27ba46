"""rewriter.programs: inputs, names and the fp32 twin of loaded programs (what the CLI used to do itself)."""
import copy

import pytest
import torch

import fixtures_models as fm
import rewriter
from rewriter import meta
from rewriter.errors import InputError
from rewriter.measure import rel_l2
from rewriter.programs import example_inputs, fp32_twin, program_name


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("programs")
    plain = folder / "mlp.pt2"
    ep = torch.export.export(fm.tiny_mlp(), (torch.randn(*fm.MLP_SHAPE),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    torch.export.save(ep, str(plain))
    conv = folder / "mlp-fp16.pt2"
    rewriter.save(rewriter.convert(fm.tiny_mlp(), (torch.randn(*fm.MLP_SHAPE),), precision="fp16"), conv)
    return rewriter.load(plain), rewriter.load(conv)


def test_example_inputs_from_recorded_shapes_and_given_ones(saved):
    gm, _ = saved
    (x,), kwargs = example_inputs(gm)
    assert kwargs == {} and tuple(x.shape) == fm.MLP_SHAPE and x.dtype == torch.float32
    (y,), _ = example_inputs(gm, shapes=[(9, 16)], dtypes=[torch.float64])
    assert tuple(y.shape) == (9, 16) and y.dtype == torch.float64
    assert torch.equal(example_inputs(gm)[0][0], x)  # seeded: the same inputs every time


@pytest.mark.parametrize("shapes, expected", [
    ([(4, 17)], "dimension 1 is fixed to 16"),
    ([(4, 16, 1)], "has 2 dimensions"),
    ([(4, 16), (4, 16)], "takes 1 tensor input(s)"),
])
def test_example_inputs_refuse_shapes_that_do_not_fit(saved, shapes, expected):
    gm, _ = saved
    with pytest.raises(InputError, match=None) as info:
        example_inputs(gm, shapes=shapes, where="mlp.pt2")
    assert expected in str(info.value) and "mlp.pt2" in str(info.value)


def test_program_name_is_the_exported_class(saved):
    gm, converted = saved
    assert program_name(gm) == "TinyMLP"
    assert program_name(torch.fx.symbolic_trace(torch.nn.Linear(2, 2))) is None


def test_fp32_twin_computes_in_fp32_and_leaves_the_converted_model_alone(saved):
    _, converted = saved
    before_graph = str(converted.graph)
    before_dtypes = {k: v.dtype for k, v in converted.state_dict().items()}
    twin = fp32_twin(converted)
    assert str(converted.graph) == before_graph, "fp32_twin edited its input"
    assert {k: v.dtype for k, v in converted.state_dict().items()} == before_dtypes
    casts = [n for n in twin.graph.nodes if meta.CREATED in n.meta and n.kwargs.get("dtype") is not None]
    assert casts and all(n.kwargs["dtype"] == torch.float32 for n in casts)
    assert all(t.dtype == torch.float32 for t in twin.state_dict().values() if t.is_floating_point())
    x = torch.randn(*fm.MLP_SHAPE)
    out = twin(x)
    assert out.dtype == torch.float32
    # fp32 compute with the rounded fp16 weights: close to the converted model, but not identical
    err = rel_l2(out, converted(x))
    assert 0 < err < 1e-2
    again = copy.deepcopy(twin)
    assert torch.equal(again(x), out)
