"""GPT: a GPT-2-style causal decoder-only language model.

Architecture: token embedding + learned positional embedding, ``n_layers``
pre-LayerNorm decoder blocks (causal multi-head self-attention + GELU MLP, both
residual), final LayerNorm and an LM head whose weight is tied to the token
embedding. Attention alternates between two equivalent implementations so a
compiler sees both patterns: even-indexed blocks call
``F.scaled_dot_product_attention(..., is_causal=True)``, odd-indexed blocks
spell it out by hand (``q @ k^T * scale``, ``masked_fill`` with a registered
lower-triangular mask buffer, softmax, ``@ v``). Weights use GPT-2 init
(normal, std 0.02, zero biases).

Contract: ``make_gpt(size, seed) -> (model, (tokens,))`` with ``tokens`` int64
``(batch, seq)`` in ``[0, vocab)``; returns float32 logits ``(batch, seq, vocab)``.
"small": 2x16 tokens, vocab 64, d_model 32, 2 layers, 4 heads. "bench": 1x128
tokens, vocab 50257, d_model 512, 6 layers, 8 heads. Returned in eval mode; no
dropout; seed-deterministic.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    batch: int
    seq: int
    vocab: int
    d_model: int
    n_heads: int
    n_layers: int


SIZES: dict[str, GPTConfig] = {
    "small": GPTConfig(batch=2, seq=16, vocab=64, d_model=32, n_heads=4, n_layers=2),
    "bench": GPTConfig(batch=1, seq=128, vocab=50257, d_model=512, n_heads=8, n_layers=6),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, max_seq: int, use_sdpa: bool) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.use_sdpa = use_sdpa  # static choice, fixed at construction
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        if not use_sdpa:
            mask = torch.ones(max_seq, max_seq, dtype=torch.bool).tril()
            self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        head_dim = d // self.n_heads
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each (b, heads, t, head_dim)
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))
            scores = scores.masked_fill(~self.causal_mask[:t, :t], float("-inf"))
            y = torch.softmax(scores, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class DecoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, max_seq: int, use_sdpa: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, max_seq, use_sdpa)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq, cfg.d_model)
        self.blocks = nn.Sequential(
            *[DecoderBlock(cfg.d_model, cfg.n_heads, cfg.seq, use_sdpa=i % 2 == 0) for i in range(cfg.n_layers)]
        )
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.apply(self._init_weights)
        self.lm_head.weight = self.tok_emb.weight  # weight tying

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        pos = torch.arange(t, device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(pos)
        x = self.ln_f(self.blocks(x))
        return self.lm_head(x)


def make_gpt(size: str = "small", seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build the GPT and deterministic example token ids for ``size`` ("small" or "bench")."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} for gpt; valid sizes: {sorted(SIZES)}")
    cfg = SIZES[size]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(cfg)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=gen, dtype=torch.int64)
    return model.eval(), (tokens,)


make_model = make_gpt
