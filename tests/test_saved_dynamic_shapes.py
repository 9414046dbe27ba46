"""Saved and exported programs keep the dynamic shapes convert found (rewriter/reexport.py): a BERT
converted at one length, saved as .pt2 and loaded in a fresh process runs at other lengths and batch
sizes within the autocast budget; a size outside the captured range is the same InputError a freshly
converted model gives; the ONNX file's sequence axis is symbolic and ONNX Runtime runs other lengths."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import rewriter
from rewriter import meta
from rewriter.errors import InputError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# bf16 on CPU: ours within 1.5x CPU autocast's relative L2 plus a floor for fp32-noise differences
BUDGET_FACTOR, BUDGET_FLOOR = 1.5, 1e-3
FP16_ONNX_TOL = 1e-2  # relative L2 of the fp16 ONNX file on ORT CPU vs the fp32 model


def _rel_l2(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    return float((got - ref).norm() / ref.norm())


def _text_inputs(batch: int, length: int) -> dict:
    g = torch.Generator().manual_seed(batch * 100 + length)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2:] = 0
    return {"input_ids": torch.randint(3, 128, (batch, length), generator=g), "attention_mask": mask}


def _bert():
    import transformers
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


class _Valid5(nn.Module):
    """A 5x5 convolution without padding: the image must be at least 5 pixels high and wide."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5)

    def forward(self, x):
        return self.conv(x).relu().mean(dim=(2, 3))


# runs in a fresh process: load, call at other shapes, record outputs and InputError messages
_CHILD = textwrap.dedent("""
    import json, sys, torch, rewriter
    from rewriter.errors import InputError
    bert_path, conv_path, inputs_path, out_path = sys.argv[1:5]
    calls = torch.load(inputs_path)
    bert, conv = rewriter.load(bert_path), rewriter.load(conv_path)
    outputs, errors = {}, {}
    for key, kwargs in calls["bert"].items():
        outputs[key] = bert(**kwargs).last_hidden_state
    outputs["conv"] = conv(calls["conv"])
    for key, call in (("bert_long", lambda: bert(**calls["bert_long"])),
                      ("conv_small", lambda: conv(calls["conv_small"]))):
        try:
            call()
            errors[key] = None
        except InputError as exc:
            errors[key] = "InputError: " + str(exc)
        except BaseException as exc:
            errors[key] = type(exc).__name__ + ": " + str(exc)
    torch.save(outputs, out_path)
    print(json.dumps(errors))
""")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    bert = _bert()
    fast = rewriter.convert(bert, _text_inputs(2, 16), precision="bf16")
    torch.manual_seed(0)
    conv = _Valid5().eval()
    fast_conv = rewriter.convert(conv, (torch.randn(2, 3, 16, 16),), precision="bf16")
    rewriter.save(fast, folder / "bert.pt2")
    rewriter.save(fast_conv, folder / "conv.pt2")
    return folder, bert, fast, conv, fast_conv


