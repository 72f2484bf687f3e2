"""Transformer encoder classifier over float token features.

Architecture: ``num_layers`` pre-LayerNorm encoder blocks, each
``x + Attn(LN(x))`` (multi-head self-attention via
``torch.nn.functional.scaled_dot_product_attention``, no mask) followed by
``x + MLP(LN(x))`` (Linear-GELU-Linear), then a final LayerNorm, mean pooling
over the sequence and a linear classifier.

Contract: ``make_transformer(size, seed) -> (model, (x,))`` with ``x`` float32
``(batch, seq, d_model)``; returns logits ``(batch, num_classes)``.
"small": 2x16x32, 2 layers, 4 heads. "bench": 1x128x512, 6 layers, 8 heads,
MLP 2048. Returned in eval mode; no dropout; seed-deterministic.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TransformerConfig:
    batch: int
    seq: int
    d_model: int
    n_heads: int
    d_mlp: int
    n_layers: int
    num_classes: int


SIZES: dict[str, TransformerConfig] = {
    "small": TransformerConfig(batch=2, seq=16, d_model=32, n_heads=4, d_mlp=64, n_layers=2, num_classes=10),
    "bench": TransformerConfig(batch=1, seq=128, d_model=512, n_heads=8, d_mlp=2048, n_layers=6, num_classes=1000),
}


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each (b, heads, s, head_dim)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class EncoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_mlp: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp), nn.GELU(), nn.Linear(d_mlp, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerClassifier(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *[EncoderBlock(cfg.d_model, cfg.n_heads, cfg.d_mlp) for _ in range(cfg.n_layers)]
        )
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_f(self.blocks(x))
        return self.head(x.mean(dim=1))


def make_transformer(size: str = "small", seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build the encoder classifier and a deterministic example input for ``size`` ("small" or "bench")."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} for transformer; valid sizes: {sorted(SIZES)}")
    cfg = SIZES[size]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TransformerClassifier(cfg)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg.batch, cfg.seq, cfg.d_model, generator=gen)
    return model.eval(), (x,)


make_model = make_transformer
