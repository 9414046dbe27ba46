"""End to end on real architectures: torchvision CNNs and ViT, Hugging Face BERT, GPT-2, T5, Llama (tiny
configs, random weights) and the trained all-MiniLM-L6-v2.

For every model and precision, against the fp32 model on the same inputs:
  * error (largest relative L2 over the float outputs) within a per-precision ceiling;
  * error no worse than torch.autocast's on the same inputs: the converted model should compute the
    same ops in the same dtypes, with weights stored 16-bit once instead of cast on every call. Where
    a pass deliberately computes differently (batch norm folded into the convolution) the errors are
    independent roundings, so they are compared as the mean per-sample relative L2 over a batch of
    16: the relative L2 of a whole batch is dominated by its one or two worst samples and moves by
    +-15% from one draw of inputs to the next on MobileNetV3, the mean per sample by a third of that;
  * the same output type (Hugging Face ModelOutput classes included) and output dtypes;
  * no cast chains and no weight cast left in the graph (weights are stored in their consumer's dtype);
  * converted at batch 4, it runs at batch 1 and 7 within the same ceiling.
One test per model and precision so that each conversion happens once, on one xdist worker.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rewriter
from rewriter import measure
from fixtures_models import MINILM_SENTENCES, load_minilm, sentence_embeddings
from helpers import rel_l2
from rewriter.passes.graph_utils import is_cast

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Relative L2 ceilings vs fp32, per precision. bf16 keeps 8 bits of mantissa, fp16 11: random-weight
# CNNs (MobileNetV3 with its squeeze-excite gates, BN statistics fitted to the data) amplify rounding
# most; autocast measures about 4.5e-2 there in bf16 and 7e-3 in fp16 (transformers: 1e-2, 1e-3).
FP16_MAX_REL_L2 = 1e-2
BF16_MAX_REL_L2 = 6e-2
MAX_REL_L2 = {"fp16": FP16_MAX_REL_L2, "bf16": BF16_MAX_REL_L2}
# Ours may exceed autocast's error by this factor plus an absolute epsilon (differences at fp32 noise).
AUTOCAST_SLACK = 1.05
AUTOCAST_EPS = 1e-6
# Sentence embeddings of the trained MiniLM: cosine to the fp32 embedding.
MINILM_MIN_COSINE = 0.9999

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
EXAMPLE_BATCH = 4
OTHER_BATCHES = (1, 7)
EVAL_BATCH = 16  # for the comparison with autocast


@dataclasses.dataclass
class Spec:
    make_model: Callable[[], nn.Module]
    make_inputs: Callable[[int, int], tuple[tuple, dict]]  # (batch, seed) -> (args, kwargs)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(size: int):
    def make(batch, seed):
        return (torch.randn(batch, 3, size, size, generator=_seeded(seed)),), {}
    return make


def _fit_batch_norm(model: nn.Module, size: int) -> nn.Module:
    """Give BN statistics and affine parameters realistic values: with random-init statistics
    (mean 0, var 1) MobileNetV3's activations shrink to 1e-8 and underflow fp16 in any scheme."""
    gen = _seeded(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, size, size, generator=gen))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return model.eval()


def _resnet18():
    import torchvision
    torch.manual_seed(0)
    return _fit_batch_norm(torchvision.models.resnet18(), 64)


def _mobilenet_v3_small():
    import torchvision
    torch.manual_seed(0)
    return _fit_batch_norm(torchvision.models.mobilenet_v3_small(), 64)


def _vit():
    from torchvision.models import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                              mlp_dim=64)
    model.heads = nn.Identity()  # the head is zero-initialised: compare the class-token features
    return model.eval()


