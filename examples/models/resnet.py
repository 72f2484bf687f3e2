"""ResNet-18: a CNN of BasicBlock residual stages [2, 2, 2, 2] with BatchNorm.

Architecture follows torchvision's ``resnet18`` (7x7/2 conv stem + 3x3/2 max
pool, four stages of two basic blocks with 1x1 projection shortcuts on
downsampling, global average pool, linear classifier), parameterised by base
width. BatchNorm affine parameters and running statistics are randomised
(deterministically) so that eval-mode BatchNorm is not an identity.

Contract: ``make_resnet18(size, seed) -> (model, (images,))`` with ``images``
float32 ``(batch, 3, H, W)``; the model returns logits ``(batch, num_classes)``.
"small": base width 8, 2x3x32x32, 10 classes. "bench": base width 64,
1x3x224x224, 1000 classes. Returned in eval mode; no dropout; seed-deterministic.
"""

from dataclasses import dataclass

import torch
from torch import nn

from ._common import randomize_batchnorm


@dataclass(frozen=True)
class ResNetConfig:
    batch: int
    image_size: int
    base_width: int
    num_classes: int


SIZES: dict[str, ResNetConfig] = {
    "small": ResNetConfig(batch=2, image_size=32, base_width=8, num_classes=10),
    "bench": ResNetConfig(batch=1, image_size=224, base_width=64, num_classes=1000),
}


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Sequential:
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_ch, out_ch, 3, stride)
        self.conv2 = conv_bn(out_ch, out_ch, 3, 1)
        self.relu = nn.ReLU()
        needs_proj = stride != 1 or in_ch != out_ch
        self.shortcut = conv_bn(in_ch, out_ch, 1, stride) if needs_proj else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, base_width: int, num_classes: int) -> None:
        super().__init__()
        w = base_width
        self.stem = nn.Sequential(conv_bn(3, w, 7, 2), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))
        widths = [w, 2 * w, 4 * w, 8 * w]
        stages: list[nn.Module] = []
        in_ch = w
        for i, out_ch in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(in_ch, out_ch, stride), BasicBlock(out_ch, out_ch, 1)))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))




def make_resnet18(size: str = "small", seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build ResNet-18 and a deterministic example image batch for ``size`` ("small" or "bench")."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} for resnet18; valid sizes: {sorted(SIZES)}")
    cfg = SIZES[size]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNet18(cfg.base_width, cfg.num_classes)
        randomize_batchnorm(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, generator=gen)
    return model.eval(), (x,)


make_model = make_resnet18
