"""The partitioner: cut a graph into maximal backend-supported regions.

Contract:
- ``partition(graph, supports) -> list[list[Node]]`` groups the supported nodes into regions, each
  *convex* (no path leaves a region and comes back), so outlining a region never creates a cycle.
  Method: on the node DAG (networkx), each supported node gets the level ``u`` = the largest number of
  unsupported nodes on any path from a graph input to it; a region is the set of supported nodes with
  the same ``u``. Any path between two nodes of a region passes only through supported nodes of that
  level, hence convexity; regions are as large as that property allows. Weight nodes are data: they
  join the region of their first supported consumer and never count as unsupported.
- ``outline(graph, regions, target)`` replaces each region in place by a ``kiln.partition`` node
  ``{target}`` (``kiln.ir.outline.outline_region``: weights it reads are copied into it; the values the
  rest of the graph reads become the node's results).
"""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx

from kiln.ir.graph import Graph, Node
from kiln.ir.ops import PARTITION, WEIGHT
from kiln.ir.outline import node_dag, outline_region, topo_sort

__all__ = ["node_dag", "outline", "partition", "topo_sort"]


def partition(graph: Graph, supports: Callable[[Node], bool]) -> list[list[Node]]:
    dag = node_dag(graph)
    level: dict[Node, int] = {}
    ok = {n: (n.op is WEIGHT or supports(n)) for n in graph.nodes}
    for node in nx.topological_sort(dag):
        level[node] = max((level[p] + (0 if ok[p] else 1) for p in dag.predecessors(node)), default=0)
    groups: dict[int, list[Node]] = {}
    for node in graph.nodes:
        if ok[node] and node.op is not WEIGHT:
            groups.setdefault(level[node], []).append(node)
    return [groups[k] for k in sorted(groups)]


def outline(graph: Graph, regions: list[list[Node]], target: str) -> list[Node]:
    """Replace each region by a kiln.partition node; returns the new nodes."""
    created = []
    for i, region in enumerate(regions):
        created.append(outline_region(graph, region, PARTITION, {"target": target}, f"{target}{i}"))
    topo_sort(graph)
    return created