def _tokens(vocab: int, seq: int, *, mask: bool = False, decoder: int = 0):
    def make(batch, seed):
        gen = _seeded(seed)
        kwargs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=gen)}
        if mask:
            attention = torch.ones(batch, seq, dtype=torch.long)
            attention[0, seq // 2:] = 0  # one padded sequence
            kwargs["attention_mask"] = attention
        if decoder:
            kwargs["decoder_input_ids"] = torch.randint(0, vocab, (batch, decoder), generator=gen)
        return (), kwargs
    return make


def _bert():
    import transformers
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def _gpt2():
    import transformers
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                     use_cache=False, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()  # LM head tied to the token embedding


def _t5():
    import transformers
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=128, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                   num_heads=2, use_cache=False, decoder_start_token_id=0)
    return transformers.T5Model(config).eval()


def _llama():
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=64, use_cache=False, bos_token_id=0,
                                      eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


SPECS = {
    "resnet18": Spec(_resnet18, _images(64)),
    "mobilenet_v3_small": Spec(_mobilenet_v3_small, _images(64)),
    "vit": Spec(_vit, _images(32)),
    "bert": Spec(_bert, _tokens(128, 16, mask=True)),
    "gpt2": Spec(_gpt2, _tokens(128, 16)),
    "t5": Spec(_t5, _tokens(128, 16, mask=True, decoder=8)),
    "llama": Spec(_llama, _tokens(128, 16)),
}


# ------------------------------------------------------------------ measuring


def max_rel_l2(reference: Any, candidate: Any) -> float:
    """The largest relative L2 error (helpers.rel_l2, reference first) over the float tensors of two
    outputs of the same structure; the candidate must be finite."""
    want, got = list(measure.float_leaves(reference)), list(measure.float_leaves(candidate))
    assert want and [p for p, _ in got] == [p for p, _ in want], ([p for p, _ in got], [p for p, _ in want])
    for path, g in got:
        assert torch.isfinite(g).all(), f"non-finite output at {path}"
    return max(rel_l2(w, g) for (_, w), (_, g) in zip(want, got))


def per_sample_rel_l2(reference: Any, candidate: Any) -> float:
    """Mean over the samples (dimension 0) of their relative L2 error; the largest over the outputs."""
    errors = []
    leaves = zip(measure.float_leaves(candidate), measure.float_leaves(reference), strict=True)
    for (_, g), (_, w) in leaves:
        g, w = g.double().flatten(1), w.double().flatten(1)
        errors.append(((g - w).norm(dim=1) / w.norm(dim=1).clamp_min(1e-30)).mean().item())
    return max(errors)


def _run(model, inputs, dtype=None):
    args, kwargs = inputs
    if dtype is None:
        with torch.no_grad():
            return model(*args, **kwargs)
    # Autograd stays on, as when torch.export traced the model: under no_grad nn.MultiheadAttention
    # (ViT) takes a fused fast path that rounds differently from the ops the graph records.
    with torch.autocast("cpu", dtype=dtype):
        output = model(*args, **kwargs)
    return torch.utils._pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, output)


def _check_structure(gm: torch.fx.GraphModule, model: nn.Module, low: torch.dtype) -> None:
    chains = [n.format_node() for n in gm.graph.nodes if is_cast(n) and is_cast(n.args[0])]
    assert chains == [], f"cast chains left: {chains}"
    weight_casts = [n.format_node() for n in gm.graph.nodes if is_cast(n) and n.args[0].op == "get_attr"]
    assert weight_casts == [], f"weights cast on every call: {weight_casts}"
    stored = {p.dtype for p in gm.parameters()} | {b.dtype for b in gm.buffers() if b.is_floating_point()}
    assert low in stored
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the input model is untouched


