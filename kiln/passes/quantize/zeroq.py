"""Data-free calibration (ZeroQ): synthesise inputs whose BatchNorm statistics match the stored ones.

Contract:
- ``batchnorm_targets(graph)`` lists, for every eval-mode BatchNorm
  (``aten._native_batch_norm_legit_no_training`` with constant running statistics), its input value and
  the stored per-channel mean and standard deviation ``sqrt(running_var + eps)``.
- ``synthesize(graph, batches=2, steps=200, lr=0.2, seed=0, batch_size=32) -> list[tuple]`` starts from
  standard normal inputs (one tensor per float graph input, of the input's shape with every symbolic dim
  set to ``batch_size``)
  and runs Adam on the ZeroQ loss ``sum_l ||mean_l - mu_l||_2 + ||std_l - sigma_l||_2``, where
  ``mean_l``/``std_l`` are the per-channel statistics of BatchNorm ``l``'s input over the batch and
  spatial dims, computed by running the graph through the reference (``to_fx``) with autograd on.
  Returns ``batches`` input tuples (different seeds), usable as calibration data. Raises ``KilnError``
  when the graph has no BatchNorm (nothing to match) or a non-float input it cannot synthesise.
- ``zeroq_loss(graph, inputs)`` is that loss for given inputs (to check what the search achieved).
Run it before BatchNorm folding (the statistics live in the BatchNorm nodes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.errors import KilnError
from kiln.ir.graph import Graph, Value
from kiln.ir.ops import aten
from kiln.ir.to_fx import to_fx
from kiln.ir.types import TensorType
from kiln.passes.quantize.layers import constant_of


@dataclass
class BNTarget:
    value: Value
    mean: torch.Tensor
    std: torch.Tensor


def batchnorm_targets(graph: Graph) -> list[BNTarget]:
    out = []
    for node in graph.nodes:
        if not node.is_a(aten._native_batch_norm_legit_no_training):
            continue
        mean, var = constant_of(node.args[3]), constant_of(node.args[4])
        if mean is None or var is None:
            continue
        eps = float(node.args[6])
        out.append(BNTarget(node.args[0], mean.float(), torch.sqrt(var.float() + eps)))
    return out


def _module(graph: Graph, targets: list[BNTarget]):
    saved = list(graph.outputs)
    graph.set_outputs([t.value for t in targets])
    try:
        return to_fx(graph)
    finally:
        graph.set_outputs(saved)


def _loss(acts: list[torch.Tensor], targets: list[BNTarget]) -> torch.Tensor:
    total = torch.zeros(())
    for a, t in zip(acts, targets):
        dims = [d for d in range(a.dim()) if d != 1]
        mean = a.mean(dim=dims)
        std = torch.sqrt(a.var(dim=dims, unbiased=False) + 1e-8)
        total = total + torch.linalg.vector_norm(mean - t.mean) + torch.linalg.vector_norm(std - t.std)
    return total


def zeroq_loss(graph: Graph, inputs: tuple) -> float:
    targets = batchnorm_targets(graph)
    with torch.no_grad():
        return float(_loss(list(_module(graph, targets)(*inputs)), targets))


def synthesize(graph: Graph, batches: int = 2, steps: int = 200, lr: float = 0.2, seed: int = 0,
               batch_size: int = 32) -> list[tuple]:
    targets = batchnorm_targets(graph)
    if not targets:
        raise KilnError(f"ZeroQ needs BatchNorm statistics to match; graph '{graph.name}' has no eval-mode "
                        "BatchNorm (run it before BatchNorm folding, or calibrate with real data)")
    for v in graph.inputs:
        if not (isinstance(v.type, TensorType) and v.type.dtype.is_floating_point):
            raise KilnError(f"ZeroQ synthesises float tensor inputs only; %{v.name} is {v.type}")
    gm = _module(graph, targets)
    out = []
    for b in range(batches):
        gen = torch.Generator().manual_seed(seed + b)
        xs = [torch.randn([d if isinstance(d, int) else batch_size for d in v.type.shape], generator=gen,
                          dtype=v.type.dtype).requires_grad_() for v in graph.inputs]
        opt = torch.optim.Adam(xs, lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss = _loss(list(gm(*xs)), targets)
            loss.backward()
            opt.step()
        out.append(tuple(x.detach() for x in xs))
    return out
