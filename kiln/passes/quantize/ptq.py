"""Post-training int8 quantization of a kiln graph: static (calibrated) and dynamic.

Contract:
- ``quantize_static(graph, batches, config) -> dict`` (stats): weights per-channel symmetric int8,
  activations per-tensor (``config.act_dtype``, asymmetric by default, ranges from ``config.observer``
  on the calibration batches run through the reference). Steps, each a plain graph rewrite:
  1. choose the activations to quantize: every layer input, the input of an average pool / mean whose
     result feeds a layer, and the residual operand of a conv/linear -> add [-> relu] whose result is
     itself quantized; each is moved up through ``TRANSPARENT`` ops to where it is produced, so one
     quantization serves them all (shared parameters, like PT2E's shared-qparams ops);
  2. calibrate those values (``calibrate.calibrate``);
  3. insert ``kiln.quantize`` -> ``kiln.dequantize`` after each (all users read the dequantized value,
     graph outputs keep the float one);
  4. sink each ``dequantize`` below transparent ops, so int8 tensors flow through them;
  5. fuse ``dequantize -> layer [-> add(dequantize(o))] [-> relu] -> quantize`` into one ``kiln.qconv2d``
     / ``kiln.qlinear`` with an integer output, then the remaining ``dequantize -> layer [-> relu]`` into
     the same ops with a float output.
  Layers whose input could not be quantized stay in float and are listed in ``stats["float_layers"]``.
- ``quantize_dynamic(graph, config) -> dict``: every linear layer becomes ``kiln.dynamic_qlinear``
  (run-time activation ranges); convolutions stay in float (PyTorch and kiln have no dynamic conv).
- ``config.layers`` restricts either scheme to the named layers (``Layer.name``), for mixed precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kiln.ir import quant_ops
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.ops import aten
from kiln.ir.quant_ops import DEQUANTIZE, DYNAMIC_QLINEAR, QCONV2D, QLINEAR, QUANTIZE
from kiln.ir.rewrite import Rewriter, apply_patterns, collect_patterns, pattern
from kiln.ir.types import TensorType
from kiln.passes.dce import eliminate_dead_code
from kiln.passes.quantize.calibrate import calibrate
from kiln.passes.quantize.layers import (
    _TRANSPARENT,
    Layer,
    find_layers,
    match_layer,
    replace_layer,
    transparent_input,
)
from kiln.passes.quantize.observers import QSpec, make_observer
from kiln.passes.quantize.weights import add_weight, quantize_per_channel

POOLS = ("mean", "avg_pool2d", "_adaptive_avg_pool2d", "adaptive_avg_pool2d")


@dataclass
class PTQConfig:
    observer: str = "minmax"
    observer_options: dict = field(default_factory=dict)
    weight_observer: str = "minmax"
    act_dtype: torch.dtype = torch.uint8
    layers: frozenset[str] | None = None  # None: every layer

    @property
    def act_spec(self) -> QSpec:
        lo, hi = quant_ops.INT_RANGES[self.act_dtype]
        return QSpec(self.act_dtype, lo, hi, symmetric=False)

    def allows(self, layer: Layer) -> bool:
        return self.layers is None or layer.name in self.layers


def _is_float(v: Value) -> bool:
    return isinstance(v.type, TensorType) and v.type.dtype == torch.float32


def _single_user(v: Value) -> Node | None:
    users = v.users
    return users[0] if len(users) == 1 and len(v.uses) == 1 else None


def representative(v: Value, graph: Graph) -> Value:
    """Walk up through transparent producers whose input feeds only them."""
    while v.producer is not None:
        u = transparent_input(v.producer)
        if u is None or _single_user(u) is not v.producer or u in graph.outputs or v is not v.producer.results[0]:
            break
        v = u
    return v


def _reaches_layer_input(v: Value, inputs: set[int]) -> bool:
    while True:
        if id(v) in inputs:
            return True
        user = _single_user(v)
        if user is None or transparent_input(user) is not v:
            return False
        v = user.results[0]


def _fused_add(layer: Layer, by_out: dict[int, Layer]) -> tuple[Node, Value, Value] | None:
    """conv/linear -> add(., other) [-> relu]: (add node, other operand, site value)."""
    add = _single_user(layer.out)
    if add is None or not add.is_a(aten.add.Tensor) or add.kwargs.get("alpha", 1) != 1:
        return None
    a, b = add.args[:2]
    if not (isinstance(a, Value) and isinstance(b, Value)) or a.type != b.type:
        return None
    other = b if a is layer.out else a
    if not _is_float(other):
        return None
    other_layer = by_out.get(id(other))
    if other_layer is not None and add.graph.index_of(other_layer.nodes[-1]) > add.graph.index_of(layer.nodes[-1]):
        return None  # the later of two layers takes the add
    site = add.output
    relu = _single_user(site)
    if relu is not None and relu.is_a(aten.relu):
        site = relu.output
    return add, other, site


def plan_activations(graph: Graph, layers: list[Layer]) -> list[Value]:
    """The float values whose quantization makes every layer's input (and fused residual) int8."""
    layer_inputs = {id(layer.x) for layer in layers}
    wanted = [layer.x for layer in layers]
    for node in graph.nodes:
        name = getattr(getattr(node.op, "packet", None), "op", None)
        if name in POOLS and node.results and _reaches_layer_input(node.results[0], layer_inputs):
            wanted.append(node.args[0])
    reps: dict[int, Value] = {}
    for v in wanted:
        if _is_float(v):
            r = representative(v, graph)
            reps.setdefault(id(r), r)
    by_out = {id(layer.out): layer for layer in layers}
    for layer in layers:
        fused = _fused_add(layer, by_out)
        if fused is not None and id(fused[2]) in reps:
            other = representative(fused[1], graph)
            reps.setdefault(id(other), other)
    order = {id(v): i for i, v in enumerate(graph.values())}
    return sorted(reps.values(), key=lambda v: order[id(v)])


