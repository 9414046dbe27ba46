"""Flags passed through to library options: --dynamic/--static -> convert(dynamic_shapes=, static=),
--target -> export_onnx(target=). A flag the installed library does not take yet is refused, not dropped."""
from __future__ import annotations

import argparse

import pytest
import torch

import rewriter
from rewriter.cli import main
from rewriter.cli.parser import parse_dynamic

MLP = "fixtures_models:tiny_mlp"


def test_parse_dynamic():
    assert parse_dynamic("0") == {"*": (0,)}
    assert parse_dynamic("0,1") == {"*": (0, 1)}
    assert parse_dynamic("0:0, 0:1,attention_mask:1") == {0: (0, 1), "attention_mask": (1,)}
    for bad in ("", "x", "0:-1", "a b:1", ","):
        with pytest.raises(argparse.ArgumentTypeError, match="--dynamic"):
            parse_dynamic(bad)


def test_dynamic_and_static_exclude_each_other(capsys):
    assert main(["convert", MLP, "--input-shape", "4,16", "-o", "x.pt2", "--dynamic", "0", "--static"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_help_documents_the_pass_through_flags(capsys):
    assert main(["convert", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--dynamic DIMS" in text and "dynamic_shapes" in text
    assert "--static" in text and "static=True" in text
    assert "--target {ort-cpu,ort-cuda,tensorrt}" in text and "export_onnx's target" in text


def _recording_convert(calls):
    real = rewriter.convert

    def convert(model, args=None, kwargs=None, *, dynamic_shapes=None, static=False, **options):
        calls.append({"dynamic_shapes": dynamic_shapes, "static": static})
        return real(model, args, kwargs, **options)
    return convert


DYNAMIC = torch.export.Dim.DYNAMIC


@pytest.mark.parametrize("flags, expected", [
    (["--dynamic", "0"], {"dynamic_shapes": ({0: DYNAMIC},), "static": False}),
    (["--dynamic", "0:0,1"], {"dynamic_shapes": ({0: DYNAMIC, 1: DYNAMIC},), "static": False}),
    (["--dynamic", "x:1"], {"dynamic_shapes": ({1: DYNAMIC},), "static": False}),  # forward(self, x)
    (["--static"], {"dynamic_shapes": None, "static": True}),
    ([], {"dynamic_shapes": None, "static": False}),
])
def test_shape_flags_reach_convert(flags, expected, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(rewriter, "convert", _recording_convert(calls))
    assert main(["-q", "convert", MLP, "--input-shape", "4,16", "-o", str(tmp_path / "m.pt2"), *flags]) == 0
    assert calls == [expected]


@pytest.mark.parametrize("flag, expected", [("30", 30.0), ("0", None)])
def test_capture_time_limit_flag_reaches_convert(flag, expected, tmp_path, monkeypatch, capsys):
    calls, real = [], rewriter.convert

    def convert(model, args=None, kwargs=None, **options):
        calls.append(options.get("capture_time_limit", "absent"))
        return real(model, args, kwargs, **options)

    monkeypatch.setattr(rewriter, "convert", convert)
    out = tmp_path / "m.pt2"
    assert main(["-q", "convert", MLP, "--input-shape", "4,16", "-o", str(out), "--capture-time-limit", flag]) == 0
    assert calls == [expected]
    assert rewriter.load(out).meta["rewriter"]["config"]["capture_time_limit"] == expected


def test_shape_flag_refused_when_the_library_does_not_take_it(tmp_path, monkeypatch, capsys):
    real = rewriter.convert

    # a convert without dynamic_shapes/static parameters and without **kwargs refuses the flag clearly
    def strict(model, example_inputs=None, example_kwargs=None, *, precision="fp16", overrides=None,
               calibration=None, tolerance=None, progress=False, backend="eager", backend_options=None):
        return real(model, example_inputs, example_kwargs, precision=precision)

    monkeypatch.setattr(rewriter, "convert", strict)
    out = tmp_path / "m.pt2"
    assert main(["convert", MLP, "--input-shape", "4,16", "-o", str(out), "--static"]) == 2
    err = capsys.readouterr().err
    assert "--static needs rewriter.convert(..., static=...)" in err and not out.exists()


def test_target_reaches_export_onnx(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_export(gm, path, *, optimize=False, assume_right_padding=False, target=None, **options):
        calls.append(target)
        with open(path, "wb") as fh:
            fh.write(b"onnx")
        return None

    monkeypatch.setattr(rewriter, "export_onnx", fake_export, raising=False)  # what the CLI calls
    out = tmp_path / "m.onnx"
    assert main(["-q", "convert", MLP, "--input-shape", "4,16", "-o", str(out), "--target", "ort-cpu"]) == 0
    assert calls == ["ort-cpu"] and out.read_bytes() == b"onnx"
    assert main(["convert", MLP, "--input-shape", "4,16", "-o", str(tmp_path / "m.pt2"),
                 "--target", "ort-cuda"]) == 2
    assert "--target ort-cuda: these flags shape an ONNX export" in capsys.readouterr().err
    assert main(["convert", MLP, "--input-shape", "4,16", "-o", str(out), "--target", "cuda"]) == 2
    assert "invalid choice: 'cuda'" in capsys.readouterr().err


class _TwoInputs(torch.nn.Module):
    def forward(self, ids, mask=None):
        return ids * mask


def test_dynamic_shapes_from_names_keyword_inputs():
    from rewriter.cli.loading import dynamic_shapes_from

    ids, mask = torch.ones(2, 8), torch.ones(2, 8)
    model = _TwoInputs()
    assert dynamic_shapes_from({"*": (0,), "mask": (1,)}, model, (ids,), {"mask": mask}) == \
        {"ids": {0: DYNAMIC}, "mask": {0: DYNAMIC, 1: DYNAMIC}}
    assert dynamic_shapes_from({1: (1,)}, model, (ids, mask), {}) == (None, {1: DYNAMIC})
    assert dynamic_shapes_from({"*": (3,)}, model, (ids, mask), {}) == (None, None)  # "*": where it exists


@pytest.mark.parametrize("spec, expected", [
    ({"attention_mask": (1,)}, "does not take; its inputs are 0 (ids), 1 (mask)"),
    ({5: (0,)}, "does not take"),
    ({"ids": (2,)}, "input ids has 2 dimensions [2, 8]; dimension 2 does not exist"),
])
def test_dynamic_shapes_from_refuses_what_does_not_exist(spec, expected):
    from rewriter.cli.loading import dynamic_shapes_from
    from rewriter.errors import InputError

    with pytest.raises(InputError) as info:
        dynamic_shapes_from(spec, _TwoInputs(), (torch.ones(2, 8),), {"mask": torch.ones(2, 8)})
    assert expected in str(info.value)
