"""MLP: a small residual multilayer perceptron.

Architecture: ``Linear(in, hidden)`` stem, then ``depth`` residual blocks of
``LayerNorm(h + Linear(GELU(Linear(h))))``, then a ``Linear(hidden, out)`` head.

Contract: ``make_mlp(size, seed) -> (model, (x,))`` with ``x`` float32 of shape
``(batch, in_features)``; the model returns float32 logits ``(batch, out_features)``.
The model is in eval mode, has no dropout, and both parameters and inputs are
fully determined by ``seed``.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MLPConfig:
    batch: int
    in_features: int
    hidden: int
    expansion: int
    depth: int
    out_features: int


SIZES: dict[str, MLPConfig] = {
    "small": MLPConfig(batch=4, in_features=32, hidden=64, expansion=2, depth=3, out_features=10),
    "bench": MLPConfig(batch=64, in_features=1024, hidden=1024, expansion=4, depth=4, out_features=1000),
}


class MLPBlock(nn.Module):
    def __init__(self, dim: int, expansion: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * expansion)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim * expansion, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(self.act(self.fc1(x))))


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.stem = nn.Linear(cfg.in_features, cfg.hidden)
        self.blocks = nn.Sequential(*[MLPBlock(cfg.hidden, cfg.expansion) for _ in range(cfg.depth)])
        self.head = nn.Linear(cfg.hidden, cfg.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def make_mlp(size: str = "small", seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build the MLP and a deterministic example input for ``size`` ("small" or "bench")."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} for mlp; valid sizes: {sorted(SIZES)}")
    cfg = SIZES[size]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MLP(cfg)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg.batch, cfg.in_features, generator=gen)
    return model.eval(), (x,)


make_model = make_mlp