_METADATA = ("sym_size", "sym_numel", "sym_stride")


def insert_qdq(graph: Graph, v: Value, scale: float, zp: int, spec: QSpec) -> Value:
    """quantize -> dequantize after ``v``; its users (except size queries) read the dequantized value."""
    users = [u for u in v.users if getattr(getattr(u.op, "packet", None), "op", None) not in _METADATA]
    index = 0 if v.producer is None else graph.index_of(v.producer) + 1
    q = graph.create_node(QUANTIZE, (v, scale, zp, spec.qmin, spec.qmax, spec.dtype), index=index).output
    d = graph.create_node(DEQUANTIZE, (q, scale, zp), index=index + 1).output
    for u in users:
        u.replace_input(v, d)
    return d


def _dequant_params(v: Value) -> tuple[Value, float, int] | None:
    p = v.producer
    if p is None or p.op is not DEQUANTIZE:
        return None
    return p.args[0], float(p.args[1]), int(p.args[2])


class SinkDequantize:
    """T(dequantize(q)) -> dequantize(T(q)) for transparent T."""

    @pattern(*[getattr(aten, n) for n in _TRANSPARENT])
    def sink(self, node: Node, rw: Rewriter) -> bool:
        x = transparent_input(node)
        dq = _dequant_params(x) if x is not None else None
        if dq is None:
            return False
        q, scale, zp = dq
        args = tuple(q if a is x else a for a in node.args)
        new = rw.call(node.op, *args, **node.kwargs)
        out = new[0] if isinstance(new, list) else new
        out.type = out.type.with_(quant=q.type.quant)
        d = rw.call(DEQUANTIZE, out, scale, zp)
        rw.replace_all_uses(node.results[0], d)
        return True


@dataclass
class _Emitter:
    """Creates the fused integer ops (and each layer's quantized weights, once)."""

    config: PTQConfig
    stats: dict
    by_out: dict[int, Layer] = field(default_factory=dict)
    weights: dict[str, tuple] = field(default_factory=dict)

    def layer_weights(self, graph: Graph, layer: Layer) -> tuple:
        if layer.name not in self.weights:
            qw = quantize_per_channel(layer.weight, self.config.weight_observer)
            qv, sv, zv = qw.values(graph, f"{layer.weight_name}.int8")
            bv = add_weight(graph, f"{layer.weight_name}.int8.bias", layer.bias.float()) \
                if layer.bias is not None else None
            self.weights[layer.name] = (qv, sv, zv, bv)
        return self.weights[layer.name]

    def emit(self, rw: Rewriter, layer: Layer, qx: Value, xs: float, xz: int, out_scale: float, out_zp: int,
             out_dtype: torch.dtype, post_op: str, other=None, other_scale: float = 1.0,
             other_zp: int = 0) -> Value:
        qv, sv, zv, bv = self.layer_weights(rw.graph, layer)
        if layer.kind == "conv2d":
            c = layer.conv
            out = rw.call(QCONV2D, qx, xs, xz, qv, sv, zv, bv, c["stride"], c["padding"], c["dilation"],
                          c["groups"], out_scale, out_zp, out_dtype, post_op, other, other_scale, other_zp)
        else:
            out = rw.call(QLINEAR, qx, xs, xz, qv, sv, zv, bv, out_scale, out_zp, out_dtype, post_op, other,
                          other_scale, other_zp)
        want = list(layer.out.type.shape)
        if list(out.type.shape) != want:
            quant = out.type.quant
            out = rw.call(aten.view, out, want)
            out.type = out.type.with_(quant=quant)
        self.stats["quantized_layers"].append(layer.name)
        return out

    def layer_of(self, v: Value) -> Layer | None:
        layer = self.by_out.get(id(v))
        if layer is None or any(n.graph is None for n in layer.nodes) or not self.config.allows(layer):
            return None
        return layer


