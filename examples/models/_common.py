"""Helpers shared by the zoo's model files."""

import torch
from torch import nn


def randomize_batchnorm(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial affine params and running stats (uses the global RNG), so that
    eval-mode BatchNorm is not an identity and BN folding is really exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
