"""Measured per-layer latency at each precision: the cost model of latency-budgeted mixed precision.

Contract: ``layer_latencies(graph, example_inputs, precisions, group_size=32, reps=5)`` ->
``{layer: {precision: nanoseconds}}``. Each layer's input is captured by one reference run; the layer
alone (``layer_graph``: its input, its weights, one convolution or ``aten.linear``) is put at each
precision (``mixed.apply_precision``), lowered onto real kernels for the integer ones
(``lower.lower_graph``), and timed (all precisions interleaved, ``reps`` rounds, median). The figure
includes the quantize/dequantize a lone layer needs, so it is a conservative (high) estimate for layers
that sit between other integer layers.
"""

from __future__ import annotations

import statistics
import time

import torch

from kiln.ir.builder import Builder
from kiln.ir.clone import clone_graph
from kiln.ir.graph import Graph
from kiln.ir.ops import aten
from kiln.ir.to_fx import to_fx
from kiln.passes.quantize.calibrate import tap
from kiln.passes.quantize.layers import Layer, find_layers


def layer_graph(layer: Layer) -> Graph:
    g = Graph(f"layer_{layer.name}")
    x = g.add_input(layer.x.type, "x")
    b = Builder(g)
    w = b.weight(layer.weight_name, layer.weight)
    bias = b.weight(f"{layer.weight_name}.bias", layer.bias) if layer.bias is not None else None
    if layer.kind == "conv2d":
        c = layer.conv
        y = b.call(aten.convolution, x, w, bias, c["stride"], c["padding"], c["dilation"], False, [0, 0], c["groups"])
    else:
        y = b.call(aten.linear, x, w, bias)
    g.set_outputs([y])
    return g


def layer_latencies(graph: Graph, example_inputs: tuple, precisions, group_size: int = 32,
                    reps: int = 5) -> dict[str, dict[str, int]]:
    from kiln.passes.quantize.lower import lower_graph
    from kiln.passes.quantize.mixed import applicable, apply_precision

    layers = find_layers(graph)
    xs = next(tap(graph, [layer.x for layer in layers], [tuple(example_inputs)]))
    out: dict[str, dict[str, int]] = {}
    for layer, x in zip(layers, xs):
        base = layer_graph(layer)
        name = find_layers(base)[0].name
        fns = {}
        for p in precisions:
            if not applicable(layer, p, group_size):
                continue
            g = clone_graph(base)
            apply_precision(g, [(x,)], p, frozenset([name]), group_size)
            if p in ("int8", "int4"):
                lower_graph(g, (x,), rounds=3, reps=2)
            fns[p] = to_fx(g)
        samples: dict[str, list[float]] = {p: [] for p in fns}
        with torch.no_grad():
            for fn in fns.values():
                fn(x)
            for _ in range(reps):
                for p, fn in fns.items():
                    t0 = time.perf_counter()
                    fn(x)
                    samples[p].append(time.perf_counter() - t0)
        out[layer.name] = {p: int(statistics.median(v) * 1e9) for p, v in samples.items()}
    return out
