"""ConvertConfig validation: ConfigErrors that say what to write instead."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

import rewriter
from rewriter import meta, pipeline
from rewriter.backend_options import BackendOptions
from rewriter.config import ConvertConfig, Override, Precision, parse_overrides
from rewriter.passes.op_tables import is_known_op


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
    # bare words are decided by the op table, which lives above the config (Assign resolves them)
    assert overrides == (
        Override("softmax", Precision.FP16, "name"),
        Override("re:encoder\\..*", Precision.FP32, "regex"),
        Override("head", Precision.BF16, "name"),
        Override("blocks.1.fc", Precision.FP32, "module"),
    )
    resolved = tuple(o.resolve(is_known_op) for o in overrides)
    assert [o.kind for o in resolved] == ["op", "regex", "module", "module"]
    assert [o.rank for o in resolved] == [2, 3, 4, 4]   # op < regex < exact path
    assert parse_overrides(["softmax=fp16", "re:a=fp32"]) == overrides[:1] + (
        Override("re:a", Precision.FP32, "regex"),)
    with pytest.raises(ValueError, match="resolve"):
        overrides[0].rank


def test_a_bare_word_override_applies_to_the_op_or_the_module():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 4)

        def forward(self, x):
            return torch.softmax(self.head(x), -1)

    gm = rewriter.convert(Net().eval(), (torch.randn(2, 4),), precision="fp16",
                          overrides={"softmax": "fp16", "head": "fp32"})
    decisions = {n.name: meta.get(n, meta.DECISION) for n in gm.graph.nodes if meta.get(n, meta.DECISION)}
    rules = {name: d["rule"] for name, d in decisions.items()}
    assert rules["softmax"] == "override:op" and decisions["softmax"]["dtype"] == "float16"
    assert rules["linear"] == "override:module" and decisions["linear"]["dtype"] == "float32"


@pytest.mark.parametrize("overrides, reason", [
    ({"softmax": "fp12"}, "unknown precision in override 'softmax' 'fp12'"),
    ({"softmax": "fp8"}, "fp8 can only be the global precision"),
    ({"re:enc(oder": "fp32"}, "invalid regular expression"),
    (["softmax"], "must look like KEY=PRECISION"),
])
def test_bad_overrides_say_what_to_write(overrides, reason):
    with pytest.raises(rewriter.ConfigError, match=reason.replace("(", "\\(")):
        rewriter.convert(_model(), (torch.randn(2, 4),), overrides=overrides)


@pytest.mark.parametrize("route", ["keywords", "config"])
def test_tolerance_needs_calibration(route):
    options = {"tolerance": 1e-2} if route == "keywords" else {"config": ConvertConfig(tolerance=1e-2)}
    with pytest.raises(rewriter.ConfigError) as info:
        rewriter.convert(_model(), (torch.randn(2, 4),), **options)
    assert "tolerance needs calibration data: pass calibration=[(x1,), (x2,), ...]" in str(info.value)


# ---------------------------------------------------------------------- one config, two routes


def _built_config(monkeypatch, **options) -> ConvertConfig:
    """The ConvertConfig convert() builds from `options` (the first pass sees it; nothing is converted)."""
    seen = []

    def stop(config, **kwargs):
        seen.append(config)
        raise _Stop

    monkeypatch.setattr(pipeline, "build_passes", stop)
    with pytest.raises(_Stop):
        rewriter.convert(_model(), (torch.randn(2, 4),), **options)
    return seen[0]


class _Stop(Exception):
    pass


ROUTES = [
    dict(precision="bf16"),
    dict(precision="fp16", overrides={"softmax": "fp32", "re:0": "bf16"}, keep_io_types=False,
         dynamic_batch=False, allow_bf16_fallback=True),
    dict(precision="fp8", fp8=rewriter.Fp8Options(granularity="row", min_rows=0)),
    dict(precision="bf16", backend="compile", backend_options={"compiler": "aot_eager", "dynamic": False}),
    dict(precision="bf16", mode="train"),
]


@pytest.mark.parametrize("options", ROUTES, ids=lambda o: ",".join(o))
def test_keywords_and_config_build_the_same_config(monkeypatch, options):
    from_keywords = _built_config(monkeypatch, **options)
    from_config = _built_config(monkeypatch, config=ConvertConfig(**options))
    assert from_keywords == from_config == ConvertConfig.from_options(**options)
    assert from_keywords.to_dict() == from_config.to_dict()


def test_every_config_field_is_a_convert_option(monkeypatch):
    """A field added to ConvertConfig is a keyword of convert() without touching convert()."""
    for field in dataclasses.fields(ConvertConfig):
        value = getattr(ConvertConfig(), field.name)
        assert _built_config(monkeypatch, **{field.name: value}) == ConvertConfig()


@pytest.mark.parametrize("route", ["keywords", "config"])
def test_both_routes_refuse_the_same_values(route):
    bad = dict(precision="bf16", backend="eager", backend_options={"max_graphs": 2})
    options = bad if route == "keywords" else None
    with pytest.raises(rewriter.ConfigError, match="backend 'eager' takes no options, got 'max_graphs'"):
        if options is None:
            rewriter.convert(_model(), (torch.randn(2, 4),), config=ConvertConfig(**bad))
        else:
            rewriter.convert(_model(), (torch.randn(2, 4),), **options)


def test_config_and_keywords_together_are_refused():
    with pytest.raises(rewriter.ConfigError) as info:
        rewriter.convert(_model(), (torch.randn(2, 4),), config=ConvertConfig(), precision="bf16")
    message = str(info.value)
    assert "pass either config= or keyword options, not both" in message
    assert "write config=config.replace(precision=...)" in message


def test_replace_validates_again():
    config = ConvertConfig(precision="bf16")
    assert config.replace(precision="fp16").precision is Precision.FP16
    with pytest.raises(rewriter.ConfigError, match="did you mean 'precision'"):
        config.replace(precison="fp16")
    with pytest.raises(rewriter.ConfigError, match="unknown mode"):
        config.replace(mode="serve")


@pytest.mark.parametrize("name, closest", [("precison", "precision"), ("overide", "overrides"),
                                           ("backend_option", "backend_options"), ("keep_io_type", "keep_io_types")])
def test_unknown_option_names_the_closest_one(name, closest):
    with pytest.raises(rewriter.ConfigError) as info:
        rewriter.convert(_model(), (torch.randn(2, 4),), **{name: "x"})
    message = str(info.value)
    assert f"convert() got an unknown option {name!r}; did you mean {closest!r}?" in message
    assert "the fields of rewriter.ConvertConfig" in message


def test_config_must_be_a_convert_config():
    with pytest.raises(rewriter.ConfigError, match="must be a rewriter.ConvertConfig"):
        rewriter.convert(_model(), (torch.randn(2, 4),), config={"precision": "bf16"})


# ---------------------------------------------------------------------- typed backend and FP8 options


def test_backend_options_dict_becomes_typed():
    config = ConvertConfig(backend="cuda_graphs", backend_options={"clone_outputs": False, "max_graphs": 4})
    assert config.backend_options == BackendOptions(clone_outputs=False, max_graphs=4)
    assert config.backend_kwargs() == {"clone_outputs": False, "max_graphs": 4}
    assert config.to_dict()["backend_options"] == {"clone_outputs": False, "max_graphs": 4}
    assert ConvertConfig(backend="compile", backend_options={"options": {"b": 1, "a": 2}}) \
        == ConvertConfig(backend="compile", backend_options=BackendOptions(options={"a": 2, "b": 1}))


@pytest.mark.parametrize("options, message", [
    ({"clone_output": False}, "unknown backend option 'clone_output'; did you mean 'clone_outputs'?"),
    ({"max_graphs": 0}, "max_graphs=0 must be None or a whole number >= 1"),
    ({"warmup": -1}, "warmup=-1 must be a whole number >= 0"),
    ({"dynamic": "yes"}, "dynamic='yes' must be None, 'batch', True or False"),
    ({"compile_mode": 3}, "compile_mode=3 must be a string"),
    ({"compile_mode": "max-autotune", "options": {"a": 1}}, "give either compile_mode or options"),
    ({"options": [1]}, "options must be a dict of inductor options"),
])
def test_backend_options_are_validated(options, message):
    with pytest.raises(rewriter.ConfigError) as info:
        ConvertConfig(backend="compile", backend_options=options)
    assert message in str(info.value)


def test_backend_option_of_another_backend_is_refused():
    with pytest.raises(rewriter.ConfigError, match="unknown option 'warmup' for backend 'compile'"):
        ConvertConfig(backend="compile", backend_options=BackendOptions(warmup=3))
    with pytest.raises(rewriter.ConfigError, match="unknown compile_mode 'max-autotun'.*did you mean 'max-autotune'"):
        ConvertConfig(backend="compile", backend_options={"compile_mode": "max-autotun"})
    with pytest.raises(rewriter.ConfigError, match="unknown backend 'compil'.*did you mean 'compile'"):
        ConvertConfig(backend="compil")


def test_fp8_options_are_a_config_field():
    config = ConvertConfig(precision="fp8", fp8={"granularity": "row"})
    assert config.fp8 == rewriter.Fp8Options(granularity="row")
    assert ConvertConfig().fp8 == rewriter.Fp8Options()
    # fused_quantization=None is decided by the backend
    assert config.fp8_options().fused_quantization is False
    compiled = ConvertConfig(precision="fp8", backend="compile")
    assert compiled.fp8_options().fused_quantization is True
    with pytest.raises(rewriter.ConfigError, match="unknown FP8 option 'granularty'; did you mean 'granularity'"):
        ConvertConfig(precision="fp8", fp8={"granularty": "row"})
    with pytest.raises(rewriter.ConfigError, match="granularity='row'\\) is for mode='eval'"):
        ConvertConfig(precision="fp8", mode="train", fp8=rewriter.Fp8Options(granularity="row"))


@pytest.mark.parametrize("name", ["keep_io_types", "dynamic_batch", "allow_bf16_fallback"])
def test_flags_must_be_booleans(name):
    with pytest.raises(rewriter.ConfigError, match=f"{name}='no' must be True or False"):
        ConvertConfig(**{name: "no"})
