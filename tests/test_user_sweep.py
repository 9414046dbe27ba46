"""The tool as a user meets it, on models nobody wrote it for (none of them elsewhere in tests/ or the zoo).

Tiny random-init configs (default config values except sizes), on the CPU:
  * transformers: DistilBERT and MobileBERT with padding masks that have zeros, T5EncoderModel, BartModel,
    CLIPVisionModel, Whisper's encoder alone, Wav2Vec2Model on 1-D audio, SegFormer and DETR at a
    non-square image; torchvision VGG-11 converted at 64x64 and run at 96x80;
  * fp16 and bf16 against the fp32 model within test_models' per-precision ceilings, at the example
    shape and at another batch size and sequence length / image size (README: "any batch size,
    sequence length or image size the model accepts");
  * `rewriter.save`, then `rewriter.load` in a fresh Python process; the CLI on the saved files
    (`rewrite diff`, `rewrite convert ... -o x.onnx --target ort-cpu`) and the .onnx file on ONNX
    Runtime CPU against the converted PyTorch model;
  * hostile inputs: a wrong dtype, rank or a missing / unexpected input at call time is an InputError
    naming the input; a truncated, empty or random-bytes file is an InputError from `rewriter.load`
    and exit code 2 from the CLI, and never runs code.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import rewriter
from rewriter import measure, meta
from rewriter.errors import InputError
from helpers import rel_l2
from test_models import MAX_REL_L2

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
FP16_ONNX_TOL = 1e-2  # test_saved_dynamic_shapes: the fp16 ONNX file on ORT CPU


def _gen(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(sum(k * 1000 ** i for i, k in enumerate(key)))


def _tokens(vocab: int):
    def make(batch, seq):
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq // 2:] = 0  # a padded sequence: the mask has zeros
        return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=_gen(batch, seq)),
                "attention_mask": mask}
    return make


def _pixels(key: str | None):
    def make(batch, size):
        h, w = size
        x = torch.randn(batch, 3, h, w, generator=_gen(batch, h, w))
        return {key: x} if key else x
    return make


def _distilbert():
    import transformers
    return transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=128, dim=32, n_layers=2, n_heads=2, hidden_dim=64))


def _mobilebert():
    import transformers
    return transformers.MobileBertModel(transformers.MobileBertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        embedding_size=16, intra_bottleneck_size=32, true_hidden_size=32, num_feedforward_networks=1))


def _t5_encoder():
    import transformers
    return transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=128, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2))


def _bart():
    import transformers
    return transformers.BartModel(transformers.BartConfig(
        vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, use_cache=False))


def _clip_vision():
    import transformers
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8))


def _whisper_encoder():
    import transformers
    config = transformers.WhisperConfig(
        vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
        max_source_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    return transformers.WhisperModel(config).get_encoder()


def _wav2vec2():
    import transformers
    return transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2))


def _segformer():
    import transformers
    return transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(
        hidden_sizes=[16, 32], depths=[1, 1], num_encoder_blocks=2, sr_ratios=[2, 1], num_attention_heads=[1, 2],
        patch_sizes=[7, 3], strides=[4, 2], decoder_hidden_size=32, num_labels=5))


def _detr():
    import transformers
    backbone = transformers.ResNetConfig(hidden_sizes=[16, 32, 32, 32], depths=[1, 1, 1, 1], embedding_size=16,
                                         out_features=["stage4"])
    return transformers.DetrModel(transformers.DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, d_model=32,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10))


def _vgg11():
    import torchvision
    return torchvision.models.vgg11(num_classes=10)


def _audio(batch, samples):
    return {"input_values": torch.randn(batch, samples, generator=_gen(batch, samples))}


def _mel(batch, frames):
    return {"input_features": torch.randn(batch, 16, frames, generator=_gen(batch, frames))}


# name: (model, inputs(batch, size), example (batch, size), other (batch, size))
SPECS = {
    "distilbert-padded": (_distilbert, _tokens(128), (4, 16), (3, 24)),
    "mobilebert-padded": (_mobilebert, _tokens(128), (4, 16), (3, 24)),
    "t5-encoder": (_t5_encoder, _tokens(128), (4, 16), (3, 24)),
    "bart": (_bart, _tokens(128), (4, 16), (3, 24)),
    "clip-vision": (_clip_vision, _pixels("pixel_values"), (4, (32, 32)), (3, (32, 32))),  # fixed positions
    "whisper-encoder": (_whisper_encoder, _mel, (4, 64), (3, 64)),  # max_source_positions fixes the frames
    "wav2vec2": (_wav2vec2, _audio, (4, 800), (3, 1100)),
    "segformer": (_segformer, _pixels("pixel_values"), (2, (64, 64)), (3, (96, 80))),
    "detr": (_detr, _pixels("pixel_values"), (2, (64, 64)), (3, (96, 80))),
    "tv-vgg11": (_vgg11, _pixels(None), (2, (64, 64)), (3, (96, 80))),
}


def _call(model, inputs):
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _convert(model, inputs, precision):
    if isinstance(inputs, dict):
        return rewriter.convert(model, (), inputs, precision=precision)
    return rewriter.convert(model, (inputs,), precision=precision)


def _max_error(reference, candidate) -> float:
    want, got = list(measure.float_leaves(reference)), list(measure.float_leaves(candidate))
    assert [p for p, _ in got] == [p for p, _ in want]
    assert [t.dtype for _, t in got] == [t.dtype for _, t in want]
    assert [t.shape for _, t in got] == [t.shape for _, t in want]
    return max(rel_l2(w, g) for (_, w), (_, g) in zip(want, got))


@pytest.mark.parametrize("name", list(SPECS))
def test_converted_model_matches_fp32_at_example_and_other_shapes(name):
    make_model, make_inputs, example, other = SPECS[name]
    torch.manual_seed(0)
    model = make_model().eval()
    for precision in ("fp16", "bf16"):
        fast = _convert(model, make_inputs(*example), precision)
        for batch, size in (example, other):
            inputs = make_inputs(batch, size)
            reference, ours = _call(model, inputs), _call(fast, inputs)
            assert type(ours) is type(reference)
            error = _max_error(reference, ours)
            assert error <= MAX_REL_L2[precision], f"{name} {precision} at {batch}x{size}: {error:.3e}"


# ------------------------------------------------------------------ files: save/load, CLI, ONNX

def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300, **kw)


@pytest.fixture(scope="module")
def distilbert():
    torch.manual_seed(0)
    return _distilbert().eval()


def test_save_then_load_in_a_fresh_process(tmp_path):
    """BART: its forward builds a tensor constant (export's lifted_tensor_0), which once made save fail
    with "Mismatch in custom metadata for key rewriter"."""
    torch.manual_seed(0)
    make = _tokens(128)
    fast = rewriter.convert(_bart().eval(), (), make(4, 16), precision="fp16")
    rewriter.save(fast, tmp_path / "m.pt2")
    inputs = make(3, 24)  # another batch and length
    torch.save({"inputs": inputs, "want": _call(fast, inputs).last_hidden_state}, tmp_path / "io.pt")
    code = (f"import torch, rewriter\nio = torch.load({str(tmp_path / 'io.pt')!r})\n"
            f"m = rewriter.load({str(tmp_path / 'm.pt2')!r})\n"
            "out = m(**io['inputs'])\n"
            "print(type(out).__name__, out.last_hidden_state.dtype, "
            "(out.last_hidden_state - io['want']).abs().max().item())\n")
    result = _run(["-c", code])
    assert result.returncode == 0, result.stderr[-2000:]
    kind, dtype, diff = result.stdout.split()[-3:]
    assert (kind, dtype) == ("Seq2SeqModelOutput", "torch.float32")
    assert float(diff) == 0.0


class _TensorConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x, ids):
        offsets = torch.tensor([1, 2])  # not a parameter or buffer: export lifts it as a constant
        return self.linear(x), ids + offsets.sum()


def test_model_with_a_tensor_constant_saves_and_keeps_its_annotations(tmp_path):
    torch.manual_seed(0)
    fast = rewriter.convert(_TensorConstant().eval(), (torch.randn(2, 8), torch.ones(2, 3, dtype=torch.long)),
                            precision="fp16")
    rewriter.save(fast, tmp_path / "m.pt2")
    loaded = rewriter.load(tmp_path / "m.pt2")
    x, ids = torch.randn(3, 8), torch.ones(3, 5, dtype=torch.long)
    for want, got in zip(fast(x, ids), loaded(x, ids)):
        assert torch.equal(want, got)
    (clone,) = [n for n in loaded.graph.nodes if n.target is torch.ops.aten.clone.default]
    assert clone.meta[meta.OP_CLASS]["op"] == "clone" and clone.meta[meta.ORIGIN]["name"] == "clone"


def test_cli_diff_and_onnx_export_of_a_saved_program(distilbert, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    make = _tokens(128)
    example = make(4, 16)
    dims = {"input_ids": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},
            "attention_mask": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}}
    torch.export.save(torch.export.export(distilbert, (), example, dynamic_shapes=dims, strict=False),
                      tmp_path / "fp32.pt2")
    result = _run(["-m", "rewriter", "convert", str(tmp_path / "fp32.pt2"), "--precision", "fp16",
                   "-o", str(tmp_path / "fp16.pt2")])
    assert result.returncode == 0, result.stderr[-2000:]
    result = _run(["-m", "rewriter", "diff", str(tmp_path / "fp32.pt2"), str(tmp_path / "fp16.pt2")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "float16" in result.stdout or "fp16" in result.stdout, result.stdout[:2000]
    result = _run(["-m", "rewriter", "convert", str(tmp_path / "fp32.pt2"), "--precision", "fp16",
                   "-o", str(tmp_path / "m.onnx"), "--target", "ort-cpu"])
    assert result.returncode == 0, result.stderr[-2000:]
    converted = rewriter.load(tmp_path / "fp16.pt2")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for batch, seq in ((4, 16), (3, 24)):
        inputs = make(batch, seq)
        want = _call(converted, inputs)
        want = want[0] if isinstance(want, (tuple, list)) else want.last_hidden_state
        got = session.run(None, {n: inputs[n].numpy() for n in names})[0]
        assert got.shape == tuple(want.shape)
        assert rel_l2(want, torch.from_numpy(got).float()) < FP16_ONNX_TOL


# ------------------------------------------------------------------ hostile inputs


@pytest.fixture(scope="module")
def fast_distilbert(distilbert):
    return rewriter.convert(distilbert, (), _tokens(128)(2, 8), precision="bf16")


@pytest.fixture(scope="module")
def fast_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    return rewriter.convert(model, (torch.randn(2, 3, 16, 16),), precision="fp16")


PASS_NONE = object()  # the input passed as None (None in a change leaves it out of the call)


def _text_call(fast, **change):
    inputs = dict(_tokens(128)(2, 8), **change)
    return lambda: fast(**{k: (None if v is PASS_NONE else v) for k, v in inputs.items() if v is not None})


HOSTILE_TEXT = {
    "float token ids": ({"input_ids": torch.rand(2, 8) * 100}, ["'input_ids'", "float32", "int64"]),
    "bool mask": ({"attention_mask": torch.ones(2, 8, dtype=torch.bool)}, ["'attention_mask'", "bool", "int64"]),
    "fp16 mask": ({"attention_mask": torch.ones(2, 8, dtype=torch.float16)}, ["'attention_mask'", "float16"]),
    "rank 3 ids": ({"input_ids": torch.zeros(1, 2, 8, dtype=torch.long)}, ["'input_ids'", "3 dimensions"]),
    "missing mask": ({"attention_mask": None}, ["'attention_mask'", "missing"]),
    "mask passed as None": ({"attention_mask": PASS_NONE}, ["'attention_mask'", "is None", "tensor"]),
    "unknown input": ({"token_type_ids": torch.zeros(2, 8, dtype=torch.long)}, ["'token_type_ids'"]),
}


@pytest.mark.parametrize("case", list(HOSTILE_TEXT))
def test_hostile_call_names_the_input(case, fast_distilbert):
    change, words = HOSTILE_TEXT[case]
    with pytest.raises(InputError) as info:
        _text_call(fast_distilbert, **change)()
    text = str(info.value)
    assert "\n" not in text.strip() and all(w in text for w in words), text


@pytest.mark.parametrize("value, words", [
    (torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8), ["'input'", "uint8", "float32"]),
    (torch.randn(3, 16, 16), ["'input'", "3 dimensions"]),
    (torch.randn(2, 1, 16, 16), ["'input'", "dimension 1", "static at 3"]),
], ids=["uint8 image", "rank 3 image", "one channel"])
def test_hostile_image_names_the_input(value, words, fast_cnn):
    with pytest.raises(InputError) as info:
        fast_cnn(value)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_other_integer_and_float_widths_still_run(fast_distilbert, fast_cnn):
    """The dtype check refuses another kind of dtype, not another width the graph's ops accept."""
    inputs = _tokens(128)(2, 8)
    want = fast_distilbert(**inputs).last_hidden_state
    got = fast_distilbert(input_ids=inputs["input_ids"].int(), attention_mask=inputs["attention_mask"])
    assert torch.equal(want, got.last_hidden_state)
    assert fast_cnn(torch.randn(2, 3, 16, 16).half()).shape == (2, 4)


def _hostile_files(tmp_path: Path, good: Path) -> dict[str, Path]:
    data = good.read_bytes()
    files = {"truncated.pt2": data[: len(data) // 2], "empty.pt2": b"", "random.pt2": os.urandom(4096),
             "random.pt": os.urandom(4096)}
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
    return {name: tmp_path / name for name in files}


class _Planted:
    """Unpickling this touches a file: the marker that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


COMMANDS = {  # one CLI command for three of the files (each is a fresh process)
    "truncated.pt2": lambda good, bad, out: ["diff", str(good), str(bad)],
    "random.pt": lambda good, bad, out: ["convert", str(bad), "--precision", "bf16", "-o", str(out)],
    "planted.pt2": lambda good, bad, out: ["bench", str(bad)],
}


def test_damaged_and_planted_files_are_refused_by_load_and_the_cli(fast_cnn, tmp_path):
    good = tmp_path / "good.pt2"
    rewriter.save(fast_cnn, good)
    files = _hostile_files(tmp_path, good)
    marker = tmp_path / "code-ran"
    torch.save({"model": _Planted(marker)}, tmp_path / "planted.pt2")  # a torch.save zip named .pt2
    files["planted.pt2"] = tmp_path / "planted.pt2"
    out = tmp_path / "out.pt2"
    for name, path in files.items():
        with pytest.raises(InputError) as info:
            rewriter.load(path)
        assert str(path) in str(info.value), (name, str(info.value))
        if name not in COMMANDS:
            continue
        result = _run(["-m", "rewriter", *COMMANDS[name](good, path, out)])
        assert result.returncode == 2, (name, result.returncode, result.stderr[-1500:])
        assert "Traceback" not in result.stderr and name in result.stderr, (name, result.stderr)
    assert not out.exists() and not marker.exists()
