"""The kernel graph fusion works on: kernel nodes and the data edges between them, seen through views.

Contract:
- ``KernelGraph(graph)`` indexes a graph's top-level kernel nodes (``analysis.is_kernel``) in graph order.
  Views, ``sym.*`` ops and weights are *free*: they are not kernels, and an edge through them
  (``mm -> view -> relu``) is an edge between the kernels at its ends.
- ``sources(value)``: the kernel results a value is computed from through free nodes (a kernel result is
  its own source; graph inputs and weights have none). ``preds[k]``/``succs[k]``: kernel-level edges.
  ``consumers[r]``: the kernels that read kernel result ``r``; ``returned``: kernel results that reach a
  graph output.
- For a set of member kernels: ``escaping(members)`` are the member results read outside it or returned
  (what a fused node must write), ``external_reads(members)`` the distinct input values computed outside
  it (what it must read, weights included), ``io_bytes(members)`` the bytes of both, ``internal(members,
  value)`` whether a value is computed inside it. Free nodes between members belong to the group (see
  ``fuse.outline_group``), so none of these count them as memory traffic.
- ``flops(k)``: from ``analysis.node_cost`` (PyTorch's formulas), or the element count when a shape is
  symbolic. Everything is computed once per graph; a ``KernelGraph`` is stale after the graph changes.
"""

from __future__ import annotations

from collections.abc import Iterable

from kiln.errors import KilnError
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.types import TensorType
from kiln.passes.analysis import is_kernel, node_cost
from kiln.passes.fusion.classify import OpClass, classify, iteration_numel, nbytes, reduced_dims, rows, size_hint


class KernelGraph:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.kernels: list[Node] = [n for n in graph.nodes if is_kernel(n)]
        self.index: dict[Node, int] = {n: i for i, n in enumerate(self.kernels)}
        self.classes: dict[Node, OpClass] = {n: classify(n) for n in self.kernels}
        self.ins: dict[Node, list[Value]] = {n: n.inputs for n in self.kernels}  # ``Node.inputs`` rebuilds a list
        self._sources: dict[Value, frozenset[Value]] = {}
        for v in graph.inputs:
            self._sources[v] = frozenset()
        for node in graph.nodes:
            if node in self.index:
                for r in node.results:
                    self._sources[r] = frozenset((r,))
            else:
                srcs = frozenset().union(*(self._sources[v] for v in node.inputs)) if node.inputs else frozenset()
                for r in node.results:
                    self._sources[r] = srcs
        self.preds: dict[Node, set[Node]] = {k: set() for k in self.kernels}
        self.succs: dict[Node, set[Node]] = {k: set() for k in self.kernels}
        self.consumers: dict[Value, set[Node]] = {}
        for k in self.kernels:
            for v in self.ins[k]:
                for src in self._sources[v]:
                    self.consumers.setdefault(src, set()).add(k)
                    self.preds[k].add(src.producer)
                    self.succs[src.producer].add(k)
        self.returned: set[Value] = {s for o in graph.outputs for s in self._sources[o]}
        self._flops: dict[Node, int] = {}
        self._rows: dict[Node, tuple[tuple[int, int], tuple[int, ...]]] = {}

    def sources(self, value: Value) -> frozenset[Value]:
        return self._sources[value]

    def internal(self, members: Iterable[Node] | frozenset[Node], value: Value) -> bool:
        return any(s.producer in members for s in self._sources[value])

    def escaping(self, members: frozenset[Node]) -> list[Value]:
        out = []
        for k in sorted(members, key=self.index.__getitem__):
            for r in k.results:
                if r in self.returned or any(c not in members for c in self.consumers.get(r, ())):
                    out.append(r)
        return out

    def external_reads(self, members: frozenset[Node]) -> list[Value]:
        seen: dict[Value, None] = {}
        for k in sorted(members, key=self.index.__getitem__):
            for v in self.ins[k]:
                if isinstance(v.type, TensorType) and v not in seen and not self.internal(members, v):
                    seen[v] = None
        return list(seen)

    def io_bytes(self, members: frozenset[Node]) -> int:
        return sum(map(nbytes, self.external_reads(members))) + sum(map(nbytes, self.escaping(members)))

    def rows(self, k: Node) -> tuple[int, int]:
        """(R, K) of a reducing kernel (``classify.rows``), cached."""
        return self._reduction(k)[0]

    def reduced_dims(self, k: Node) -> tuple[int, ...]:
        return self._reduction(k)[1]

    def _reduction(self, k: Node):
        if k not in self._rows:
            self._rows[k] = (rows(k), reduced_dims(k))
        return self._rows[k]

    def flops(self, k: Node) -> int:
        if k not in self._flops:
            try:
                self._flops[k] = node_cost(k).flops
            except KilnError:  # symbolic shapes: count elements instead
                self._flops[k] = size_hint(iteration_numel(k))
        return self._flops[k]
