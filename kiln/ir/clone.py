"""Deep copy of a graph (nodes, values, subgraphs); weight tensors are shared, not copied.

Contract: ``clone_graph(graph) -> Graph`` prints identically to ``graph`` and shares no Value or Node
with it, so passes and the partitioner can work on a copy while the caller keeps the original.
"""

from __future__ import annotations

from kiln.ir.graph import Graph, Value, map_values


def clone_graph(graph: Graph) -> Graph:
    g = Graph(graph.name)
    g.weights = dict(graph.weights)
    g.meta = dict(graph.meta)
    env: dict[Value, Value] = {}
    for v in graph.inputs:
        env[v] = g.add_input(v.type, v.name)
    for node in graph.nodes:
        new = g.create_node(node.op, map_values(node.args, env.__getitem__),
                            {k: map_values(a, env.__getitem__) for k, a in node.kwargs.items()},
                            [r.type for r in node.results], names=[r.name for r in node.results],
                            attrs=dict(node.attrs),
                            subgraph=clone_graph(node.subgraph) if node.subgraph is not None else None)
        new.meta = dict(node.meta)
        env.update(zip(node.results, new.results))
    g.set_outputs(env[v] for v in graph.outputs)
    return g
