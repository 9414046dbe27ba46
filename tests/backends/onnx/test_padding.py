"""export_onnx(assume_right_padding=True): a key padding mask becomes ONNX Runtime's 1-D mask_index (valid
length per row), only by request, only when the example is right-padded; outputs equal the exact export on
right-padded batches, and the option is not exact on left-padded ones (why it is opt-in)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import rewriter
from rewriter.backends.onnx import export_onnx, ort_session
from rewriter.backends.onnx.padding import is_right_padded
from rewriter.errors import ConfigError
from tests.backends.onnx.onnx_checks import op_counts
from tests.helpers import rel_l2

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

TOLERANCE = 3e-3  # relative L2, as the other ONNX tests


def _bench_onnx():
    from tools import bench_onnx

    return bench_onnx


def test_is_right_padded():
    assert is_right_padded(np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]]))
    assert not is_right_padded(np.array([[0, 1, 1]]))
    assert not is_right_padded(np.array([[1, 0, 1]]))
    assert not is_right_padded(np.ones(3))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    model, _, feeds, _, _ = _bench_onnx().build("bert", small=True, random_bias=True)
    gm = rewriter.convert(model, (), dict(feeds), precision="fp16", overrides={"layer_norm": "fp16"})
    folder = tmp_path_factory.mktemp("rpad")
    exact = export_onnx(gm, folder / "exact.onnx", optimize=True)
    rpad = export_onnx(gm, folder / "rpad.onnx", optimize=True, assume_right_padding=True)
    return gm, feeds, exact, rpad


def _errors(path, gm, feeds, side):
    am = torch.ones_like(feeds["attention_mask"])
    if side == "right":
        am[0, 20:] = 0
    else:
        am[0, :12] = 0
    got = ort_session(path, device="cpu")(input_ids=feeds["input_ids"], attention_mask=am)[0]
    with torch.no_grad():
        want = gm(input_ids=feeds["input_ids"], attention_mask=am).float().numpy()
    valid = am.bool().numpy()
    return rel_l2(want[valid], got[valid])


def test_mask_index_replaces_the_bias(bert):
    _, _, exact, rpad = bert
    proto = onnx.load(rpad.path)
    onnx.checker.check_model(proto, full_check=True)
    ops = op_counts(proto)
    assert ops["ReduceSum"] == 1 and "Where" not in ops and "Expand" not in ops
    for node in (n for n in proto.graph.node if n.op_type == "Attention"):
        assert node.input[3].endswith("__mask_index") and (len(node.input) < 6 or node.input[5] == "")
    assert "Where" in op_counts(onnx.load(exact.path))
    assert "correct only for right-padded rows" in rpad.fusion_notes[-1]
    assert not any("assume_right_padding" in n for n in exact.fusion_notes)


def test_right_padding_matches_left_padding_does_not(bert):
    gm, feeds, exact, rpad = bert
    assert _errors(rpad.path, gm, feeds, "right") <= TOLERANCE
    exact_left, rpad_left = _errors(exact.path, gm, feeds, "left"), _errors(rpad.path, gm, feeds, "left")
    assert exact_left <= TOLERANCE < rpad_left  # why the option is off by default


def test_needs_optimize_and_a_right_padded_example(bert, tmp_path):
    gm, feeds, _, _ = bert
    with pytest.raises(ConfigError, match="needs optimize=True"):
        export_onnx(gm, tmp_path / "x.onnx", assume_right_padding=True)
    left = dict(feeds)
    left["attention_mask"] = torch.ones_like(feeds["attention_mask"])
    left["attention_mask"][:, :3] = 0
    report = export_onnx(gm, tmp_path / "y.onnx", optimize=True, assume_right_padding=True,
                         example_inputs=((), left))
    assert "not applied, an example attention mask is not right-padded" in report.fusion_notes[-1]
    assert "ReduceSum" not in op_counts(onnx.load(report.path))
