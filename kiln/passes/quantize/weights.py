"""Weight quantization and quantized weight values in a graph.

Contract:
- ``quantize_per_channel(w, observer="minmax", qmin=-127, qmax=127)`` -> ``QuantizedWeight`` (int8
  values, f32 scales and i32 zero points along dim 0, symmetric), computed with the exact formula of
  ``kiln.quantize_per_channel``.
- ``quantize_per_group(w, group_size, bits=4, symmetric=False)`` -> ``QuantizedWeight`` of a 2-D
  ``[N, K]`` weight in groups of ``group_size`` consecutive input channels: asymmetric ``[0, 2**bits-1]``
  (stored in uint8) or symmetric ``[-(2**(bits-1)) + 1, 2**(bits-1) - 1]`` (stored in int8), min/max
  per group, the formula of ``kiln.quantize_per_group``.
- ``add_weight(graph, name, tensor, quant=None) -> Value`` adds a ``kiln.weight`` node (at the top of
  the graph) whose type carries ``quant``; ``QuantizedWeight.values(graph, base)`` adds the three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.errors import KilnError
from kiln.ir import quant_ops
from kiln.ir.graph import Graph, Value
from kiln.ir.infer import type_of_example
from kiln.ir.ops import WEIGHT
from kiln.ir.types import QuantParams
from kiln.passes.quantize.layers import fresh_weight_name
from kiln.passes.quantize.observers import QSpec, make_observer, qparams_from_range


@dataclass
class QuantizedWeight:
    q: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor
    scheme: str  # per_channel | per_group
    qmin: int
    qmax: int
    group_size: int | None = None

    @property
    def bits(self) -> int:
        return quant_ops.qdtype_bits(quant_ops.qdtype_name(self.q.dtype, self.qmin, self.qmax))

    def dequantize(self) -> torch.Tensor:
        if self.scheme == "per_group":
            return quant_ops.dequantize_per_group(self.q, self.scales, self.zero_points, self.group_size)
        return quant_ops.dequantize_per_channel(self.q, self.scales, self.zero_points, 0)

    def quant_params(self) -> QuantParams:
        return QuantParams(quant_ops.qdtype_name(self.q.dtype, self.qmin, self.qmax), self.scheme,
                           tuple(float(s) for s in self.scales.flatten()),
                           tuple(int(z) for z in self.zero_points.flatten()),
                           axis=0 if self.scheme == "per_channel" else 1, group_size=self.group_size)

    def values(self, graph: Graph, base: str) -> tuple[Value, Value, Value]:
        qv = add_weight(graph, f"{base}.q", self.q, self.quant_params())
        return qv, add_weight(graph, f"{base}.scales", self.scales), add_weight(graph, f"{base}.zps",
                                                                              self.zero_points)


def quantize_per_channel(w: torch.Tensor, observer: str = "minmax", qmin: int = -127,
                         qmax: int = 127) -> QuantizedWeight:
    spec = QSpec(torch.int8, qmin, qmax, symmetric=True, axis=0)
    obs = make_observer(observer, spec)
    obs.observe(w)
    scales, zps = obs.qparams()
    q = quant_ops.quantize_per_channel(w, scales, zps, 0, qmin, qmax, torch.int8)
    return QuantizedWeight(q, scales.to(torch.float32), zps.to(torch.int32), "per_channel", qmin, qmax)


def group_qparams(w: torch.Tensor, group_size: int, bits: int, symmetric: bool):
    """(scales [N, K/g], zero points [N, K/g], qmin, qmax, container dtype) from per-group min/max."""
    n, k = w.shape
    if k % group_size:
        raise KilnError(f"group size {group_size} does not divide the input features {k}")
    groups = w.reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        qmin, dtype = -qmax, torch.int8
        spec = QSpec(dtype, qmin, qmax, symmetric=True)
    else:
        qmin, qmax, dtype = 0, 2**bits - 1, torch.uint8
        spec = QSpec(dtype, qmin, qmax, symmetric=False)
    scales, zps = qparams_from_range(lo, hi, spec)
    return scales, zps, qmin, qmax, dtype


def quantize_per_group(w: torch.Tensor, group_size: int, bits: int = 4, symmetric: bool = False,
                       scales: torch.Tensor | None = None, zero_points: torch.Tensor | None = None
                       ) -> QuantizedWeight:
    if w.dim() != 2:
        raise KilnError(f"per-group quantization takes a 2-D weight, got {list(w.shape)}")
    s, z, qmin, qmax, dtype = group_qparams(w, group_size, bits, symmetric)
    scales = s if scales is None else scales
    zero_points = z if zero_points is None else zero_points
    q = quant_ops.quantize_per_group(w, scales, zero_points, group_size, qmin, qmax, dtype)
    return QuantizedWeight(q, scales.to(torch.float32), zero_points.to(torch.int32), "per_group", qmin, qmax,
                           group_size)


def add_weight(graph: Graph, name: str, tensor: torch.Tensor, quant: QuantParams | None = None) -> Value:
    name = fresh_weight_name(graph, name)
    graph.weights[name] = tensor
    t = type_of_example(tensor)
    if quant is not None:
        t = t.with_(quant=quant)
    node = graph.create_node(WEIGHT, (), {}, [t], names=[name], attrs={"name": name}, index=0)
    return node.output
