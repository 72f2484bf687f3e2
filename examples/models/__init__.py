"""kiln model zoo: small, deterministic PyTorch models for testing and benchmarking.

``REGISTRY`` maps a model name to its factory. Every factory has the signature
``make_<name>(size: str = "small", seed: int = 0) -> (model, example_inputs)``:

* ``size`` is ``"small"`` (fast CPU tests) or ``"bench"`` (realistic benchmark
  shapes); any other value raises ``ValueError`` naming the valid sizes.
* ``model`` is a plain ``nn.Module`` in eval mode, without dropout or
  data-dependent Python control flow; its parameters are fully determined by
  ``seed`` (the global RNG state is left untouched).
* ``example_inputs`` is a tuple of tensors, also determined by ``seed``.

Each model module also exposes ``make_model`` (an alias of its factory), so a
file can be addressed as e.g. ``examples/models/mlp.py:make_model``.
"""

from collections.abc import Callable

import torch

from . import gpt, mamba, mlp, mobilenet, resnet, rnn, transformer, unet

Factory = Callable[..., tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]

REGISTRY: dict[str, Factory] = {
    "mlp": mlp.make_mlp,
    "resnet18": resnet.make_resnet18,
    "mobilenetv2": mobilenet.make_mobilenetv2,
    "transformer": transformer.make_transformer,
    "gpt": gpt.make_gpt,
    "rnn": rnn.make_rnn,
    "mamba": mamba.make_mamba,
    "unet": unet.make_unet,
}


def get(name: str, size: str = "small", seed: int = 0) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """Build model ``name`` from ``REGISTRY``; raises ``ValueError`` for an unknown name or size."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; available models: {sorted(REGISTRY)}")
    return REGISTRY[name](size=size, seed=seed)


__all__ = ["REGISTRY", "Factory", "get"]
