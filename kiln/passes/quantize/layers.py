"""The layers quantization works on: convolutions and linear maps with constant weights, found in a graph.

Contract:
- ``constant_of(value)`` evaluates a value computed from weights only through layout ops (permute, t,
  view, expand, clone...), or returns None; ``root_weight(value)`` names the ``kiln.weight`` it reads.
- ``find_layers(graph) -> list[Layer]`` in program order. A ``Layer`` is
  * ``conv2d``: ``aten.convolution`` (not transposed, 2-D) with a constant weight and optional constant
    bias;
  * ``linear``: ``aten.addmm(b, x, W^T)``, ``aten.mm(x, W^T)``, ``aten.linear(x, W, b)``, or
    ``aten.bmm(x, broadcast W^T)`` optionally followed by ``aten.add.Tensor(_, b)`` (what export makes
    of a Linear on a non-contiguous 3-D input), where ``W^T`` is a constant.
  ``layer.weight`` is in PyTorch's convention (``[N, K]`` / ``[O, I/groups, kh, kw]``); ``layer.nodes``
  are the nodes the layer replaces (compute node, and the bias add if separate); ``layer.out`` is the
  value it produces; ``layer.x`` its activation input.
- ``TRANSPARENT`` ops commute exactly with a monotone per-tensor affine quantization (layout ops,
  max pooling): ``quantize(T(x)) == T(quantize(x))``. ``transparent_input(node)`` is the one tensor input
  such an op moves, or None when the node is not transparent.
- ``replace_layer(graph, layer, op, args)`` inserts ``op(*args)`` after the layer, reshapes its result to
  the layer's output shape when they differ, and points every use of ``layer.out`` at it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kiln.ir.graph import Graph, Node, Value, map_values
from kiln.ir.ops import WEIGHT, aten
from kiln.ir.types import TensorType

_LAYOUT_OPS = ("permute", "t", "transpose", "view", "_unsafe_view", "reshape", "expand", "clone", "alias",
               "detach", "squeeze", "unsqueeze", "contiguous")
_TRANSPARENT = ("permute", "t", "transpose", "view", "_unsafe_view", "reshape", "expand", "clone", "alias",
                "detach", "squeeze", "unsqueeze", "select", "slice", "flatten", "max_pool2d_with_indices")


def _packet_name(node: Node) -> str | None:
    p = getattr(node.op, "packet", None)
    return p.op if p is not None and p.namespace == "aten" else None


def root_weight(value: Value) -> str | None:
    """Name of the kiln.weight a constant value is read from (through layout ops)."""
    node = value.producer
    while node is not None:
        if node.op is WEIGHT:
            return node.attrs["name"]
        if _packet_name(node) not in _LAYOUT_OPS or not node.inputs:
            return None
        node = node.inputs[0].producer
    return None


def constant_of(value: Value) -> torch.Tensor | None:
    node = value.producer
    if node is None:
        return None
    if node.op is WEIGHT:
        return node.graph.weights.get(node.attrs["name"])
    if _packet_name(node) not in _LAYOUT_OPS or not node.inputs or node.op.multi_result:
        return None
    consts = {}
    for v in node.inputs:
        c = constant_of(v)
        if c is None:
            return None
        consts[id(v)] = c
    args = map_values(node.args, lambda v: consts[id(v)])
    kwargs = {k: map_values(a, lambda v: consts[id(v)]) for k, a in node.kwargs.items()}
    with torch.no_grad():
        return node.op.target(*args, **kwargs)


def transparent_input(node: Node) -> Value | None:
    name = _packet_name(node)
    if name not in _TRANSPARENT:
        return None
    tensors = [v for v in node.inputs if isinstance(v.type, TensorType)]
    if len(tensors) != 1 or node.args[0] is not tensors[0] or tensors[0].type.dtype != torch.float32:
        return None
    if name == "max_pool2d_with_indices" and node.results[1].uses:
        return None  # the indices are used: keep the float op
    return tensors[0]


@dataclass(eq=False)
class Layer:
    name: str
    kind: str  # "conv2d" | "linear"
    nodes: list[Node]
    x: Value
    out: Value
    weight: torch.Tensor
    bias: torch.Tensor | None
    weight_name: str
    conv: dict = field(default_factory=dict)  # stride, padding, dilation, groups

    @property
    def node(self) -> Node:
        return self.nodes[0]


def _layer_name(weight_name: str) -> str:
    return weight_name.removesuffix(".bnfold").removesuffix(".weight")


def _is_activation(v) -> bool:
    return isinstance(v, Value) and isinstance(v.type, TensorType) and v.type.dtype == torch.float32 \
        and constant_of(v) is None


def match_layer(node: Node) -> Layer | None:
    name = _packet_name(node)
    if name == "convolution":
        return _match_conv(node)
    if name in ("addmm", "mm", "bmm", "linear"):
        return _match_linear(node, name)
    return None


def _match_conv(node: Node) -> Layer | None:
    x, w, b, stride, padding, dilation, transposed, _, groups = node.args[:9]
    if transposed or not _is_activation(x) or len(stride) != 2:
        return None
    weight = constant_of(w)
    bias = constant_of(b) if isinstance(b, Value) else None
    if weight is None or weight.dim() != 4 or (isinstance(b, Value) and bias is None):
        return None
    wname = root_weight(w) or node.output.name
    return Layer(_layer_name(wname), "conv2d", [node], x, node.output, weight, bias, wname,
                 {"stride": list(stride), "padding": list(padding), "dilation": list(dilation),
                  "groups": int(groups)})


def _match_linear(node: Node, name: str) -> Layer | None:
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    bias_v = None
    if name == "addmm":
        bias_v, x, wt = node.args[:3]
    elif name == "linear":
        x, w = node.args[:2]
        bias_v = node.args[2] if len(node.args) > 2 else None
        wt = None
    else:
        x, wt = node.args[:2]
    if not _is_activation(x):
        return None
    if name == "linear":
        weight = constant_of(w)
        wname = root_weight(w)
    else:
        mat = constant_of(wt)
        wname = root_weight(wt)
        if mat is None:
            return None
        if name == "bmm":
            if mat.dim() != 3 or not torch.equal(mat, mat[:1].expand_as(mat)):
                return None
            mat = mat[0]
        weight = mat.t() if mat.dim() == 2 else None
    if weight is None or weight.dim() != 2:
        return None
    bias = None
    nodes = [node]
    out = node.output
    if isinstance(bias_v, Value):
        bias = constant_of(bias_v)
        if bias is None or bias.shape != (weight.shape[0],):
            return None
    if name == "bmm" and bias is None:
        views = []
        v = out
        while len(v.uses) == 1 and v.users[0].is_a(aten.view) and v.users[0].output.type.shape[-1:] == \
                (weight.shape[0],):
            views.append(v.users[0])
            v = views[-1].output
        if len(v.uses) == 1 and v.users[0].is_a(aten.add) and v.uses[0].args[0] is v \
                and isinstance(v.uses[0].args[1], Value) and v.users[0].kwargs.get("alpha", 1) == 1:
            add = v.users[0]
            c = constant_of(add.args[1])
            if c is not None and c.shape == (weight.shape[0],):
                bias, nodes, out = c, [node, *views, add], add.output
    wname = wname or node.output.name
    return Layer(_layer_name(wname), "linear", nodes, x, out, weight.contiguous(),
                 bias.contiguous() if bias is not None else None, wname)


def find_layers(graph: Graph) -> list[Layer]:
    layers = []
    names: dict[str, int] = {}
    for node in graph.nodes:
        layer = match_layer(node)
        if layer is None:
            continue
        n = names.get(layer.name, 0)
        names[layer.name] = n + 1
        if n:  # a weight used by two layers (tied weights): keep names unique
            layer.name = f"{layer.name}#{n}"
        layers.append(layer)
    return layers


def fresh_weight_name(graph: Graph, base: str) -> str:
    if base not in graph.weights:
        return base
    i = 1
    while f"{base}.{i}" in graph.weights:
        i += 1
    return f"{base}.{i}"


def replace_layer(graph: Graph, layer: Layer, op, args: tuple) -> Value:
    index = graph.index_of(layer.nodes[-1])
    out = graph.create_node(op, args, index=index).output
    if list(out.type.shape) != list(layer.out.type.shape):
        out = graph.create_node(aten.view.default, (out, list(layer.out.type.shape)), index=index + 1).output
    graph.replace_all_uses(layer.out, out)
    return out
