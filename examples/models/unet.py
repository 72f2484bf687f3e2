"""UNet: an encoder-decoder segmentation CNN with concatenated skip connections.

Architecture: ``depth`` down levels of DoubleConv (2x [3x3 conv, BatchNorm,
ReLU]) followed by 2x2 max pooling, a DoubleConv bottleneck, then ``depth``
up levels of ``ConvTranspose2d(kernel 2, stride 2)`` upsampling,
``torch.cat([skip, up], dim=1)`` and DoubleConv, and a 1x1 conv head producing
per-pixel class logits. BatchNorm parameters/statistics are randomised
deterministically so eval-mode BatchNorm is not an identity.

Contract: ``make_unet(size, seed) -> (model, (images,))`` with ``images``
float32 ``(batch, 3, H, W)`` (H, W divisible by ``2**depth``); returns logits
``(batch, num_classes, H, W)``. "small": 2x3x32x32, base width 8, depth 3.
"bench": 1x3x256x256, base width 64, depth 4. Both have 2 classes. Returned
in eval mode; no dropout; seed-deterministic.
"""

from dataclasses import dataclass

import torch
from torch import nn

from ._common import randomize_batchnorm


@dataclass(frozen=True)
class UNetConfig:
    batch: int
    image_size: int
    base_width: int
    depth: int
    in_channels: int = 3
    num_classes: int = 2


SIZES: dict[str, UNetConfig] = {
    "small": UNetConfig(batch=2, image_size=32, base_width=8, depth=3),
    "bench": UNetConfig(batch=1, image_size=256, base_width=64, depth=4),
}


class DoubleConv(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(),
        )


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        widths = [cfg.base_width * 2**i for i in range(cfg.depth)]
        self.downs = nn.ModuleList()
        in_ch = cfg.in_channels
        for w in widths:
            self.downs.append(DoubleConv(in_ch, w))
            in_ch = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(in_ch, 2 * in_ch)
        in_ch *= 2
        self.ups = nn.ModuleList()
        self.up_convs = nn.ModuleList()
        for w in reversed(widths):
            self.ups.append(nn.ConvTranspose2d(in_ch, w, 2, stride=2))
            self.up_convs.append(DoubleConv(2 * w, w))
            in_ch = w
        self.head = nn.Conv2d(in_ch, cfg.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, conv, skip in zip(self.ups, self.up_convs, reversed(skips)):
            x = conv(torch.cat([skip, up(x)], dim=1))
        return self.head(x)




def make_unet(size: str = "small", seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build the UNet and a deterministic example image batch for ``size`` ("small" or "bench")."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} for unet; valid sizes: {sorted(SIZES)}")
    cfg = SIZES[size]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNet(cfg)
        randomize_batchnorm(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg.batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)
    return model.eval(), (x,)


make_model = make_unet