def _check_model(name: str, spec: Spec, model: nn.Module, precision: str) -> dict:
    low = DTYPES[precision]
    gm = rewriter.convert(model, *spec.make_inputs(EXAMPLE_BATCH, 0), precision=precision)
    assert gm.meta["rewriter"]["dynamic_batch"] is True, gm.meta["rewriter"]["notes"]
    _check_structure(gm, model, low)
    report = {}
    for batch in (EXAMPLE_BATCH, *OTHER_BATCHES):
        inputs = spec.make_inputs(batch, 10 + batch)  # not the example inputs
        reference = _run(model, inputs)
        ours = _run(gm, inputs)
        assert type(ours) is type(reference)
        got = [t for _, t in measure.float_leaves(ours)]
        want = [t for _, t in measure.float_leaves(reference)]
        assert [t.dtype for t in got] == [t.dtype for t in want]
        assert [t.shape[0] for t in got] == [t.shape[0] for t in want]
        error = max_rel_l2(reference, ours)
        assert error <= MAX_REL_L2[precision], f"{name} {precision} batch {batch}: {error:.3e}"
        report[batch] = error
    inputs = spec.make_inputs(EVAL_BATCH, 99)
    reference = _run(model, inputs)
    ours = per_sample_rel_l2(reference, _run(gm, inputs))
    autocast = per_sample_rel_l2(reference, _run(model, inputs, low))
    assert ours <= autocast * AUTOCAST_SLACK + AUTOCAST_EPS, (
        f"{name} {precision}: mean per-sample error {ours:.3e}, autocast {autocast:.3e}")
    return report


@pytest.fixture(scope="module")
def models():
    """One fp32 model per architecture, built on first use in this worker."""
    cache: dict[str, nn.Module] = {}

    def get(name):
        if name not in cache:
            cache[name] = SPECS[name].make_model()
        return cache[name]
    return get


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("name", list(SPECS))
def test_model_matches_fp32_at_least_as_well_as_autocast(name, precision, models):
    model = models(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _check_model(name, SPECS[name], model, precision)
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)


# ------------------------------------------------------------------ the trained MiniLM

SENTENCES = MINILM_SENTENCES
_sentence_embeddings = sentence_embeddings


@pytest.fixture(scope="module")
def minilm():
    model, encode = load_minilm()
    return model, lambda sentences: ((), encode(sentences))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_minilm_sentence_embeddings(precision, minilm):
    model, encode = minilm
    low = DTYPES[precision]
    gm = rewriter.convert(model, *encode(SENTENCES[:EXAMPLE_BATCH]), precision=precision)
    _check_structure(gm, model, low)
    for sentences in (SENTENCES[:EXAMPLE_BATCH], SENTENCES[:1], SENTENCES):  # batch 4, 1, 7
        inputs = encode(sentences)
        mask = inputs[1]["attention_mask"]
        reference = _run(model, inputs)
        ours = _run(gm, inputs)
        assert type(ours) is type(reference)
        want = _sentence_embeddings(reference, mask)
        got = _sentence_embeddings(ours, mask)
        cosine = (want * got).sum(-1)
        assert cosine.min().item() >= MINILM_MIN_COSINE, cosine
        error = max_rel_l2(reference, ours)
        assert error <= MAX_REL_L2[precision]
        if len(sentences) == EXAMPLE_BATCH:
            autocast = _run(model, inputs, low)
            assert error <= max_rel_l2(reference, autocast) * AUTOCAST_SLACK + AUTOCAST_EPS
            autocast_cosine = (want * _sentence_embeddings(autocast, mask)).sum(-1)
            assert (1 - cosine).max() <= (1 - autocast_cosine).max() * AUTOCAST_SLACK + AUTOCAST_EPS
    # the embeddings still rank sentences like the fp32 model: the closest pair is the same
    inputs = encode(SENTENCES)
    want = _sentence_embeddings(_run(model, inputs), inputs[1]["attention_mask"])
    got = _sentence_embeddings(_run(gm, inputs), inputs[1]["attention_mask"])
    similarity_want, similarity_got = want @ want.T, got @ got.T
    similarity_want.fill_diagonal_(-1)
    similarity_got.fill_diagonal_(-1)
    assert similarity_got.argmax() == similarity_want.argmax()
