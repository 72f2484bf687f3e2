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
  ``{target}`` whose subgraph holds the region (weights it reads are copied into it); the values the
  rest of the graph reads become the node's results.
"""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx

from kiln.ir.graph import Graph, Node, Value, map_values
from kiln.ir.ops import PARTITION, WEIGHT


def node_dag(graph: Graph) -> nx.DiGraph:
    dag = nx.DiGraph()
    for node in graph.nodes:
        dag.add_node(node)
        for v in node.inputs:
            if v.producer is not None:
                dag.add_edge(v.producer, node)
    return dag


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
        created.append(_outline_one(graph, region, f"{target}{i}", target))
    topo_sort(graph)
    return created


def topo_sort(graph: Graph) -> None:
    """Re-order nodes topologically, keeping the current order wherever it is already valid."""
    rank = {n: i for i, n in enumerate(graph.nodes)}
    graph.set_order(nx.lexicographical_topological_sort(node_dag(graph), key=rank.__getitem__))


def _outline_one(graph: Graph, region: list[Node], name: str, target: str) -> Node:
    members = set(region)
    sub = Graph(name)
    env: dict[Value, Value] = {}
    ext_inputs: list[Value] = []
    for node in region:
        for v in node.inputs:
            if v in env:
                continue
            if v.producer is not None and v.producer.op is WEIGHT:
                wname = v.producer.attrs["name"]
                sub.weights[wname] = graph.weights[wname]
                env[v] = sub.create_node(WEIGHT, (), {}, [v.type], names=[v.name], attrs={"name": wname}).output
            elif v.producer not in members:
                env[v] = sub.add_input(v.type, v.name)
                ext_inputs.append(v)
        new = sub.create_node(node.op, map_values(node.args, env.__getitem__),
                              {k: map_values(a, env.__getitem__) for k, a in node.kwargs.items()},
                              [r.type for r in node.results], names=[r.name for r in node.results],
                              attrs=node.attrs, subgraph=node.subgraph)
        env.update(zip(node.results, new.results))
    graph_outs = {id(o) for o in graph.outputs}
    escaping = [r for node in region for r in node.results
                if id(r) in graph_outs or any(u not in members for u in r.uses)]
    sub.set_outputs([env[r] for r in escaping])
    index = graph.index_of(region[-1]) + 1
    part = graph.create_node(PARTITION, ext_inputs, {}, [r.type for r in escaping],
                             names=[f"{name}_{r.name}" for r in escaping], attrs={"target": target},
                             subgraph=sub, index=index)
    for old, new in zip(escaping, part.results):
        graph.replace_all_uses(old, new)
    graph.erase_many(region)
    # weights only this region read are now dead at the top level
    for node in list(graph.nodes):
        if node.op is WEIGHT and not node.output.uses and all(o is not node.output for o in graph.outputs):
            graph.erase(node)
    return part
