"""Builder: the convenient way to create nodes.

Contract: ``Builder(graph)`` appends; ``Builder.before(node)`` / ``Builder.after(node)`` insert at that
point and keep inserting after what they created, so a sequence of ``call``s stays in program order.
``call(op, *args, **kwargs)`` accepts an ``OpDef`` or an ``OpPacket`` (its ``default`` overload), infers
result types from fake tensors, and returns the single result Value (or the list for multi-result ops).
``weight(name, tensor)`` adds (or reuses) a ``kiln.weight`` node.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.infer import type_of_example
from kiln.ir.ops import WEIGHT, OpDef, OpPacket


def resolve(op: OpDef | OpPacket) -> OpDef:
    return op.default if isinstance(op, OpPacket) else op


class Builder:
    def __init__(self, graph: Graph, index: int | None = None):
        self.graph = graph
        self.index = index  # None: append at the end

    @classmethod
    def before(cls, node: Node) -> Builder:
        return cls(node.graph, node.graph.index_of(node))

    @classmethod
    def after(cls, node: Node) -> Builder:
        return cls(node.graph, node.graph.index_of(node) + 1)

    def _advance(self) -> None:
        if self.index is not None:
            self.index += 1

    def call(self, op: OpDef | OpPacket, *args: Any, name: str | None = None, **kwargs: Any):
        """Apply ``op``; ``name`` is a hint for a single result's name."""
        op = resolve(op)
        names = [name] if name is not None and not op.multi_result else None
        node = self.graph.create_node(op, args, kwargs, names=names, index=self.index)
        self._advance()
        return list(node.results) if op.multi_result else node.output

    def node(self, op: OpDef | OpPacket, args=(), kwargs=None, **extra) -> Node:
        """Create a node with full control (explicit result types, attrs, subgraph)."""
        node = self.graph.create_node(resolve(op), args, kwargs, index=self.index, **extra)
        self._advance()
        return node

    def weight(self, name: str, tensor: torch.Tensor) -> Value:
        for n in self.graph.nodes:
            if (n.op is WEIGHT and n.attrs.get("name") == name and self.graph.weights.get(name) is tensor
                    and (self.index is None or self.graph.index_of(n) < self.index)):
                return n.output
        self.graph.weights[name] = tensor
        index = 0 if self.index is not None else None
        node = self.graph.create_node(WEIGHT, (), {}, [type_of_example(tensor)], names=[name],
                                      attrs={"name": name}, index=index)
        if self.index is not None:
            self.index += 1
        return node.output
