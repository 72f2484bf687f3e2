"""Liveness: the buffers a schedule (an order of a graph's compute nodes) must hold, and its peak.

Contract:
- A *compute node* is any node that is not ``kiln.weight``. An *order* is a list of the graph's compute
  nodes; step ``i`` runs ``order[i]``. An order may also contain the graph's ``kiln.weight`` nodes, but then
  it must contain all of them: they are dropped before steps are numbered (a weight has no inputs, so any
  position is valid, and weights are never arena buffers). ``validate_order`` raises ``KilnError`` unless
  the order is a topological order of the compute nodes under that rule, where side-effecting nodes must
  also keep their program order (they are chained by effect edges).
- ``buffers_for_order(graph, order, include_inputs=False)`` returns one ``Buffer`` per tensor result of a
  compute node (a multi-result node gives one buffer per tensor result; ``NoneType`` and scalar results
  hold no memory): ``size`` is the type's ``nbytes()`` (static shapes required, a symbolic shape raises
  ``KilnError`` naming the value), ``start`` is the producer's step, ``end`` the last step among its
  consumers, a graph output lives to the last step, and a value nobody reads still occupies its
  producer's step. With ``include_inputs=True`` graph inputs are buffers too, live from step 0 to their
  last use (an unread, non-output input occupies step 0 only). Buffer names are value names.
- Aliasing: in real PyTorch views (``aten.view``, ``_unsafe_view``, ``expand``, ``permute``, ``t``,
  ``slice``, ``select``, ``squeeze``/``unsqueeze``, ``alias``...) share their input's storage. kiln's
  planned-arena model does not: every value gets its own buffer, as if every op materialised its result.
  This over-counts view-heavy graphs, but it is the model a planner that materialises views must meet.
  A region node (``kiln.fused``/``kiln.partition``) counts only its results, not its subgraph's temporaries.
- ``peak_memory(graph, order)`` is the max over steps of live bytes, i.e. ``live_bytes_lower_bound`` of
  the buffers; ``footprint_lower_bound(graph)`` is a bound valid for every order: the max over compute
  nodes of the bytes of the distinct activation inputs it reads plus its outputs (all live at its step),
  of the bytes of all graph outputs (all live at the last step) and, with ``include_inputs``, of all
  graph inputs (all live at step 0).
- Helpers shared with ``ordering``: ``compute_nodes(graph)``, ``dependencies(graph)`` (compute node ->
  the compute nodes it must follow, data and effect edges) and ``tensor_bytes(value)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from kiln.errors import KilnError
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.ops import WEIGHT
from kiln.ir.types import TensorType
from kiln.scheduler.buffers import Buffer, live_bytes_lower_bound


def compute_nodes(graph: Graph) -> list[Node]:
    """The graph's nodes that take a step in a schedule: all but ``kiln.weight``, in program order."""
    return [n for n in graph.nodes if n.op is not WEIGHT]


def tensor_bytes(v: Value) -> int | None:
    """Bytes of a tensor value, ``None`` for a non-tensor; a symbolic shape raises ``KilnError``."""
    if not isinstance(v.type, TensorType):
        return None
    if not v.type.is_static:
        raise KilnError(f"value %{v.name} has a symbolic shape {v.type.shape}; memory planning needs "
                        f"static shapes (specialize the graph first)")
    return int(v.type.nbytes())


def dependencies(graph: Graph) -> dict[Node, list[Node]]:
    """Compute node -> compute nodes it must run after: producers of its inputs (any type, weights
    excluded), and the previous side-effecting node for a side-effecting one. Program-ordered, distinct."""
    deps: dict[Node, list[Node]] = {}
    last_effect: Node | None = None
    for n in compute_nodes(graph):
        preds = [v.producer for v in n.inputs if v.producer is not None and v.producer.op is not WEIGHT]
        if n.op.side_effects:
            if last_effect is not None:
                preds.append(last_effect)
            last_effect = n
        deps[n] = list(dict.fromkeys(preds))
    return deps


def validate_order(graph: Graph, order: Sequence[Node]) -> None:
    """Raise ``KilnError`` unless ``order`` is a topological order of the graph's compute nodes."""
    deps = dependencies(graph)
    weights = [n for n in order if n.op is WEIGHT]
    graph_weights = [n for n in graph.nodes if n.op is WEIGHT]
    if weights and (len(weights) != len(graph_weights) or set(weights) != set(graph_weights)):
        raise KilnError(f"order holds {len(weights)} kiln.weight node(s) but @{graph.name} has "
                        f"{len(graph_weights)}: include each weight once, or none")
    pos: dict[Node, int] = {}
    for n in order:
        if n.op is WEIGHT:
            continue
        if n not in deps:
            raise KilnError(f"order holds {n!r}, which is not a compute node of @{graph.name}")
        if n in pos:
            raise KilnError(f"order holds {n!r} twice")
        pos[n] = len(pos)
    missing = [n for n in deps if n not in pos]
    if missing:
        raise KilnError(f"order misses {len(missing)} compute node(s) of @{graph.name}, e.g. {missing[0]!r}")
    for n, preds in deps.items():
        for p in preds:
            if pos[p] > pos[n]:
                what = "side effect" if p not in _producers(n) else "input"
                raise KilnError(f"order runs {n!r} at step {pos[n]} before {p!r} (step {pos[p]}), "
                                f"which it depends on ({what})")


def _producers(n: Node) -> set[Node]:
    return {v.producer for v in n.inputs if v.producer is not None}


def buffers_for_order(graph: Graph, order: Sequence[Node], include_inputs: bool = False) -> list[Buffer]:
    validate_order(graph, order)
    steps = [n for n in order if n.op is not WEIGHT]
    pos = {n: i for i, n in enumerate(steps)}
    last = max(len(steps) - 1, 0)
    outputs = {id(v) for v in graph.outputs}

    def lifetime(v: Value, start: int) -> tuple[int, int]:
        end = last if id(v) in outputs else max((pos[u] for u in v.users), default=start)
        return start, max(end, start)

    buffers: list[Buffer] = []
    if include_inputs:
        for v in graph.inputs:
            size = tensor_bytes(v)
            if size is not None:
                buffers.append(Buffer(v.name, size, *lifetime(v, 0)))
    for n in steps:
        for r in n.results:
            size = tensor_bytes(r)
            if size is not None:
                buffers.append(Buffer(r.name, size, *lifetime(r, pos[n])))
    return buffers


def peak_memory(graph: Graph, order: Sequence[Node], include_inputs: bool = False) -> int:
    return live_bytes_lower_bound(buffers_for_order(graph, order, include_inputs))


def footprint_lower_bound(graph: Graph, include_inputs: bool = False) -> int:
    def is_activation(v: Value) -> bool:
        return (v.producer is not None and v.producer.op is not WEIGHT) or (v.producer is None and include_inputs)

    bound = 0
    for n in compute_nodes(graph):
        reads = {id(v): v for v in n.inputs if is_activation(v)}
        live = [*reads.values(), *n.results]
        bound = max(bound, sum(tensor_bytes(v) or 0 for v in live))
    outs = {id(v): v for v in graph.outputs if is_activation(v)}
    bound = max(bound, sum(tensor_bytes(v) or 0 for v in outs.values()))
    if include_inputs:
        bound = max(bound, sum(tensor_bytes(v) or 0 for v in graph.inputs))
    return bound
