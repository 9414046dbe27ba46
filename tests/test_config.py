"""ConvertConfig validation: ConfigErrors that say what to write instead."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import rewriter
from rewriter.config import ConvertConfig, Override, Precision, parse_overrides


def _model():
    return nn.Sequential(nn.Linear(4, 4)).eval()


@pytest.mark.parametrize("bad", ["fp12", "int8", "", "float64"])
def test_unknown_precision_names_the_valid_choices(bad):
    with pytest.raises(rewriter.ConfigError) as info:
        rewriter.convert(_model(), (torch.randn(2, 4),), precision=bad)
    message = str(info.value)
    assert f"unknown precision {bad!r}" in message
    for choice in ("'fp16'", "'bf16'", "'fp8'"):
        assert choice in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("alias, precision", [("float16", "fp16"), ("half", "fp16"), ("BF16", "bf16"),
                                              ("bfloat16", "bf16"), (Precision.FP16, "fp16")])
def test_precision_aliases(alias, precision):
    assert ConvertConfig(precision=alias).precision.value == precision


def test_fp32_is_not_a_target_precision():
    with pytest.raises(rewriter.ConfigError, match="choose 'fp16', 'bf16' or 'fp8'"):
        ConvertConfig(precision="fp32")


def test_unknown_mode():
    with pytest.raises(rewriter.ConfigError, match="write mode='eval' or mode='train'"):
        ConvertConfig(mode="inference")


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        ConvertConfig().precision = Precision.BF16


def test_overrides_are_parsed_by_kind():
    overrides = parse_overrides({"softmax": "fp16", "re:encoder\\..*": "fp32", "head": "bf16",
                                 "blocks.1.fc": "float32"})
    assert overrides == (
        Override("softmax", Precision.FP16, "op"),
        Override("re:encoder\\..*", Precision.FP32, "regex"),
        Override("head", Precision.BF16, "module"),
        Override("blocks.1.fc", Precision.FP32, "module"),
    )
    assert [o.rank for o in overrides] == [2, 3, 4, 4]   # op < regex < exact path
    assert parse_overrides(["softmax=fp16", "re:a=fp32"]) == overrides[:1] + (
        Override("re:a", Precision.FP32, "regex"),)


@pytest.mark.parametrize("overrides, reason", [
    ({"softmax": "fp12"}, "unknown precision in override 'softmax' 'fp12'"),
    ({"softmax": "fp8"}, "fp8 can only be the global precision"),
    ({"re:enc(oder": "fp32"}, "invalid regular expression"),
    (["softmax"], "must look like KEY=PRECISION"),
])
def test_bad_overrides_say_what_to_write(overrides, reason):
    with pytest.raises(rewriter.ConfigError, match=reason.replace("(", "\\(")):
        rewriter.convert(_model(), (torch.randn(2, 4),), overrides=overrides)


def test_tolerance_needs_calibration():
    with pytest.raises(rewriter.ConfigError, match="tolerance needs calibration data"):
        rewriter.convert(_model(), (torch.randn(2, 4),), tolerance=1e-2)
