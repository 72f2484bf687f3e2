"""Values, nodes and graphs: the SSA core of kiln IR.

Contract:
- A ``Graph`` has typed ``inputs`` (values with no producer), an ordered list of ``nodes`` and a list of
  ``outputs``. Node order is a topological order; passes that insert nodes keep it so.
- A ``Node`` applies an ``OpDef`` to ``args``/``kwargs``. Args mirror the op's schema: each is a literal
  (int, float, bool, str, None, torch.dtype/device/layout/memory_format), a ``Value``, or a list of those.
  ``node.inputs`` is the flat list of Values in the args, in order. A node has zero or more typed
  ``results``; ``node.attrs`` holds kiln-level attributes (e.g. a weight's name) and ``node.subgraph``
  an optional region (fused groups), isolated from above: it sees only its own inputs.
- Use tracking is exact: ``value.uses`` lists the consuming nodes (one entry per occurrence), and
  ``Graph.replace_all_uses`` rewrites args and graph outputs together.
- Weights are held by name in ``graph.weights`` (name -> torch.Tensor) and read by ``kiln.weight`` nodes;
  the text form stores only the name.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from kiln.ir.types import Type

_LIST_TYPES = (list, tuple)


class Value:
    """An SSA value: a graph input, or result ``index`` of ``producer``."""

    __slots__ = ("type", "name", "producer", "index", "uses", "graph")

    def __init__(self, type: Type, name: str, producer: Node | None = None, index: int = 0):
        self.type = type
        self.name = name
        self.producer = producer
        self.index = index
        self.uses: list[Node] = []
        self.graph: Graph | None = None

    @property
    def users(self) -> list[Node]:
        """Distinct consuming nodes, in first-use order."""
        return list(dict.fromkeys(self.uses))

    def __repr__(self) -> str:
        return f"%{self.name}"


def map_values(obj: Any, fn) -> Any:
    """Rebuild an arg structure with ``fn`` applied to each Value."""
    if isinstance(obj, Value):
        return fn(obj)
    if isinstance(obj, list):
        return [map_values(o, fn) for o in obj]
    if isinstance(obj, tuple):
        return tuple(map_values(o, fn) for o in obj)
    return obj


def iter_values(obj: Any) -> Iterator[Value]:
    if isinstance(obj, Value):
        yield obj
    elif isinstance(obj, _LIST_TYPES):
        for o in obj:
            yield from iter_values(o)


class Node:
    __slots__ = ("op", "args", "kwargs", "results", "attrs", "subgraph", "graph", "meta")

    def __init__(self, op, args: tuple, kwargs: dict[str, Any], result_types: list[Type],
                 result_names: list[str], attrs: dict[str, Any] | None = None,
                 subgraph: Graph | None = None):
        self.op = op
        self.args = tuple(args)
        self.kwargs = dict(kwargs)
        self.attrs = dict(attrs or {})
        self.subgraph = subgraph
        self.graph: Graph | None = None
        self.meta: dict[str, Any] = {}
        self.results = [Value(t, n, self, i) for i, (t, n) in enumerate(zip(result_types, result_names))]

    # -- structure -------------------------------------------------------------------------------
    @property
    def inputs(self) -> list[Value]:
        return list(iter_values(self.args)) + list(iter_values(tuple(self.kwargs.values())))

    def input(self, i: int) -> Value:
        return self.inputs[i]

    @property
    def output(self) -> Value:
        if len(self.results) != 1:
            raise ValueError(f"{self.op.name} has {len(self.results)} results; use .results")
        return self.results[0]

    def is_a(self, op) -> bool:
        """True if this node applies ``op`` (an OpDef, or an OpPacket matching any overload)."""
        return self.op is op or getattr(self.op, "packet", None) is op

    @property
    def users(self) -> list[Node]:
        return list(dict.fromkeys(u for r in self.results for u in r.uses))

    def bound_args(self) -> dict[str, Any]:
        """The arguments by schema name, defaults filled in (torch ops; others: positional indices)."""
        schema = getattr(self.op, "schema", None)
        if schema is None:
            return {**dict(enumerate(self.args)), **self.kwargs}
        out = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
        positional = [a for a in schema.arguments if not a.kwarg_only]
        out.update({a.name: v for a, v in zip(positional, self.args)})
        out.update(self.kwargs)
        return out

    def set_args(self, args: tuple, kwargs: dict[str, Any] | None = None) -> None:
        self._unlink()
        self.args = tuple(args)
        if kwargs is not None:
            self.kwargs = dict(kwargs)
        self._link()

    def replace_input(self, old: Value, new: Value) -> None:
        self.set_args(map_values(self.args, lambda v: new if v is old else v),
                      {k: map_values(a, lambda v: new if v is old else v) for k, a in self.kwargs.items()})

    def _link(self) -> None:
        for v in self.inputs:
            v.uses.append(self)

    def _unlink(self) -> None:
        for v in self.inputs:
            v.uses.remove(self)

    def __repr__(self) -> str:
        res = ", ".join(repr(r) for r in self.results)
        return f"<Node {res} = {self.op.name}>"


class Graph:
    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.nodes: list[Node] = []
        self.outputs: list[Value] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.meta: dict[str, Any] = {}
        self._names: set[str] = set()
        self._counter = itertools.count()

    # -- names -----------------------------------------------------------------------------------
    def fresh_name(self, hint: str | None = None) -> str:
        if hint:
            base = _sanitize(hint)
            if base not in self._names:
                self._names.add(base)
                return base
        while True:
            name = f"{_sanitize(hint) + '_' if hint else ''}{next(self._counter)}"
            if name not in self._names:
                self._names.add(name)
                return name

    # -- building --------------------------------------------------------------------------------
    def add_input(self, type: Type, name: str | None = None) -> Value:
        v = Value(type, self.fresh_name(name))
        v.graph = self
        self.inputs.append(v)
        return v

    def create_node(self, op, args: Iterable = (), kwargs: dict[str, Any] | None = None,
                    result_types: list[Type] | None = None, *, names: list[str] | None = None,
                    attrs: dict[str, Any] | None = None, subgraph: Graph | None = None,
                    index: int | None = None) -> Node:
        """Create a node and insert it at ``index`` (default: the end). Types are inferred if omitted."""
        args = tuple(args)
        kwargs = dict(kwargs or {})
        if result_types is None:
            result_types = op.infer(args, kwargs, attrs or {}, subgraph)
        names = names or [None] * len(result_types)
        if len(names) != len(result_types):
            raise ValueError(f"{op.name}: {len(names)} names for {len(result_types)} results")
        node = Node(op, args, kwargs, list(result_types), [self.fresh_name(n) for n in names],
                    attrs, subgraph)
        for r in node.results:
            r.graph = self
        self.insert(node, len(self.nodes) if index is None else index)
        return node

    def insert(self, node: Node, index: int) -> None:
        node.graph = self
        self.nodes.insert(index, node)
        node._link()

    def index_of(self, node: Node) -> int:
        return self.nodes.index(node)

    def set_outputs(self, values: Iterable[Value]) -> None:
        self.outputs = list(values)

    # -- mutation --------------------------------------------------------------------------------
    def replace_all_uses(self, old: Value, new: Value) -> None:
        if old is new:
            return
        for user in old.users:
            user.replace_input(old, new)
        self.outputs = [new if o is old else o for o in self.outputs]

    def set_order(self, nodes: Iterable[Node]) -> None:
        """Replace the node order by a permutation of the same nodes (checking it is one; the caller
        is responsible for it being topological — the verifier checks that)."""
        nodes = list(nodes)
        if len(nodes) != len(self.nodes) or set(map(id, nodes)) != set(map(id, self.nodes)):
            raise ValueError(f"set_order on @{self.name}: not a permutation of the graph's nodes")
        self.nodes = nodes

    def erase(self, node: Node) -> None:
        for r in node.results:
            if r.uses or any(o is r for o in self.outputs):
                raise ValueError(f"cannot erase {node!r}: result %{r.name} is still used")
        node._unlink()
        self.nodes.remove(node)
        node.graph = None
        for r in node.results:
            self._names.discard(r.name)

    def erase_many(self, nodes: Iterable[Node]) -> None:
        """Erase a set of nodes whose results are used only inside the set (e.g. a replaced region)."""
        doomed = set(nodes)
        for n in doomed:
            n._unlink()
        for n in doomed:
            for r in n.results:
                if r.uses or any(o is r for o in self.outputs):
                    raise ValueError(f"cannot erase {n!r}: result %{r.name} is still used")
        self.nodes = [n for n in self.nodes if n not in doomed]
        for n in doomed:
            n.graph = None
            for r in n.results:
                self._names.discard(r.name)

    # -- queries ---------------------------------------------------------------------------------
    def values(self) -> Iterator[Value]:
        yield from self.inputs
        for n in self.nodes:
            yield from n.results

    def find(self, op) -> list[Node]:
        return [n for n in self.nodes if n.is_a(op)]

    def __str__(self) -> str:
        from kiln.ir.printer import print_graph

        return print_graph(self)

    def __repr__(self) -> str:
        return f"<Graph @{self.name}: {len(self.inputs)} inputs, {len(self.nodes)} nodes>"


def _sanitize(name: str) -> str:
    out = "".join(c if (c.isalnum() or c == "_") else "_" for c in name)
    return out or "v"
