"""Weight-only int4 quantization of linear layers, with AWQ's activation-aware scale search.

Contract:
- ``quantize_weight_only(graph, batches, config) -> dict`` (stats) replaces each linear layer (see
  ``layers.find_layers``) whose input features divide by ``config.group_size`` with
  ``kiln.wq_linear`` on a per-group quantized weight (``config.bits``, asymmetric uint4 by default).
  Convolutions and layers that do not divide stay in float (``stats["float_layers"]``); layers named in
  ``config.int8_layers`` get int8 instead (below).
- AWQ (``config.awq``, needs calibration batches): the input activations of each layer are captured
  (reference run); for ``alpha`` on a grid in ``[0, 1)`` the per-input-channel scale
  ``s = mean|x|**alpha`` (normalised to geometric mean 1) is applied as ``W * s`` before quantization and
  ``x / s`` at run time; the alpha minimising the layer's output error
  ``|| x W^T - (x / s) Q(W * s)^T ||^2`` on the captured rows wins. ``alpha = 0`` is plain round-to-nearest,
  so the search is never worse than RTN on the calibration data. ``1 / s`` is folded into the affine
  parameters of a LayerNorm that feeds only this layer (through views); otherwise an ``aten.mul`` by the
  constant ``1 / s`` precedes the layer. ``stats["awq_alpha"]`` records each choice. Then AWQ's clipping
  search (``config.clip_grid``; 0 turns it off): per output row and group, the shrink ``1.0, 0.95, ...``
  of the group's range minimising that group's output error on the captured rows (1.0 = no clipping is a
  candidate). Measured on the stdlib GPT (held-out top-1 agreement with fp32, 4 calibration batches):
  after 120 training steps clipping hurt (0.984 with it, 0.998 without, RTN 0.995); after 400 steps it
  helped (0.955 with, 0.949 without, RTN 0.948). It stays on, as in AWQ.
- GPTQ rounding (``config.gptq``, on by default; needs calibration batches): on the grid the steps above
  chose (scales and zero points fixed per group), the integer values come from ``gptq.gptq_round`` on the
  captured (AWQ-scaled) activations instead of round-to-nearest: each column's rounding error is
  compensated by the columns not yet quantized. Same bytes, same kernels. Stdlib GPT after 400 steps, 16
  held-out batches: 0.955 -> 0.979 (GPTQ alone: 0.978; after 120 steps 0.999, AWQ + clipping alone 0.982).
  With GPTQ the agreement plateaus at 0.975-0.979 whatever the group size (16..128), symmetry, damping or
  calibration size; every remaining disagreement is a near tie (fp32's top-2 probabilities within 0.05:
  19% of positions; above that margin int4 agrees on 99.94%). Too few captured rows make the Hessian a
  poor estimate (one batch subsampled to 32 rows: 0.949 with GPTQ, 0.954 without; 64 rows: 0.961 vs
  0.948; 512: 0.976 vs 0.956): below ``config.gptq_min_rows`` rows per input feature a layer keeps
  round-to-nearest (``stats["gptq_skipped"]`` says why).
- Sensitive layers in int8 (``config.int8_layers``): those linear layers get per-channel symmetric int8
  weights (``kiln.wq_linear`` with ``group_size = K``; ``aten._weight_int8pack_mm`` can run it), no AWQ;
  the rest int4 - the "int4 with an int8 head" recipe (llama.cpp's Q4_K_M keeps some tensors at higher
  bits). ``choose_int8_layers(graph, batches, keep, group_size)`` picks them: an int ``keep`` takes the
  ``keep`` layers whose int4 quantization alone moves the calibration outputs most (``mixed.layer_sensitivity``,
  KL of the softmax, default int4 recipe), a collection of names takes those. Stdlib GPT (9 linear layers):
  the most sensitive are the first block's layers and the LM head; keeping 1/2/3/4/5 in int8 gives
  0.9814/0.9866/0.9897/0.9921/0.9933 at 20.1/20.7/21.9/22.2/23.2% of the float32 weight bytes (pure int4:
  19.2%, 0.979; all int8: 26.6%, 0.995; bf16 everywhere agrees only 0.993).
- ``stats["weight_bytes"]``/``stats["float32_weight_bytes"]``: bytes of the quantized layers' weights
  (values, f32 scales, i32 zero points, f32 bias) and of the same layers in float32.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch

from kiln.errors import KilnInputError
from kiln.ir.builder import Builder
from kiln.ir.graph import Graph, Value
from kiln.ir.ops import aten
from kiln.ir.quant_ops import WQ_LINEAR
from kiln.passes.dce import eliminate_dead_code
from kiln.passes.quantize.calibrate import tap
from kiln.passes.quantize.gptq import gptq_round
from kiln.passes.quantize.layers import (
    Layer,
    constant_of,
    find_layers,
    fresh_weight_name,
    replace_layer,
    root_weight,
)
from kiln.passes.quantize.observers import QSpec, qparams_from_range
from kiln.passes.quantize.weights import add_weight, group_qparams, quantize_per_group


@dataclass
class WeightOnlyConfig:
    group_size: int = 32
    bits: int = 4
    symmetric: bool = False
    awq: bool = True
    grid: int = 20
    clip_grid: int = 10  # clip ratios 1.0, 0.95, ... searched per (row, group); 0 turns the search off
    max_rows: int = 4096
    layers: frozenset[str] | None = None
    gptq: bool = True  # GPTQ rounding on the chosen grid (needs calibration batches)
    damp: float = 0.01  # GPTQ's damping, a fraction of the Hessian's mean diagonal
    gptq_min_rows: float = 0.5  # GPTQ only with at least this many captured rows per input feature
    int8_layers: frozenset[str] = field(default_factory=frozenset)  # per-channel int8 instead of int4

    def allows(self, layer: Layer) -> bool:
        return self.layers is None or layer.name in self.layers


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).to(torch.float32)


def capture_inputs(graph: Graph, layers: list[Layer], batches: list[tuple], max_rows: int) -> dict[str, torch.Tensor]:
    """[rows, K] activation samples at each layer's input (evenly strided subsample when too many)."""
    values = list({id(layer.x): layer.x for layer in layers}.values())
    chunks: dict[int, list[torch.Tensor]] = {id(v): [] for v in values}
    for outs in tap(graph, values, batches):
        for v, t in zip(values, outs):
            chunks[id(v)].append(_rows(t))
    out = {}
    for layer in layers:
        x = torch.cat(chunks[id(layer.x)])
        if x.shape[0] > max_rows:
            x = x[torch.linspace(0, x.shape[0] - 1, max_rows).long()]
        out[layer.name] = x
    return out


