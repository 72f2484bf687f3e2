"""Regions: move a set of nodes into a node that holds them as its subgraph (``kiln.fused``,
``kiln.partition``), and the DAG queries that say when that is legal.

Contract:
- ``node_dag(graph)`` is the networkx DiGraph of data edges between the graph's nodes (producer ->
  consumer); ``topo_sort(graph)`` re-orders nodes topologically, keeping the current order wherever it is
  already valid.
- ``is_convex(graph, nodes)`` is True iff no path leaves the set and comes back into it; only then can
  the set become one node without creating a cycle. ``cycle_witness`` returns such an outside node (or
  None).
- ``outline_region(graph, nodes, op, attrs, name)`` replaces ``nodes`` (convex, non-empty, in any order)
  by one node of ``op`` whose subgraph holds copies of them in graph order: weights they read are copied
  into the subgraph (the tensors are shared, not cloned), other values from outside become subgraph
  inputs (in first-use order), and every result read outside the region (or a graph output) becomes a
  result of the new node (in region order). The new node takes the place of the region's last node;
  ``topo_sort`` is run when needed. Weights only the region read are erased at the top level.
  A non-convex region raises ``KilnError`` naming the outside node on the cycle.
- ``inline_region(graph, node)`` is the inverse: ``node``'s subgraph is copied into ``graph`` in its place
  (its inputs bound to the node's arguments, its weights to weight nodes of ``graph``, sharing the
  tensors), every use of the node's results is redirected to the copies, ``node`` is erased, and the new
  nodes are returned in order. A subgraph weight whose name ``graph`` holds for another tensor gets a
  fresh name.
"""

from __future__ import annotations

from collections.abc import Iterable

import networkx as nx

from kiln.errors import KilnError
from kiln.ir.graph import Graph, Node, Value, map_values
from kiln.ir.ops import WEIGHT, OpDef


def node_dag(graph: Graph) -> nx.DiGraph:
    dag = nx.DiGraph()
    for node in graph.nodes:
        dag.add_node(node)
        for v in node.inputs:
            if v.producer is not None:
                dag.add_edge(v.producer, node)
    return dag


def topo_sort(graph: Graph) -> None:
    """Re-order nodes topologically, keeping the current order wherever it is already valid."""
    rank = {n: i for i, n in enumerate(graph.nodes)}
    graph.set_order(nx.lexicographical_topological_sort(node_dag(graph), key=rank.__getitem__))


def cycle_witness(nodes: Iterable[Node]) -> Node | None:
    """An outside node that is reachable from the set and reaches back into it, or None (convex)."""
    members = set(nodes)
    # forward from the set's outside consumers; anything that reaches a member again is a witness
    frontier = [u for n in members for r in n.results for u in r.uses if u not in members]
    seen: set[Node] = set()
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        for r in n.results:
            for u in r.uses:
                if u in members:
                    return n
                if u not in seen:
                    frontier.append(u)
    return None


def is_convex(graph: Graph, nodes: Iterable[Node]) -> bool:
    return cycle_witness(nodes) is None


def outline_region(graph: Graph, nodes: Iterable[Node], op: OpDef, attrs: dict, name: str) -> Node:
    members = set(nodes)
    if not members:
        raise KilnError(f"cannot outline an empty region as {op.name} {name!r}")
    witness = cycle_witness(members)
    if witness is not None:
        raise KilnError(f"region {name!r} is not convex: %{witness.results[0].name if witness.results else '?'} "
                        f"reads from it and feeds it")
    region = [n for n in graph.nodes if n in members]
    if len(region) != len(members):
        raise KilnError(f"region {name!r} holds nodes that are not in graph @{graph.name}")
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
        if node.op is WEIGHT:  # a weight node inside the region: its tensor goes with it
            sub.weights[node.attrs["name"]] = graph.weights[node.attrs["name"]]
        env.update(zip(node.results, new.results))
    graph_outs = {id(o) for o in graph.outputs}
    escaping = [r for node in region for r in node.results
                if id(r) in graph_outs or any(u not in members for u in r.uses)]
    sub.set_outputs([env[r] for r in escaping])
    index = graph.index_of(region[-1]) + 1
    outer = graph.create_node(op, ext_inputs, {}, [r.type for r in escaping],
                              names=[f"{name}_{r.name}" for r in escaping], attrs=dict(attrs),
                              subgraph=sub, index=index)
    for old, new in zip(escaping, outer.results):
        graph.replace_all_uses(old, new)
    graph.erase_many(region)
    # weights only this region read are now dead at the top level
    for node in list(graph.nodes):
        if node.op is WEIGHT and not node.output.uses and all(o is not node.output for o in graph.outputs):
            graph.erase(node)
    # a reader of an early region result may sit before the region's last node: restore a valid order
    pos = graph.index_of(outer)
    if any(graph.index_of(u) < pos for r in outer.results for u in r.uses):
        topo_sort(graph)
    return outer


def inline_region(graph: Graph, node: Node) -> list[Node]:
    sub = node.subgraph
    if sub is None:
        raise KilnError(f"cannot inline %{node.results[0].name if node.results else node.op.name}: "
                        f"{node.op.name} holds no subgraph")
    index = graph.index_of(node)
    env: dict[Value, Value] = dict(zip(sub.inputs, node.args))
    new_nodes: list[Node] = []
    for inner in sub.nodes:
        if inner.op is WEIGHT:
            name, tensor = inner.attrs["name"], sub.weights[inner.attrs["name"]]
            while name in graph.weights and graph.weights[name] is not tensor:
                name = graph.fresh_name(name)
            graph.weights[name] = tensor
            attrs = {**inner.attrs, "name": name}
        else:
            attrs = dict(inner.attrs)
        copy = graph.create_node(inner.op, map_values(inner.args, lambda v: env.get(v, v)),
                                 {k: map_values(a, lambda v: env.get(v, v)) for k, a in inner.kwargs.items()},
                                 [r.type for r in inner.results], names=[r.name for r in inner.results],
                                 attrs=attrs, subgraph=inner.subgraph, index=index + len(new_nodes))
        env.update(zip(inner.results, copy.results))
        new_nodes.append(copy)
    for old, inner_out in zip(node.results, sub.outputs):
        graph.replace_all_uses(old, env.get(inner_out, inner_out))
    graph.erase(node)
    return new_nodes