@dataclass
class _FuseInt8Out:
    em: _Emitter

    @pattern(QUANTIZE)
    def fuse(self, qn: Node, rw: Rewriter) -> bool:
        y = qn.args[0]
        if y in rw.graph.outputs or _single_user(y) is not qn:
            return False
        post, a = "none", y
        if y.producer is not None and y.producer.is_a(aten.relu):
            post, a = "relu", y.producer.args[0]
            if _single_user(a) is not y.producer:
                return False
        other = None
        layer = self.em.layer_of(a)
        if layer is None:
            add = a.producer
            if add is None or not add.is_a(aten.add.Tensor) or add.kwargs.get("alpha", 1) != 1:
                return False
            cands = [v for v in add.args[:2] if isinstance(v, Value) and self.em.layer_of(v) is not None
                     and _single_user(v) is add]
            cands.sort(key=lambda v: rw.graph.index_of(v.producer), reverse=True)
            for c in cands:
                o = add.args[1] if add.args[0] is c else add.args[0]
                if _dequant_params(o) is not None and o.type == c.type:
                    layer, other = self.em.layer_of(c), _dequant_params(o)
                    break
            if layer is None:
                return False
        dq = _dequant_params(layer.x)
        if dq is None:
            return False
        qx, xs, xz = dq
        oq, os_, oz = other if other is not None else (None, 1.0, 0)
        out = self.em.emit(rw, layer, qx, xs, xz, float(qn.args[1]), int(qn.args[2]), qn.args[5], post, oq, os_,
                           oz)
        rw.replace_all_uses(qn.output, out)
        return True


@dataclass
class _FuseFloatOut:
    em: _Emitter

    @pattern(aten.convolution, aten.addmm, aten.mm, aten.bmm, aten.linear)
    def fuse_float_out(self, node: Node, rw: Rewriter) -> bool:
        layer = match_layer(node)
        if layer is None or not self.em.config.allows(layer):
            return False
        dq = _dequant_params(layer.x)
        if dq is None:
            return False
        qx, xs, xz = dq
        if not layer.out.uses and layer.out not in rw.graph.outputs:
            return False  # dead (replaced by an integer-output fusion)
        relu = _single_user(layer.out)
        if relu is not None and relu.is_a(aten.relu) and layer.out not in rw.graph.outputs:
            out = self.em.emit(rw, layer, qx, xs, xz, 1.0, 0, torch.float32, "relu")
            rw.replace_all_uses(relu.output, out)
            rw.erase(relu)
        else:
            out = self.em.emit(rw, layer, qx, xs, xz, 1.0, 0, torch.float32, "none")
        rw.replace_all_uses(layer.out, out)
        for n in reversed(layer.nodes[1:]):  # a separate bias add (and views) of the bmm form, now dead
            rw.erase(n)
        return True


def quantize_static(graph: Graph, batches: list[tuple], config: PTQConfig | None = None) -> dict:
    config = config or PTQConfig()
    layers = [layer for layer in find_layers(graph) if config.allows(layer)]
    stats: dict = {"scheme": "int8", "quantized_layers": [], "float_layers": [], "activations": 0}
    if not layers:
        return stats
    values = plan_activations(graph, layers)
    spec = config.act_spec
    observers = {v: make_observer(config.observer, spec, **config.observer_options) for v in values}
    calibrate(graph, observers, batches)
    for v in values:
        scale, zp = observers[v].qparams()
        insert_qdq(graph, v, float(scale), int(zp), spec)
    stats["activations"] = len(values)
    apply_patterns(graph, collect_patterns(SinkDequantize()))
    em = _Emitter(config, stats)
    em.by_out = {id(layer.out): layer for layer in find_layers(graph)}
    apply_patterns(graph, collect_patterns(_FuseInt8Out(em)))
    eliminate_dead_code(graph)  # the float chains the int8 fusions replaced
    apply_patterns(graph, collect_patterns(_FuseFloatOut(em)))
    eliminate_dead_code(graph)
    done = set(stats["quantized_layers"])
    stats["float_layers"] = [layer.name for layer in layers if layer.name not in done]
    return stats


def quantize_dynamic(graph: Graph, config: PTQConfig | None = None) -> dict:
    config = config or PTQConfig()
    stats: dict = {"scheme": "int8-dynamic", "quantized_layers": [], "float_layers": []}
    for layer in find_layers(graph):
        if not config.allows(layer):
            continue
        if layer.kind != "linear":
            stats["float_layers"].append(layer.name)
            continue
        qw = quantize_per_channel(layer.weight, config.weight_observer)
        qv, sv, zv = qw.values(graph, f"{layer.weight_name}.int8")
        bv = add_weight(graph, f"{layer.weight_name}.int8.bias", layer.bias.float()) if layer.bias is not None \
            else None
        replace_layer(graph, layer, DYNAMIC_QLINEAR, (layer.x, qv, sv, zv, bv, 0, 255))
        stats["quantized_layers"].append(layer.name)
    eliminate_dead_code(graph)
    return stats
