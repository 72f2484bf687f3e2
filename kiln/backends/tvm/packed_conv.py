"""Convolutions on oneDNN-packed weights with the following activation fused, as Inductor does with freezing.

``aten.convolution`` hands oneDNN a plain weight on every call (oneDNN reorders it to its blocked layout
each time) and leaves the activation to a second pass over the output. ``mkldnn._convolution_pointwise``
takes a weight reordered once (``mkldnn_reorder_conv2d_weight``) and applies the activation as a oneDNN
post-op. Measured here (2 threads, channels-last, a ReLU6 after the conv): depthwise 3x3 144 channels
56x56 236 us against 384 us for conv + clamp; 1x1 96->24 28x28 96 against 125; a dense 3x3 32->64 56x56
showed no gain (905 against 771, indicative: other jobs were running). The residual add as a binary
post-op: A/B on the bench resnet18 (interleaved, one process) 21.5 against 20.3 ms.

Contract:
- ``pack_convolutions(graph, packs) -> int`` rewrites, in ``graph`` and its subgraphs, every 2-d
  ``aten.convolution`` (not transposed, no output padding) on a float32 channels-last input with static
  shape, whose weight is a float32 ``kiln.weight`` and bias a ``kiln.weight`` or None, into
  ``mkldnn._convolution_pointwise(x, packed, bias, padding, stride, dilation, groups, attr, scalars,
  None)``. When the convolution's only reader is an activation oneDNN fuses (``POST_OPS``: relu, ReLU6 /
  hardtanh, silu, sigmoid, tanh, hardswish) that activation is folded in and replaced too. ``packed`` is
  a new ``kiln.weight`` (``<name>.onednn``: an opaque mkldnn tensor, so only for running: the backend
  packs its own clone). When the convolution's only reader is ``aten.add.Tensor`` of another float32
  channels-last value of its shape (a residual), the add (and an activation that is its only reader) are
  folded too: ``mkldnn._convolution_pointwise.binary(x, other, packed, bias, ..., "add", None, attr or
  None, scalars, None)``, oneDNN's binary post-op (resnet's ``relu(conv(x) + identity)``). ``packs``
  shares packed weights between graphs (storage, view, conv geometry).
- Results equal ``aten.convolution`` followed by the activation (same oneDNN kernels; the activation is
  applied in float32 by the post-op).
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir.graph import Graph, Node
from kiln.ir.ops import get_op
from kiln.ir.types import TensorType

from .packed_gemm import add_weight, view_key, weight_tensor

CONV_POINTWISE = "mkldnn._convolution_pointwise"
CONV_POINTWISE_BINARY = "mkldnn._convolution_pointwise.binary"


def _hardtanh(node: Node) -> tuple[str, list] | None:
    lo, hi = (list(node.args[1:3]) + [-1.0, 1.0][len(node.args) - 1:])[:2]
    return ("hardtanh", [float(lo), float(hi)]) if not node.kwargs else None


def _clamp(node: Node) -> tuple[str, list] | None:
    bounds = list(node.args[1:3])
    if node.kwargs or len(bounds) != 2 or any(not isinstance(b, (int, float)) for b in bounds):
        return None
    return "hardtanh", [float(bounds[0]), float(bounds[1])]


# activation op -> (its reader) -> (oneDNN post-op name, scalars), or None when its arguments do not fit
POST_OPS = {
    "aten.relu": lambda n: ("relu", []),
    "aten.hardtanh": _hardtanh,
    "aten.clamp": _clamp,
    "aten.silu": lambda n: ("swish", []),
    "aten.sigmoid": lambda n: ("sigmoid", []),
    "aten.tanh": lambda n: ("tanh", []),
    "aten.hardswish": lambda n: ("hardswish", []),
}


def _static(t: Any) -> bool:
    return isinstance(t, TensorType) and all(isinstance(d, int) or getattr(d, "is_Integer", False)
                                             for d in t.shape)


def _conv_operands(node: Node) -> tuple | None:
    if node.op.name != "aten.convolution" or node.kwargs or len(node.args) != 9:
        return None
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = node.args
    weight = weight_tensor(w)
    if (transposed or any(output_padding) or weight is None or weight.dim() != 4 or weight.dtype != torch.float32
            or (b is not None and weight_tensor(b) is None)):
        return None
    xt, out = getattr(x, "type", None), node.output.type
    if not (_static(xt) and len(xt.shape) == 4 and xt.dtype == torch.float32 and xt.layout == "channels_last"
            and out.layout == "channels_last"):
        return None
    return x, w, b, list(stride), list(padding), list(dilation), int(groups)


def _sole_reader(node: Node, graph: Graph) -> Node | None:
    """The one node that reads ``node``'s result, once (None if several or a graph output)."""
    users = node.output.users
    if len(users) == 1 and len(node.output.uses) == 1 and all(o is not node.output for o in graph.outputs):
        return users[0]
    return None


