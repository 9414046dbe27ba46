"""The architectures of the CPU zoo (tools/zoo_cpu.py): tiny configs, random weights, no downloads.

Each `Spec` builds a model and its inputs at a given batch and size (sequence length for text and
audio, image side for vision), with the example size and another one the model should also accept.
Hugging Face models keep their default config apart from the sizes (decoders return their
DynamicCache, encoder-decoders their EncoderDecoderCache); timm rows are skipped with a note when
timm is not installed.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn

__all__ = ["Spec", "specs"]


@dataclasses.dataclass
class Spec:
    name: str
    family: str                  # encoder | decoder | encoder-decoder | audio | vision
    source: str                  # transformers | torchvision | timm
    make_model: Callable[[], nn.Module]
    make_inputs: Callable[[int, int], tuple[tuple, dict]]  # (batch, size) -> (args, kwargs)
    size: int                    # example sequence length / image side / audio samples
    other_size: int
    batch: int = 2
    other_batch: int = 3


_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=128)


def _hf(model_type: str, auto: str = "AutoModel", **overrides):
    def make():
        import transformers

        config = transformers.AutoConfig.for_model(model_type, **overrides)
        torch.manual_seed(0)
        return getattr(transformers, auto).from_config(config).eval()
    return make


def _ids(batch: int, length: int, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _text(padded: bool):
    def make(batch, length):
        mask = torch.ones(batch, length, dtype=torch.long)
        if padded and batch > 1:
            mask[-1, length // 2:] = 0
        return (), {"input_ids": _ids(batch, length), "attention_mask": mask}
    return make


def _seq2seq(batch, length):
    _, kwargs = _text(False)(batch, length)
    kwargs["decoder_input_ids"] = _ids(batch, max(2, length // 2), seed=1)
    return (), kwargs


def _image(key: str | None, channels: int = 3):
    def make(batch, side):
        x = torch.randn(batch, channels, side, side, generator=torch.Generator().manual_seed(side))
        return ((x,), {}) if key is None else ((), {key: x})
    return make


def _audio(batch, samples):
    return (), {"input_values": torch.randn(batch, samples, generator=torch.Generator().manual_seed(samples))}


def _whisper(batch, frames):
    features = torch.randn(batch, 16, 64, generator=torch.Generator().manual_seed(frames))
    return (), {"input_features": features, "decoder_input_ids": _ids(batch, frames, seed=2)}


def _encoders() -> list[Spec]:
    rows = [
        ("bert", dict(_SMALL)), ("roberta", dict(_SMALL)), ("xlm-roberta", dict(_SMALL)),
        ("electra", dict(_SMALL, embedding_size=32)), ("albert", dict(_SMALL, embedding_size=16)),
        ("deberta-v2", dict(_SMALL)), ("mpnet", dict(_SMALL)), ("camembert", dict(_SMALL)),
        ("distilbert", dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=128)),
        ("mobilebert", dict(_SMALL, embedding_size=16, intra_bottleneck_size=32, true_hidden_size=32,
                            num_feedforward_networks=1)),
    ]
    return [Spec(name, "encoder", "transformers", _hf(name, **cfg), _text(True), 16, 24) for name, cfg in rows]


def _decoders() -> list[Spec]:
    gqa = dict(_SMALL, num_key_value_heads=2)
    rows = [
        ("llama", gqa), ("mistral", gqa), ("qwen2", gqa), ("qwen3", dict(gqa, head_dim=8)),
        ("gemma", dict(gqa, head_dim=8)), ("gemma2", dict(gqa, head_dim=8)), ("phi3", dict(gqa, pad_token_id=0)),
        ("mixtral", dict(gqa, num_local_experts=4, num_experts_per_tok=2)),
        ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128)),
        ("gpt_neox", dict(_SMALL)), ("gptj", dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=128)),
        ("opt", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                     word_embed_proj_dim=32, vocab_size=128)),
        ("bloom", dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=128)),
        ("falcon", dict(_SMALL)),
    ]
    return [Spec(name, "decoder", "transformers", _hf(name, "AutoModelForCausalLM", **cfg), _text(False), 16, 24)
            for name, cfg in rows]


def _encoder_decoders() -> list[Spec]:
    bart_like = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=128)
    rows = [
        ("t5", dict(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab_size=128)),
        ("bart", bart_like), ("mbart", bart_like), ("pegasus", bart_like),
        ("marian", dict(bart_like, decoder_vocab_size=128, pad_token_id=0)),
    ]
    specs = [Spec(name, "encoder-decoder", "transformers", _hf(name, **cfg), _seq2seq, 16, 24)
             for name, cfg in rows]
    whisper = dict(bart_like, num_mel_bins=16, max_source_positions=32, max_target_positions=64, pad_token_id=0,
                   bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    specs.append(Spec("whisper", "audio", "transformers", _hf("whisper", **whisper), _whisper, 8, 12))
    return specs


def _audio_models() -> list[Spec]:
    conv = dict(_SMALL, conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    return [Spec(name, "audio", "transformers", _hf(name, **conv), _audio, 800, 1200)
            for name in ("wav2vec2", "hubert", "wavlm")]


def _hf_vision() -> list[Spec]:
    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               image_size=32, patch_size=8)
    rows = [
        ("vit", vit), ("deit", vit), ("dinov2", dict(vit, image_size=32, patch_size=8)),
        ("convnext", dict(hidden_sizes=[16, 32, 32, 32], depths=[1, 1, 1, 1])),
        ("resnet", dict(hidden_sizes=[16, 32, 32, 32], depths=[1, 1, 1, 1], embedding_size=16)),
        ("swin", dict(embed_dim=16, depths=[1, 1], num_heads=[2, 2], image_size=32, patch_size=4,
                      window_size=4)),
        ("mobilevit", dict(hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
                           image_size=64, patch_size=2)),
    ]
    # CNN-like models at 64 px: at 32 px their last feature map is 1x1 and export specialises on that
    sizes = {"vit": (32, 64), "deit": (32, 64), "dinov2": (32, 64)}
    return [Spec(f"hf-{name}", "vision", "transformers", _hf(name, **cfg), _image("pixel_values"),
                 *sizes.get(name, (64, 96))) for name, cfg in rows]


def _torchvision() -> list[Spec]:
    def tv(name, **kw):
        def make():
            import torchvision

            torch.manual_seed(0)
            family = torchvision.models.optical_flow if name.startswith("raft") else torchvision.models
            return getattr(family, name)(weights=None, **kw).eval()
        return make

    def tiny_vit():
        from torchvision.models.vision_transformer import VisionTransformer

        torch.manual_seed(0)
        return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                                 mlp_dim=64, num_classes=10).eval()

    def raft_inputs(batch, side):
        g = torch.Generator().manual_seed(side)
        return (torch.randn(batch, 3, side, side, generator=g), torch.randn(batch, 3, side, side, generator=g)), \
            {"num_flow_updates": 2}

    rows = [("resnet18", 64, 96), ("mobilenet_v3_small", 64, 96), ("efficientnet_b0", 64, 96),
            ("squeezenet1_1", 64, 96), ("shufflenet_v2_x0_5", 64, 96), ("regnet_y_400mf", 64, 96),
            ("convnext_tiny", 64, 96), ("swin_t", 64, 96), ("densenet121", 64, 96)]
    specs = [Spec(f"tv-{n}", "vision", "torchvision", tv(n, num_classes=10), _image(None), s, o)
             for n, s, o in rows]
    specs.append(Spec("tv-vit-tiny", "vision", "torchvision", tiny_vit, _image(None), 32, 64))
    specs.append(Spec("tv-raft_small", "vision", "torchvision", tv("raft_small"), raft_inputs, 128, 192,
                      batch=2, other_batch=1))
    return specs


def _timm() -> list[Spec]:
    def tm(name, **kw):
        def make():
            import timm

            torch.manual_seed(0)
            return timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
        return make

    rows = [("resnet18", {}, 64, 96), ("efficientnet_b0", {}, 64, 96), ("convnext_atto", {}, 64, 96),
            ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, dynamic_img_size=True), 32, 64),
            ("mobilenetv3_small_050", {}, 64, 96), ("regnetx_002", {}, 64, 96)]
    return [Spec(f"timm-{n}", "vision", "timm", tm(n, **kw), _image(None), s, o) for n, kw, s, o in rows]


def specs() -> list[Spec]:
    """Every row of the zoo, in table order."""
    return (_encoders() + _decoders() + _encoder_decoders() + _audio_models() + _hf_vision() + _torchvision()
            + _timm())
