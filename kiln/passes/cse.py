"""Common-subexpression elimination.

Contract: two nodes with the same op, the same arguments (Values by identity, literals by value) and
the same attributes compute the same thing if the op is pure and deterministic; the later one is
replaced by the earlier one. Weight nodes reading the same name merge. Nodes with subgraphs, side
effects or seeded randomness are never merged. One forward sweep reaches the fixpoint because
replacing a node's uses can only make later nodes equal, and they are visited later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from kiln.ir.graph import Graph, Node, Value
from kiln.passes.base import Pass, PassContext, PassResult, register_pass


def structure_key(x: Any) -> Any:
    """A hashable key for an argument structure: Values by identity, literals by value and type."""
    if isinstance(x, Value):
        return ("%", id(x))
    if isinstance(x, (list, tuple)):
        return ("[", tuple(structure_key(o) for o in x))
    if isinstance(x, dict):
        return ("{", tuple(sorted((k, structure_key(v)) for k, v in x.items())))
    if isinstance(x, float):
        # 1 and 1.0 differ in type promotion; 0.0 and -0.0 compare equal but are not (1 / -0.0 = -inf)
        return ("f", "nan" if math.isnan(x) else (x, math.copysign(1.0, x)))
    if isinstance(x, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return ("t", str(x))
    return (type(x).__name__, x)


def node_key(node: Node) -> Any | None:
    if node.subgraph is not None or node.op.side_effects or node.op.nondeterministic:
        return None
    return (node.op.name, structure_key(node.args), structure_key(node.kwargs), structure_key(node.attrs))


def eliminate_common_subexpressions(graph: Graph) -> int:
    seen: dict[Any, Node] = {}
    merged = 0
    for node in list(graph.nodes):
        if node.subgraph is not None:
            merged += eliminate_common_subexpressions(node.subgraph)
        key = node_key(node)
        if key is None:
            continue
        first = seen.get(key)
        if first is None:
            seen[key] = node
            continue
        for old, new in zip(node.results, first.results):
            graph.replace_all_uses(old, new)
        graph.erase(node)
        merged += 1
    return merged


@register_pass("cse")
@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        n = eliminate_common_subexpressions(graph)
        return PassResult(changed=n > 0, stats={"merged": n})
