"""Digits: a small CNN trained on scikit-learn's 8x8 handwritten digits, and a tiny GPT trained on Python's
own standard-library sources - real data that ships with installed packages, for quantization accuracy.

Contract:
- ``load_digits_split(seed=0) -> DigitsData``: the 1797 images of ``sklearn.datasets.load_digits`` as
  float32 ``[N, 1, 8, 8]`` standardised with the training set's mean and std, int64 labels; a seeded
  stratified 80/20 train/test split (1437 / 360).
- ``DigitsCNN``: conv(1->16)-BN-ReLU, conv(16->32)-BN-ReLU, max-pool 2, conv(32->64)-BN-ReLU, max-pool 2,
  flatten (256), linear 256->64, ReLU, linear 64->10 (distinct ReLU modules, so PT2E quantizers can
  annotate every site).
- ``train_digits_cnn(epochs=12, seed=0) -> (model, data)``: Adam, batch 64, seeded, on one thread; a few
  seconds; returned in eval mode. Results are cached per ``(epochs, seed)`` in the process.
- ``make_digits(size="small", seed=0) -> (model, (images,))``: the trained CNN and test images ("small":
  8, "bench": 64). Not in the zoo's ``REGISTRY`` (it trains, so it is slower to build than the others).
- ``stdlib_corpus(max_bytes=1_000_000) -> torch.Tensor``: uint8 bytes of the standard library's ``.py``
  files (sorted paths, concatenated), the text corpus; ``text_windows(corpus, seq, count, gen)`` draws
  ``count`` windows of ``seq + 1`` tokens (inputs and next-token targets).
- ``train_tiny_gpt(steps=300, seed=0) -> (model, corpus)``: the zoo's GPT architecture at byte level
  (vocab 256, d_model 128, 4 heads, 2 layers, context 64), trained with AdamW on the first 90% of the
  corpus (the last 10% is held out); cached like the CNN.
"""

from __future__ import annotations

import functools
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .gpt import GPT, GPTConfig

SIZES = {"small": 8, "bench": 64}
GPT_CONFIG = GPTConfig(batch=16, seq=64, vocab=256, d_model=128, n_heads=4, n_layers=2)


@dataclass
class DigitsData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@functools.lru_cache(maxsize=4)
def load_digits_split(seed: int = 0) -> DigitsData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=d.target)
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = x_train.mean(), x_train.std()
    return DigitsData((x_train - mean) / std, y[idx_train], (x_test - mean) / std, y[idx_test])


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.pool1 = nn.MaxPool2d(2)
        self.conv3 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 2 * 2, 64)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.conv2(self.conv1(x)))
        x = self.pool2(self.conv3(x))
        return self.fc2(self.relu(self.fc1(torch.flatten(x, 1))))


class _one_thread:
    """Tiny models train faster on one thread (no barrier waits), above all on a busy machine."""

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


@functools.lru_cache(maxsize=4)
def train_digits_cnn(epochs: int = 12, seed: int = 0) -> tuple[DigitsCNN, DigitsData]:
    data = load_digits_split(seed)
    with torch.random.fork_rng(devices=[]), _one_thread():
        torch.manual_seed(seed)
        model = DigitsCNN()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        n = len(data.y_train)
        for _ in range(epochs):
            model.train()
            for idx in torch.randperm(n, generator=gen).split(64):
                opt.zero_grad()
                F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
                opt.step()
    return model.eval(), data


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=-1) == labels).float().mean())


def make_digits(size: str = "small", seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} for digits; valid sizes: {sorted(SIZES)}")
    model, data = train_digits_cnn(seed=seed)
    return model, (data.x_test[: SIZES[size]].clone(),)


make_model = make_digits


@functools.lru_cache(maxsize=2)
def stdlib_corpus(max_bytes: int = 1_000_000) -> torch.Tensor:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if total == 0:
        raise FileNotFoundError(f"no Python sources under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).clone()


def text_windows(corpus: torch.Tensor, seq: int, count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(corpus) - seq - 1, (count,), generator=gen)
    win = torch.stack([corpus[s: s + seq + 1] for s in starts.tolist()]).to(torch.int64)
    return win[:, :-1], win[:, 1:]


def split_corpus(corpus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cut = int(len(corpus) * 0.9)
    return corpus[:cut], corpus[cut:]


@functools.lru_cache(maxsize=2)
def train_tiny_gpt(steps: int = 300, seed: int = 0) -> tuple[GPT, torch.Tensor]:
    corpus = stdlib_corpus()
    train, _ = split_corpus(corpus)
    cfg = GPT_CONFIG
    with torch.random.fork_rng(devices=[]), _one_thread():
        torch.manual_seed(seed)
        model = GPT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(steps):
            x, y = text_windows(train, cfg.seq, cfg.batch * 2, gen)
            opt.zero_grad()
            F.cross_entropy(model(x).reshape(-1, cfg.vocab), y.reshape(-1)).backward()
            opt.step()
            sched.step()
    return model.eval(), corpus
