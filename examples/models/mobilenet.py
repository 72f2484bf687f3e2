"""MobileNetV2: inverted residual CNN with depthwise convs, ReLU6 and BatchNorm.

Architecture follows torchvision's ``mobilenet_v2`` (3x3/2 stem, the standard
17 inverted-residual blocks ``(t, c, n, s)`` with expansion factor ``t``,
depthwise 3x3 conv, linear 1x1 projection and identity residuals where shapes
allow, 1x1 head conv, global average pool, linear classifier), scaled by
``width_mult``. BatchNorm parameters/statistics are randomised deterministically.

Contract: ``make_mobilenetv2(size, seed) -> (model, (images,))`` with ``images``
float32 ``(batch, 3, H, W)``; returns logits ``(batch, num_classes)``.
"small": width 0.25, 2x3x32x32, 10 classes. "bench": width 1.0, 1x3x224x224,
1000 classes. Returned in eval mode; no dropout; seed-deterministic.
"""

from dataclasses import dataclass

import torch
from torch import nn

from ._common import randomize_batchnorm


@dataclass(frozen=True)
class MobileNetConfig:
    batch: int
    image_size: int
    width_mult: float
    num_classes: int


SIZES: dict[str, MobileNetConfig] = {
    "small": MobileNetConfig(batch=2, image_size=32, width_mult=0.25, num_classes=10),
    "bench": MobileNetConfig(batch=1, image_size=224, width_mult=1.0, num_classes=1000),
}

# (expansion t, output channels c, repeats n, first stride s)
BLOCK_SPECS: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def make_divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn_act(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn_act(in_ch, hidden, 1))
        layers.append(conv_bn_act(hidden, hidden, 3, stride=stride, groups=hidden))  # depthwise
        layers.append(conv_bn_act(hidden, out_ch, 1, act=False))  # linear bottleneck
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch  # static, decided at construction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    def __init__(self, width_mult: float, num_classes: int) -> None:
        super().__init__()
        in_ch = make_divisible(32 * width_mult)
        last_ch = make_divisible(1280 * width_mult)
        layers: list[nn.Module] = [conv_bn_act(3, in_ch, 3, stride=2)]
        for t, c, n, s in BLOCK_SPECS:
            out_ch = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        layers.append(conv_bn_act(in_ch, last_ch, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))




def make_mobilenetv2(size: str = "small", seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build MobileNetV2 and a deterministic example image batch for ``size`` ("small" or "bench")."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} for mobilenetv2; valid sizes: {sorted(SIZES)}")
    cfg = SIZES[size]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MobileNetV2(cfg.width_mult, cfg.num_classes)
        randomize_batchnorm(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, generator=gen)
    return model.eval(), (x,)


make_model = make_mobilenetv2