def test_saved_bert_runs_other_lengths_in_a_fresh_process(saved):
    folder, bert, fast, conv, fast_conv = saved
    shapes = {"b2_s24": (2, 24), "b2_s40": (2, 40), "b3_s16": (3, 16)}
    calls = {"bert": {k: _text_inputs(*v) for k, v in shapes.items()}, "bert_long": _text_inputs(2, 80),
             "conv": torch.randn(3, 3, 20, 24), "conv_small": torch.randn(2, 3, 4, 16)}
    torch.save(calls, folder / "inputs.pt")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(folder / "bert.pt2"), str(folder / "conv.pt2"),
                           str(folder / "inputs.pt"), str(folder / "outputs.pt")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    outputs = torch.load(folder / "outputs.pt")

    with torch.no_grad():
        for key, kwargs in calls["bert"].items():
            ref = bert(**kwargs).last_hidden_state
            with torch.autocast("cpu", dtype=torch.bfloat16):
                auto = bert(**kwargs).last_hidden_state.float()
            ours = outputs[key]
            assert ours.shape == ref.shape and ours.dtype == ref.dtype, key
            ours_err, auto_err = _rel_l2(ref, ours), _rel_l2(ref, auto)
            assert ours_err <= BUDGET_FACTOR * auto_err + BUDGET_FLOOR, (key, ours_err, auto_err)
        assert outputs["conv"].shape == (3, 8)
        assert _rel_l2(conv(calls["conv"]), outputs["conv"]) < 2e-2  # bf16 conv: ~3 significant digits

    # the same InputError a freshly converted model gives: input, dimension, value, range, what to do
    with pytest.raises(InputError) as fresh:
        fast(**calls["bert_long"])
    loaded_long = errors["bert_long"]
    assert loaded_long.startswith("InputError: input 'input_ids' dimension 1 is 80, outside the range 1..64")
    assert "Call it within the range" in loaded_long
    assert str(fresh.value).split(" (captured shapes")[0] in loaded_long
    small = errors["conv_small"]
    assert small.startswith("InputError: input 'x' dimension 2 is 4, outside the range 5.."), small
    with pytest.raises(InputError, match=r"input 'x' dimension 2 is 4, outside the range 5\.\."):
        fast_conv(calls["conv_small"])


def test_saved_program_records_the_captured_dynamic_dims(saved):
    folder, *_ = saved
    loaded = rewriter.load(folder / "bert.pt2")
    shapes = {e["name"]: e["dims"] for e in loaded.meta[meta.INPUT_SHAPES]}
    assert set(shapes) == {"input_ids", "attention_mask"}
    for dims in shapes.values():
        assert [isinstance(d, dict) and "symbol" in d for d in dims] == [True, True]
        assert dims[1]["max"] == 64  # the position table bounds the length
    assert shapes["input_ids"][1]["symbol"] == shapes["attention_mask"][1]["symbol"]
    assert loaded.meta[meta.CALL_SIGNATURE]["kwargs"] == ["input_ids", "attention_mask"]
    # positional calls bind by the original forward's signature, as on the converted model
    kwargs = _text_inputs(2, 24)
    positional = loaded(kwargs["input_ids"], kwargs["attention_mask"]).last_hidden_state
    assert torch.equal(positional, loaded(**kwargs).last_hidden_state)


def test_onnx_export_keeps_sequence_axis_symbolic(tmp_path):
    import onnx
    import onnxruntime as ort

    bert = _bert()
    fast = rewriter.convert(bert, _text_inputs(2, 16), precision="fp16")
    path = tmp_path / "bert.onnx"
    rewriter.export_onnx(fast, path, target="ort-cpu")
    model = onnx.load(str(path))
    dims = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    assert set(dims) == {"input_ids", "attention_mask"}
    seq = {name: d[1].dim_param for name, d in dims.items()}
    assert all(seq.values()) and len(set(seq.values())) == 1, seq  # one symbol, shared by both inputs
    assert all(d[0].dim_param for d in dims.values())

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, length in ((2, 24), (3, 40)):
        kwargs = _text_inputs(batch, length)
        got = session.run(None, {k: v.numpy() for k, v in kwargs.items()})[0]
        with torch.no_grad():
            ref = bert(**kwargs).last_hidden_state
        assert got.shape == tuple(ref.shape)
        assert _rel_l2(ref, torch.from_numpy(got).float()) < FP16_ONNX_TOL

    # optimize=True: the fused file keeps the sequence axis symbolic too (tests/backends/onnx/test_symbolic.py)
    fused = tmp_path / "bert-opt.onnx"
    report = rewriter.export_onnx(fast, fused, target="ort-cpu", optimize=True)
    assert report.fusions.get("Attention") == 2 and report.symbolic_sizes == ["input_ids[1]", "attention_mask[1]"]
    dims = {i.name: i.type.tensor_type.shape.dim for i in onnx.load(str(fused)).graph.input}
    assert {name: (d[0].dim_param, d[1].dim_param) for name, d in dims.items()} == {
        "input_ids": ("batch", seq["input_ids"]), "attention_mask": ("batch", seq["input_ids"])}
