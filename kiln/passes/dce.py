"""Dead-code elimination: erase nodes whose results are unused and that have no side effects.

Contract: one reverse sweep (so chains of dead nodes go at once), recursing into subgraphs; weights
that no node reads any more are dropped from ``graph.weights``. Graph inputs are never removed.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.ir.graph import Graph
from kiln.ir.ops import WEIGHT
from kiln.ir.rewrite import is_dead
from kiln.passes.base import Pass, PassContext, PassResult, register_pass


def eliminate_dead_code(graph: Graph) -> int:
    removed = 0
    for node in reversed(list(graph.nodes)):
        if is_dead(graph, node):
            graph.erase(node)
            removed += 1
        elif node.subgraph is not None:
            removed += eliminate_dead_code(node.subgraph)
    used = {n.attrs["name"] for n in graph.nodes if n.op is WEIGHT}
    for name in [w for w in graph.weights if w not in used]:
        del graph.weights[name]
    return removed


@register_pass("dce")
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        n = eliminate_dead_code(graph)
        return PassResult(changed=n > 0, stats={"removed": n})