def awq_search(w: torch.Tensor, x: torch.Tensor, config: WeightOnlyConfig) -> tuple[float, torch.Tensor]:
    """(best alpha, per-input-channel scale s) minimising the layer output error on rows ``x``."""
    ref = x @ w.t()
    mag = x.abs().mean(dim=0).clamp_min(1e-8)
    best = (float("inf"), 0.0, torch.ones_like(mag))
    for i in range(config.grid):
        alpha = i / config.grid
        s = mag.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        qw = quantize_per_group(w * s[None, :], config.group_size, config.bits, config.symmetric)
        err = float(((x / s[None, :]) @ qw.dequantize().t() - ref).pow(2).mean())
        if err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2]


def awq_clip(w: torch.Tensor, x: torch.Tensor, config: WeightOnlyConfig, rows: int = 512):
    """AWQ's clipping search: per output row and group, the shrink of the group's [min, max] range that
    minimises the group's contribution to the output error on rows of ``x``. Returns (scales, zps)."""
    n, k = w.shape
    g = config.group_size
    xs = x[torch.linspace(0, x.shape[0] - 1, min(rows, x.shape[0])).long()].reshape(-1, k // g, g)
    groups = w.reshape(n, k // g, g)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    best_err = torch.full((n, k // g), float("inf"))
    best_s = best_z = None
    for i in range(config.clip_grid):
        r = 1.0 - 0.05 * i
        _, _, qmin, qmax, dtype = group_qparams(w, g, config.bits, config.symmetric)
        spec = QSpec(dtype, qmin, qmax, symmetric=config.symmetric)
        s, z = qparams_from_range(lo * r, hi * r, spec)
        deq = quantize_per_group(w, g, config.bits, config.symmetric, s, z).dequantize().reshape(n, k // g, g)
        err = torch.einsum("mjc,njc->mnj", xs, groups - deq).pow(2).mean(dim=0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = s if best_s is None else torch.where(better, s, best_s)
        best_z = z if best_z is None else torch.where(better, z, best_z)
    return best_s, best_z


def _feeding_layer_norm(x: Value, layer: Layer):
    """The native_layer_norm whose normalised output reaches only ``layer`` (through views), or None."""
    v = x
    while True:
        p = v.producer
        if p is None or len(v.uses) != 1:
            return None
        if p.is_a(aten.native_layer_norm) and v is p.results[0]:
            if p.args[2] is None or p.args[3] is None or constant_of(p.args[2]) is None \
                    or constant_of(p.args[3]) is None:
                return None
            return p
        if not (p.is_a(aten.view) or p.is_a(aten._unsafe_view)) or p.output.type.shape[-1] != x.type.shape[-1]:
            return None
        v = p.args[0]


def _fold_into_layer_norm(graph: Graph, ln, inv_s: torch.Tensor) -> None:
    b = Builder.before(ln)
    args = list(ln.args)
    for i, suffix in ((2, "awq"), (3, "awq.bias")):
        base = root_weight(args[i]) or f"{ln.results[0].name}.{suffix}"
        args[i] = b.weight(fresh_weight_name(graph, f"{base}.{suffix}"), (constant_of(args[i]) * inv_s).contiguous())
    ln.set_args(tuple(args))


def _quantize_int4(w: torch.Tensor, x: torch.Tensor | None, name: str, config: WeightOnlyConfig, stats: dict):
    """(per-group quantized weight, AWQ scale or None): AWQ scale, clipped grid, GPTQ or nearest rounding."""
    s = None
    if x is not None and config.awq:
        alpha, s = awq_search(w, x, config)
        stats["awq_alpha"][name] = alpha
        if alpha == 0.0:
            s = None
    ws = w * s[None, :] if s is not None else w
    xs = x / s[None, :] if x is not None and s is not None else x
    if xs is not None and config.awq and config.clip_grid > 1:
        scales, zps = awq_clip(ws, xs, config)
    else:
        scales, zps, *_ = group_qparams(ws, config.group_size, config.bits, config.symmetric)
    few_rows = xs is not None and xs.shape[0] < config.gptq_min_rows * xs.shape[1]
    if few_rows and config.gptq:
        stats["gptq_skipped"][name] = f"{xs.shape[0]} rows for {xs.shape[1]} input features"
    if xs is None or not config.gptq or few_rows:
        return quantize_per_group(ws, config.group_size, config.bits, config.symmetric, scales, zps), s
    _, _, qmin, qmax, dtype = group_qparams(ws, config.group_size, config.bits, config.symmetric)
    stats["gptq_layers"].append(name)
    return gptq_round(ws, xs, scales, zps, config.group_size, qmin, qmax, dtype, config.damp), s


def choose_int8_layers(graph: Graph, batches: list[tuple] | None, keep: int | Collection[str],
                       group_size: int = 32) -> tuple[frozenset[str], dict[str, float]]:
    """(layers to keep in int8, measured int4 sensitivity per layer - empty when names were given)."""
    linear = [layer.name for layer in find_layers(graph) if layer.kind == "linear"]
    if isinstance(keep, bool) or not isinstance(keep, (int, Collection)) or isinstance(keep, str):
        raise KilnInputError(f"keep_int8 takes a number of layers or a collection of layer names, got {keep!r}")
    if not isinstance(keep, int):
        unknown = sorted(set(keep) - set(linear))
        if unknown:
            raise KilnInputError(f"keep_int8 names {unknown}, which are not linear layers of the graph "
                                 f"(linear layers: {linear})")
        return frozenset(keep), {}
    if keep < 0:
        raise KilnInputError(f"keep_int8 must be >= 0, got {keep}")
    if keep == 0:
        return frozenset(), {}
    if not batches:
        raise KilnInputError("keep_int8=<number> ranks layers by measured sensitivity and needs calibration inputs")
    from kiln.passes.quantize.mixed import layer_sensitivity

    sens = layer_sensitivity(graph, batches, ("int4",), "kl", group_size)
    ranked = {name: row["int4"] for name, row in sens.items() if "int4" in row}
    top = sorted(ranked, key=ranked.get, reverse=True)[:keep]
    return frozenset(top), ranked


def quantize_weight_only(graph: Graph, batches: list[tuple] | None, config: WeightOnlyConfig | None = None) -> dict:
    config = config or WeightOnlyConfig()
    stats: dict = {"scheme": f"int{config.bits}-weight", "quantized_layers": [], "float_layers": [],
                   "awq_alpha": {}, "int8_layers": [], "gptq_layers": [],
                   "gptq_skipped": {}}
    layers = []
    for layer in find_layers(graph):
        if not config.allows(layer):
            continue
        if layer.kind != "linear" or (layer.weight.shape[1] % config.group_size
                                      and layer.name not in config.int8_layers):
            stats["float_layers"].append(layer.name)
        else:
            layers.append(layer)
    wants_acts = (config.awq or config.gptq) and batches and layers
    acts = capture_inputs(graph, layers, batches, config.max_rows) if wants_acts else {}
    w_bytes = f_bytes = 0
    for layer in layers:
        w = layer.weight.to(torch.float32)
        s, x_rows = None, acts.get(layer.name)
        if layer.name in config.int8_layers:
            qw = quantize_per_group(w, w.shape[1], 8, symmetric=True)  # per-channel: one group per row
        else:
            qw, s = _quantize_int4(w, x_rows, layer.name, config, stats)
        x = layer.x
        if s is not None:
            inv = (1.0 / s).to(torch.float32)
            ln = _feeding_layer_norm(x, layer)
            if ln is not None:
                _fold_into_layer_norm(graph, ln, inv)
            else:
                iv = add_weight(graph, f"{layer.weight_name}.awq_inv_scale", inv)
                x = graph.create_node(aten.mul.Tensor, (x, iv), index=graph.index_of(layer.nodes[-1])).output
        qv, sv, zv = qw.values(graph, f"{layer.weight_name}.int{qw.bits}")
        bv = add_weight(graph, f"{layer.weight_name}.int{qw.bits}.bias", layer.bias.float()) \
            if layer.bias is not None else None
        replace_layer(graph, layer, WQ_LINEAR, (x, qv, sv, zv, qw.group_size, bv))
        stats["quantized_layers"].append(layer.name)
        if qw.bits == 8:
            stats["int8_layers"].append(layer.name)
        bias_bytes = 4 * layer.bias.numel() if layer.bias is not None else 0
        w_bytes += (qw.q.numel() * qw.bits + 7) // 8 + 4 * qw.scales.numel() + 4 * qw.zero_points.numel() + bias_bytes
        f_bytes += 4 * w.numel() + bias_bytes
    stats["weight_bytes"], stats["float32_weight_bytes"] = w_bytes, f_bytes
    eliminate_dead_code(graph)
    return stats
