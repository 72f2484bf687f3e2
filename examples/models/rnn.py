"""RNN: a stacked LSTM sequence classifier with a hand-written, unrolled cell.

Architecture: ``n_layers`` LSTM layers (batch-first, zero initial state), then
a linear classifier on the last time step's hidden state. Each layer computes
the input projection for all steps at once and then unrolls the recurrence
in a Python loop over the (static) sequence length, using the same gate order
(i, f, g, o), parameterisation and init as ``torch.nn.LSTM``; the weights
``ih``/``hh`` of layer ``k`` map to ``nn.LSTM``'s ``weight_ih_l{k}``,
``bias_ih_l{k}``, ``weight_hh_l{k}``, ``bias_hh_l{k}``.

Why hand-written: ``nn.LSTM`` exports, but Dynamo refuses to trace RNN modules
(``torch.compile(..., fullgraph=True)`` raises "Dynamo does not support RNN,
GRU, or LSTM"; without fullgraph it graph-breaks and runs them eagerly).

Contract: ``make_rnn(size, seed) -> (model, (x,))`` with ``x`` float32
``(batch, seq, input_size)``; returns logits ``(batch, num_classes)``.
"small": 2x8x16, hidden 32, 2 layers. "bench": 8x128x256, hidden 512,
2 layers. Returned in eval mode; no dropout; seed-deterministic.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RNNConfig:
    batch: int
    seq: int
    input_size: int
    hidden: int
    n_layers: int
    num_classes: int


SIZES: dict[str, RNNConfig] = {
    "small": RNNConfig(batch=2, seq=8, input_size=16, hidden=32, n_layers=2, num_classes=10),
    "bench": RNNConfig(batch=8, seq=128, input_size=256, hidden=512, n_layers=2, num_classes=10),
}


class LSTMLayer(nn.Module):
    def __init__(self, input_size: int, hidden: int) -> None:
        super().__init__()
        self.ih = nn.Linear(input_size, 4 * hidden)
        self.hh = nn.Linear(hidden, 4 * hidden)
        bound = 1.0 / math.sqrt(hidden)
        for p in self.parameters():  # same init as nn.LSTM
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        gates_x = self.ih(x)  # (b, t, 4h), all steps at once
        h = x.new_zeros(b, self.hh.in_features)
        c = x.new_zeros(b, self.hh.in_features)
        outputs = []
        for step in range(t):  # static trip count: the sequence length is a fixed shape
            i, f, g, o = (gates_x[:, step] + self.hh(h)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs, dim=1)


class LSTMClassifier(nn.Module):
    def __init__(self, cfg: RNNConfig) -> None:
        super().__init__()
        sizes = [cfg.input_size] + [cfg.hidden] * (cfg.n_layers - 1)
        self.layers = nn.Sequential(*[LSTMLayer(s, cfg.hidden) for s in sizes])
        self.head = nn.Linear(cfg.hidden, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x)[:, -1])


def make_rnn(size: str = "small", seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build the LSTM classifier and a deterministic example input for ``size`` ("small" or "bench")."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} for rnn; valid sizes: {sorted(SIZES)}")
    cfg = SIZES[size]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LSTMClassifier(cfg)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg.batch, cfg.seq, cfg.input_size, generator=gen)
    return model.eval(), (x,)


make_model = make_rnn