def _residual_add(conv: Node, graph: Graph) -> tuple[Node | None, Any]:
    """(the ``aten.add.Tensor`` that adds a residual to ``conv``'s result, the residual) when that add is the
    conv's only reader and the residual is another float32 channels-last value of the same shape (what
    oneDNN's binary post-op takes); else (None, None)."""
    add = _sole_reader(conv, graph)
    if add is None or add.op.name != "aten.add.Tensor" or add.kwargs or len(add.args) != 2:
        return None, None
    other = add.args[1] if add.args[0] is conv.output else add.args[0]
    out = conv.output.type
    ot = getattr(other, "type", None)
    if other is conv.output or not isinstance(ot, TensorType) or ot.shape != out.shape \
            or ot.dtype != torch.float32 or ot.layout != "channels_last" or add.output.type.layout != "channels_last":
        return None, None
    return add, other


def onednn_pack(spec: dict, sources: list[torch.Tensor]) -> torch.Tensor:
    """oneDNN's blocked layout of the convolution weight ``sources[0]`` for the convolution ``spec``
    describes; the tensor carries its recipe (``kiln_recipe``) so a flat plan can pack it again on load."""
    packed = torch._C._nn.mkldnn_reorder_conv2d_weight(sources[0].to_mkldnn(), spec["padding"], spec["stride"],
                                                       spec["dilation"], int(spec["groups"]), spec["input_shape"])
    packed.kiln_recipe = (onednn_pack, dict(spec), list(sources))
    return packed


def pack_convolutions(graph: Graph, packs: dict) -> int:
    if not torch.backends.mkldnn.is_available():
        return 0
    rewritten = 0
    for node in list(graph.nodes):
        if node.graph is None:  # an activation already folded into its convolution
            continue
        if node.subgraph is not None:
            rewritten += pack_convolutions(node.subgraph, packs)
            continue
        operands = _conv_operands(node)
        if operands is None:
            continue
        x, w, b, stride, padding, dilation, groups = operands
        add, other = _residual_add(node, graph)
        tail = add if add is not None else node
        post, activation = None, _sole_reader(tail, graph)
        if activation is not None and activation.op.name in POST_OPS and activation.args[0] is tail.output:
            post = POST_OPS[activation.op.name](activation)
        replaced = activation if post is not None else tail
        attr, scalars = post if post is not None else ("none", [])
        tensor = weight_tensor(w)
        in_shape = [int(d) for d in x.type.shape]
        key = (view_key(tensor), tuple(padding), tuple(stride), tuple(dilation), groups, tuple(in_shape))
        if key not in packs:
            packs[key] = onednn_pack({"padding": list(padding), "stride": list(stride), "dilation": list(dilation),
                                      "groups": groups, "input_shape": in_shape}, [tensor.contiguous()])
        packed, _ = add_weight(graph, f"{w.producer.attrs['name']}.onednn", packs[key], graph.index_of(node))
        if add is None:
            op, args = CONV_POINTWISE, (x, packed, b, padding, stride, dilation, groups, attr, scalars, None)
        else:  # oneDNN computes conv(x) + other, then the activation, in one pass over the output
            op = CONV_POINTWISE_BINARY
            args = (x, other, packed, b, padding, stride, dilation, groups, "add", None,
                    attr if post is not None else None, scalars, None)
        new = graph.create_node(get_op(op), args, {}, [replaced.output.type],
                                names=[replaced.output.name + "_onednn"], index=graph.index_of(replaced) + 1)
        graph.replace_all_uses(replaced.output, new.output)
        for done in dict.fromkeys((replaced, tail, node)):  # consumers first
            graph.erase(done)
        if not w.uses and all(o is not w for o in graph.outputs):
            graph.erase(w.producer)
        rewritten += 1
    return rewritten
