"""Convolutions on oneDNN-packed weights with the following activation fused, as Inductor does with freezing.

``aten.convolution`` hands oneDNN a plain weight on every call (oneDNN reorders it to its blocked layout
each time) and leaves the activation to a second pass over the output. ``mkldnn._convolution_pointwise``
takes a weight reordered once (``mkldnn_reorder_conv2d_weight``) and applies the activation as a oneDNN
post-op. Measured here (2 threads, channels-last, a ReLU6 after the conv): depthwise 3x3 144 channels
56x56 236 us against 384 us for conv + clamp; 1x1 96->24 28x28 96 against 125; a dense 3x3 32->64 56x56
showed no gain (905 against 771, indicative: other jobs were running).

Contract:
- ``pack_convolutions(graph, packs) -> int`` rewrites, in ``graph`` and its subgraphs, every 2-d
  ``aten.convolution`` (not transposed, no output padding) on a float32 channels-last input with static
  shape, whose weight is a float32 ``kiln.weight`` and bias a ``kiln.weight`` or None, into
  ``mkldnn._convolution_pointwise(x, packed, bias, padding, stride, dilation, groups, attr, scalars,
  None)``. When the convolution's only reader is an activation oneDNN fuses (``POST_OPS``: relu, ReLU6 /
  hardtanh, silu, sigmoid, tanh, hardswish) that activation is folded in and replaced too. ``packed`` is
  a new ``kiln.weight`` (``<name>.onednn``: an opaque mkldnn tensor, so only for running: the backend
  packs its own clone). ``packs`` shares packed weights between graphs (storage, view, conv geometry).
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
        users = node.output.users
        post = None
        if len(users) == 1 and len(node.output.uses) == 1 and users[0].op.name in POST_OPS \
                and users[0].args[0] is node.output and all(o is not node.output for o in graph.outputs):
            post = POST_OPS[users[0].op.name](users[0])
        replaced = users[0] if post is not None else node
        attr, scalars = post if post is not None else ("none", [])
        tensor = weight_tensor(w)
        in_shape = [int(d) for d in x.type.shape]
        key = (view_key(tensor), tuple(padding), tuple(stride), tuple(dilation), groups, tuple(in_shape))
        if key not in packs:
            packs[key] = torch._C._nn.mkldnn_reorder_conv2d_weight(tensor.contiguous().to_mkldnn(), padding, stride,
                                                                   dilation, groups, in_shape)
        packed, _ = add_weight(graph, f"{w.producer.attrs['name']}.onednn", packs[key], graph.index_of(node))
        new = graph.create_node(get_op(CONV_POINTWISE),
                                (x, packed, b, padding, stride, dilation, groups, attr, scalars, None), {},
                                [replaced.output.type], names=[replaced.output.name + "_onednn"],
                                index=graph.index_of(replaced) + 1)
        graph.replace_all_uses(replaced.output, new.output)
        if replaced is not node:
            graph.erase(replaced)
        graph.erase(node)
        if not w.uses and all(o is not w for o in graph.outputs):
            graph.erase(w.producer)
        rewritten += 1
    return rewritten
