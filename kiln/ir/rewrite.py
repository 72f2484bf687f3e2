"""Typed rewrite patterns and the greedy walker that applies them to a fixpoint.

Contract:
- A pattern is a method decorated with ``@pattern(op, ...)`` (``OpPacket``s match every overload) with
  signature ``(self, node, rw: Rewriter) -> bool``; it returns True iff it changed the graph. The walker
  only calls it on nodes whose op matches, so the body never re-checks the root op.
- ``apply_patterns(graph, patterns, max_rewrites=100_000) -> int`` runs a worklist in program order:
  after a rewrite, the users of changed values and new nodes are revisited; nodes left dead and free of
  side effects are erased. It stops at a fixpoint (or raises if ``max_rewrites`` is hit, which means
  two patterns undo each other).
- ``Rewriter`` inserts new nodes before the node being rewritten (``rw.call``), replaces uses, erases.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kiln.errors import KilnError
from kiln.ir.builder import Builder
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.ops import OpDef, OpPacket


def pattern(*ops: OpDef | OpPacket):
    if not ops:
        raise TypeError("@pattern needs at least one op to match")

    def mark(fn):
        fn._kiln_pattern_ops = ops
        return fn

    return mark


@dataclass
class BoundPattern:
    ops: tuple
    fn: Callable[[Node, Rewriter], bool]
    name: str

    def matches(self, node: Node) -> bool:
        return any(node.is_a(op) for op in self.ops)


def collect_patterns(obj) -> list[BoundPattern]:
    """The @pattern methods of an object (e.g. a RewritePass), bound, in definition order."""
    out = []
    for name in dir(type(obj)):
        fn = getattr(type(obj), name, None)
        ops = getattr(fn, "_kiln_pattern_ops", None)
        if ops:
            out.append(BoundPattern(ops, getattr(obj, name), f"{type(obj).__name__}.{name}"))
    out.sort(key=lambda p: p.fn.__func__.__code__.co_firstlineno)
    return out


class Rewriter:
    def __init__(self, graph: Graph, node: Node):
        self.graph = graph
        self.node = node
        self.created: list[Node] = []
        self.touched: list[Value] = []

    def call(self, op, *args, **kwargs):
        b = Builder.before(self.node)
        out = b.call(op, *args, **kwargs)
        self.created.append(self.graph.nodes[b.index - 1])
        return out

    def weight(self, name, tensor) -> Value:
        return Builder.before(self.node).weight(name, tensor)

    def replace_all_uses(self, old: Value, new: Value) -> None:
        self.touched.append(new)
        self.graph.replace_all_uses(old, new)

    def replace_node(self, node: Node, new_values: Iterable[Value]) -> None:
        new_values = list(new_values)
        if len(new_values) != len(node.results):
            raise KilnError(f"replace_node: {node!r} has {len(node.results)} results, got {len(new_values)}")
        for old, new in zip(node.results, new_values):
            self.replace_all_uses(old, new)
        self.erase(node)

    def erase(self, node: Node) -> None:
        self.graph.erase(node)


def is_dead(graph: Graph, node: Node) -> bool:
    if node.op.side_effects:
        return False
    outs = {id(v) for v in graph.outputs}
    return all(not r.uses and id(r) not in outs for r in node.results)


def apply_patterns(graph: Graph, patterns: list[BoundPattern], max_rewrites: int = 100_000) -> int:
    worklist: list[Node] = list(reversed(graph.nodes))
    queued = set(map(id, worklist))
    rewrites = 0
    while worklist:
        node = worklist.pop()
        queued.discard(id(node))
        if node.graph is not graph:
            continue
        for p in patterns:
            if not p.matches(node):
                continue
            operands = [v.producer for v in node.inputs if v.producer is not None]
            rw = Rewriter(graph, node)
            if not p.fn(node, rw):
                continue
            rewrites += 1
            if rewrites > max_rewrites:
                raise KilnError(f"rewrite patterns did not converge after {max_rewrites} rewrites "
                                f"(last: {p.name}); two patterns probably undo each other")
            revisit = list(rw.created)
            for v in rw.touched:
                revisit.extend(v.users)
            if node.graph is graph:
                if is_dead(graph, node):  # e.g. the pattern only redirected its uses
                    graph.erase(node)
                else:
                    revisit.append(node)
            for cand in operands:  # producers may now be dead
                if cand.graph is graph and is_dead(graph, cand):
                    graph.erase(cand)
            for n in reversed(revisit):
                if id(n) not in queued and n.graph is graph:
                    worklist.append(n)
                    queued.add(id(n))
            break
    return rewrites
