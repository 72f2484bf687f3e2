"""Reduced-precision float: run conv/linear layers in bfloat16 or float16.

Contract:
- ``cast_layers(graph, dtype, layers=None) -> dict`` rewrites each layer (``layers.find_layers``; all, or
  the named ones) into ``_to_copy(x, dtype)`` -> the same convolution / ``aten.linear`` with weights and
  bias stored in ``dtype`` -> ``_to_copy(_, float32)``. Semantics are PyTorch's for that dtype.
- ``cast_where_faster(graph, dtype, example_inputs) -> dict``: the same, but only for layers whose cast
  version runs faster than float32 here (each layer timed alone on its captured input, interleaved
  medians); ``stats["timings_us"]`` records both times per layer.
"""

from __future__ import annotations

import torch

from kiln.ir.graph import Graph
from kiln.ir.ops import aten
from kiln.passes.dce import eliminate_dead_code
from kiln.passes.quantize.layers import Layer, find_layers
from kiln.passes.quantize.weights import add_weight


def _emit_layer(graph: Graph, layer: Layer, dtype: torch.dtype) -> None:
    index = graph.index_of(layer.nodes[-1])

    def node(op, *args, **kwargs):
        nonlocal index
        n = graph.create_node(op, args, kwargs, index=index)
        index += 1
        return n.output

    tag = str(dtype).removeprefix("torch.")
    w = add_weight(graph, f"{layer.weight_name}.{tag}", layer.weight.to(dtype).contiguous())
    index += 1
    b = None
    if layer.bias is not None:
        b = add_weight(graph, f"{layer.weight_name}.{tag}.bias", layer.bias.to(dtype))
        index += 1
    x = node(aten._to_copy.default, layer.x, dtype=dtype)
    if layer.kind == "conv2d":
        c = layer.conv
        y = node(aten.convolution.default, x, w, b, c["stride"], c["padding"], c["dilation"], False, [0, 0],
                 c["groups"])
    else:
        y = node(aten.linear.default, x, w, b)
    y = node(aten._to_copy.default, y, dtype=torch.float32)
    if list(y.type.shape) != list(layer.out.type.shape):
        y = node(aten.view.default, y, list(layer.out.type.shape))
    graph.replace_all_uses(layer.out, y)


def cast_layers(graph: Graph, dtype: torch.dtype, layers: frozenset[str] | None = None) -> dict:
    stats: dict = {"scheme": str(dtype).removeprefix("torch."), "quantized_layers": [], "float_layers": []}
    for layer in find_layers(graph):
        if layers is not None and layer.name not in layers:
            continue
        _emit_layer(graph, layer, dtype)
        stats["quantized_layers"].append(layer.name)
    eliminate_dead_code(graph)
    return stats


def cast_where_faster(graph: Graph, dtype: torch.dtype, example_inputs: tuple, reps: int = 5) -> dict:
    from kiln.passes.quantize.latency import layer_latencies

    times = layer_latencies(graph, tuple(example_inputs), ["fp32", "bf16" if dtype == torch.bfloat16 else "fp16"],
                            reps=reps)
    faster = frozenset(name for name, t in times.items() if len(t) == 2 and min(t, key=t.get) != "fp32")
    stats = cast_layers(graph, dtype, faster)
    stats["timings_us"] = {k: {p: v / 1e3 for p, v in t.items()} for k, t in times.items()}
    return stats
