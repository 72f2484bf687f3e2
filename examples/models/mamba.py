"""Mamba: a stack of selective state-space (Mamba-1 style) residual blocks.

Each block is ``x + Mixer(RMSNorm(x))`` where the mixer does: in-projection to
``2 * d_inner`` (split into ``u`` and gate ``z``); depthwise causal
``Conv1d`` over time on ``u`` (left-padded by slicing off the tail) + SiLU;
input-dependent ``delta`` (low-rank projection + softplus), ``B`` and ``C``;
discretisation ``dA = exp(delta * A)``, ``dBu = delta * B * u`` with
``A = -exp(A_log)``; a selective scan ``h_t = dA_t * h_{t-1} + dBu_t``,
``y_t = <h_t, C_t> + D * u_t`` written as a sequential Python loop over the
static sequence length; gating ``y * SiLU(z)``; out-projection. RMSNorm is
hand-written and also applied after the last block.

Contract: ``make_mamba(size, seed) -> (model, (x,))`` with ``x`` float32
``(batch, seq, d_model)``; returns float32 ``(batch, seq, d_model)``.
"small": 2x8x16, d_state 8, 2 layers. "bench": 1x128x512, d_state 16,
4 layers. Both use expand 2 and conv width 4. Returned in eval mode; no
dropout; seed-deterministic.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MambaConfig:
    batch: int
    seq: int
    d_model: int
    d_state: int
    n_layers: int
    expand: int = 2
    d_conv: int = 4


SIZES: dict[str, MambaConfig] = {
    "small": MambaConfig(batch=2, seq=8, d_model=16, d_state=8, n_layers=2),
    "bench": MambaConfig(batch=1, seq=128, d_model=512, d_state=16, n_layers=4),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


class MambaMixer(nn.Module):
    def __init__(self, d_model: int, d_state: int, expand: int, d_conv: int) -> None:
        super().__init__()
        d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        # S4D-real init for A, unit skip D, and dt bias so softplus(bias) is log-uniform in [1e-3, 1e-1].
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(d_inner))
        dt = torch.exp(torch.rand(d_inner) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.shape[1]
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (b, l, d_inner) each
        u = self.conv1d(u.transpose(1, 2))[..., :seq].transpose(1, 2)  # causal depthwise conv
        u = F.silu(u)
        y = self.selective_scan(u)
        return self.out_proj(y * F.silu(z))

    def selective_scan(self, u: torch.Tensor) -> torch.Tensor:
        b, seq, d_inner = u.shape
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))  # (b, l, d_inner)
        A = -torch.exp(self.A_log)  # (d_inner, n)
        dA = torch.exp(delta.unsqueeze(-1) * A)  # (b, l, d_inner, n)
        dBu = delta.unsqueeze(-1) * B.unsqueeze(2) * u.unsqueeze(-1)  # (b, l, d_inner, n)
        h = u.new_zeros(b, d_inner, self.d_state)
        ys = []
        for t in range(seq):  # static trip count: the sequence length is a fixed shape
            h = dA[:, t] * h + dBu[:, t]
            ys.append((h * C[:, t].unsqueeze(1)).sum(dim=-1))  # (b, d_inner)
        return torch.stack(ys, dim=1) + u * self.D


class MambaBlock(nn.Module):
    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model)
        self.mixer = MambaMixer(cfg.d_model, cfg.d_state, cfg.expand, cfg.d_conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))


class Mamba(nn.Module):
    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[MambaBlock(cfg) for _ in range(cfg.n_layers)])
        self.norm_f = RMSNorm(cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_f(self.blocks(x))


def make_mamba(size: str = "small", seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build the Mamba stack and a deterministic example input for ``size`` ("small" or "bench")."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} for mamba; valid sizes: {sorted(SIZES)}")
    cfg = SIZES[size]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Mamba(cfg)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg.batch, cfg.seq, cfg.d_model, generator=gen)
    return model.eval(), (x,)


make_model = make_mamba
