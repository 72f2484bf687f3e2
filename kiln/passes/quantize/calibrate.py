"""Calibration: run a kiln graph through the reference (``to_fx``) and show chosen values to observers.

Contract:
- ``tap(graph, values, batches)`` yields, for each input batch (a tuple matching ``graph.inputs``), the
  list of tensors the given values hold, computed by ``to_fx`` on a view of the graph whose outputs are
  those values (the graph itself is left as it was).
- ``calibrate(graph, observers, batches)`` feeds every ``{value: observer}`` pair on every batch.
- ``as_batches(inputs)`` normalises what users pass as calibration data: one input tuple, a list of
  tuples, or a single tensor (one-input graphs).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from kiln.errors import KilnInputError
from kiln.ir.graph import Graph, Value
from kiln.ir.to_fx import to_fx
from kiln.passes.quantize.observers import Observer


def as_batches(inputs) -> list[tuple]:
    if inputs is None:
        raise KilnInputError("quantization needs calibration inputs (a tuple of tensors or a list of them)")
    if isinstance(inputs, torch.Tensor):
        return [(inputs,)]
    if isinstance(inputs, tuple) and all(isinstance(x, torch.Tensor) for x in inputs):
        return [inputs]
    batches = []
    for b in inputs:
        batches.append((b,) if isinstance(b, torch.Tensor) else tuple(b))
    if not batches:
        raise KilnInputError("calibration inputs are empty")
    return batches


def tap(graph: Graph, values: Sequence[Value], batches: Iterable[tuple]) -> Iterator[list[torch.Tensor]]:
    saved = list(graph.outputs)
    graph.set_outputs(list(values))
    try:
        gm = to_fx(graph)
    finally:
        graph.set_outputs(saved)
    with torch.no_grad():
        for batch in batches:
            yield list(gm(*batch))


def calibrate(graph: Graph, observers: dict[Value, Observer], batches: Iterable[tuple]) -> None:
    values = list(observers)
    for outs in tap(graph, values, batches):
        for v, t in zip(values, outs):
            observers[v].observe(t)
