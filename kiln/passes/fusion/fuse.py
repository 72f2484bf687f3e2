"""The ``fuse`` pass: greedy fusion of kernels into ``kiln.fused`` groups (after Inductor's scheduler).

Contract:
- ``find_groups(graph, policy, kinds) -> list[FusionGroup]`` plans without changing the graph. Every
  kernel node starts as its own group; candidate merges are pairs of groups joined by a data edge
  (producer-consumer) or reading a common input (siblings). A candidate is kept if the merged set is
  legal (``legality.plan_group``; its kind and the kinds of its parts are in ``kinds``) and the policy
  scores it (``policy.FusionPolicy``). Then, like Inductor, the best-scoring candidate is taken
  repeatedly until none is left: a merge that would create a cycle between groups is dropped, and every
  merge proposes the new group's own candidates. Cycles are checked incrementally: groups keep a
  topological order, a merge of A before B searches only the groups between them, and that search also
  gives the new order (Pearce-Kelly), so a ~1000-kernel graph plans in well under a second per merge
  wave rather than re-checking the whole graph per candidate.
- ``outline_group(graph, group, name)`` makes one ``kiln.fused`` node with ``group.plan.attrs``
  (``kind``, ``structure``, ``numel``..., see ``legality``) holding the group's kernels and the views
  between them; a view that is also read outside the group is duplicated for the outside readers, so a
  group never writes a view's copy.
- ``Fuse`` (registered as ``fuse``; options ``policy`` and ``kinds``) plans and outlines every group
  of two or more kernels. Existing region nodes (e.g. an attention group) are left alone and never
  extended; subgraphs are not entered. Stats: ``groups``, ``by_kind``, ``kernels_before``,
  ``kernels_after``. The result verifies, prints and parses, and runs like the input (the reference
  executes each group's subgraph).
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from dataclasses import dataclass, field

import networkx as nx

from kiln.errors import KilnInputError
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.ops import FUSED, WEIGHT
from kiln.ir.outline import outline_region
from kiln.passes.analysis import is_kernel
from kiln.passes.base import Pass, PassContext, PassResult, register_pass
from kiln.passes.fusion.kernels import KernelGraph
from kiln.passes.fusion.legality import FUSION_KINDS, GroupPlan, Illegal, fusible, plan_group
from kiln.passes.fusion.policy import Candidate, DefaultPolicy, FusionPolicy, GroupView


@dataclass(frozen=True)
class FusionGroup:
    members: frozenset[Node]   # kernel nodes (views between them join at outlining)
    plan: GroupPlan


@dataclass
class _Group:
    gid: int
    members: frozenset[Node]
    plan: GroupPlan | None
    io: int
    flops: int
    reads: frozenset[Value]


@dataclass(order=True)
class _Entry:
    key: tuple
    a: int = field(compare=False)
    b: int = field(compare=False)
    group: _Group = field(compare=False)


class _Greedy:
    def __init__(self, kg: KernelGraph, policy: FusionPolicy, kinds: tuple[str, ...]):
        self.kg, self.policy, self.kinds = kg, policy, kinds
        self.groups: dict[int, _Group] = {}
        self.of: dict[Node, int] = {}
        self.ids = itertools.count()
        for k in kg.kernels:
            gid = next(self.ids)
            members = frozenset((k,))
            self.groups[gid] = _Group(gid, members, None, kg.io_bytes(members), kg.flops(k),
                                      frozenset(kg.external_reads(members)))
            self.of[k] = gid
        self.succ = {g: {self.of[s] for s in kg.succs[k]} for k, g in self.of.items()}
        self.pred = {g: {self.of[p] for p in kg.preds[k]} for k, g in self.of.items()}
        self.order: list[int | None] = [self.of[k] for k in kg.kernels]
        self.pos = {g: i for i, g in enumerate(self.order)}
        self.readers: dict[Value, set[int]] = {}
        for g in self.groups.values():
            for v in g.reads:
                self.readers.setdefault(v, set()).add(g.gid)
        self.heap: list[_Entry] = []
        self.tick = itertools.count()
        self.tried: set[tuple[int, int]] = set()

    # -- candidates --------------------------------------------------------------------------------
    def _fusible(self, g: _Group) -> bool:
        return g.plan is not None or fusible(self.kg, next(iter(g.members)))

    def _view(self, g: _Group) -> GroupView:
        kind = g.plan.kind if g.plan is not None else self.kg.classes[next(iter(g.members))].kind.value
        ops = tuple(n.op.name for n in sorted(g.members, key=self.kg.index.__getitem__))
        return GroupView(kind, ops, len(g.members), g.flops, g.io)

    def propose(self, gid: int) -> None:
        g = self.groups[gid]
        if not self._fusible(g):
            return
        near = set(self.succ[gid]) | self.pred[gid]
        for v in g.reads:
            near |= self.readers.get(v, set())
        near.discard(gid)
        for h in sorted(near, key=self.pos.__getitem__):
            self._evaluate(gid, h)

    def _evaluate(self, x: int, y: int) -> None:
        a, b = (x, y) if self.pos[x] < self.pos[y] else (y, x)
        if (a, b) in self.tried:
            return
        self.tried.add((a, b))
        ga, gb = self.groups[a], self.groups[b]
        if not self._fusible(gb) or not self._fusible(ga):
            return
        members = ga.members | gb.members
        plan = plan_group(self.kg, members)
        if isinstance(plan, Illegal) or plan.kind not in self.kinds or any(p not in self.kinds for p in plan.parts):
            return
        merged = _Group(-1, members, plan, self.kg.io_bytes(members), ga.flops + gb.flops,
                        frozenset(self.kg.external_reads(members)))
        first = min(self.kg.index[n] for n in ga.members)
        second = min(self.kg.index[n] for n in gb.members)
        cand = Candidate(self._view(ga), self._view(gb),
                         "producer-consumer" if b in self.succ[a] else "siblings", plan.kind, dict(plan.attrs),
                         kernels=len(members), flops=merged.flops, io_bytes=merged.io,
                         bytes_saved=ga.io + gb.io - merged.io, distance=abs(second - first))
        score = self.policy.score(cand)
        if score is not None:
            heapq.heappush(self.heap, _Entry((-score, next(self.tick)), a, b, merged))

    # -- cycles and order --------------------------------------------------------------------------
    def _between(self, a: int, b: int) -> set[int] | None:
        """Groups strictly between a and b (in order) reachable from a; None if one of them reaches b,
        i.e. merging a and b would close a cycle through it."""
        limit = self.pos[b]
        stack = [s for s in self.succ[a] if s != b and self.pos[s] < limit]
        seen = set(stack)
        while stack:
            g = stack.pop()
            for s in self.succ[g]:
                if s == b:
                    return None
                if s not in seen and self.pos[s] < limit:
                    seen.add(s)
                    stack.append(s)
        return seen

    def _merge(self, a: int, b: int, merged: _Group, descendants: set[int]) -> int:
        gid = next(self.ids)
        merged.gid = gid
        self.groups[gid] = merged
        for k in merged.members:
            self.of[k] = gid
        self.succ[gid] = (self.succ.pop(a) | self.succ.pop(b)) - {a, b}
        self.pred[gid] = (self.pred.pop(a) | self.pred.pop(b)) - {a, b}
        for s in self.succ[gid]:
            self.pred[s] -= {a, b}
            self.pred[s].add(gid)
        for p in self.pred[gid]:
            self.succ[p] -= {a, b}
            self.succ[p].add(gid)
        # new order: [.. before a] + between-but-not-descendants + merged + descendants + [after b ..]
        # (a hole keeps every other position valid)
        pa, pb = self.pos[a], self.pos[b]
        middle = [g for g in self.order[pa + 1:pb] if g is not None]
        seq = [g for g in middle if g not in descendants] + [gid] + [g for g in middle if g in descendants]
        self.order[pa:pb + 1] = [None] * (pb - pa + 1 - len(seq)) + seq
        del self.pos[a], self.pos[b]
        for i in range(pb + 1 - len(seq), pb + 1):
            self.pos[self.order[i]] = i
        for v in self.groups[a].reads | self.groups[b].reads:
            self.readers[v] -= {a, b}
        for v in merged.reads:
            self.readers.setdefault(v, set()).add(gid)
        del self.groups[a], self.groups[b]
        return gid

    def run(self) -> list[FusionGroup]:
        for gid in list(self.order):
            self.propose(gid)  # type: ignore[arg-type]  (no holes yet)
        while self.heap:
            entry = heapq.heappop(self.heap)
            if entry.a not in self.groups or entry.b not in self.groups:
                continue
            # earlier merges may have re-ordered the two groups since the candidate was made
            a, b = sorted((entry.a, entry.b), key=self.pos.__getitem__)
            descendants = self._between(a, b)
            if descendants is None:
                continue
            self.propose(self._merge(a, b, entry.group, descendants))
        return [FusionGroup(self.groups[g].members, self.groups[g].plan) for g in self.order
                if g is not None and self.groups[g].plan is not None]


def find_groups(graph: Graph, policy: FusionPolicy | None = None,
                kinds: tuple[str, ...] = FUSION_KINDS) -> list[FusionGroup]:
    unknown = set(kinds) - set(FUSION_KINDS)
    if unknown:
        raise KilnInputError(f"unknown fusion kind(s) {sorted(unknown)}; kinds: {', '.join(FUSION_KINDS)}")
    return _Greedy(KernelGraph(graph), policy or DefaultPolicy(), tuple(kinds)).run()


def _free(node: Node) -> bool:
    return not is_kernel(node) and node.op is not WEIGHT


def _views_between(graph: Graph, members: frozenset[Node]) -> list[Node]:
    """Free nodes on a path from a member to a member (all such paths are free-only inside a group)."""
    forward: set[Node] = set()
    stack = [u for m in members for r in m.results for u in r.uses if _free(u)]
    while stack:
        n = stack.pop()
        if n not in forward:
            forward.add(n)
            stack.extend(u for r in n.results for u in r.uses if _free(u))
    backward: set[Node] = set()
    stack = [v.producer for m in members for v in m.inputs if v.producer is not None and _free(v.producer)]
    while stack:
        n = stack.pop()
        if n not in backward:
            backward.add(n)
            stack.extend(v.producer for v in n.inputs if v.producer is not None and _free(v.producer))
    return [n for n in graph.nodes if n in forward and n in backward]


def outline_group(graph: Graph, group: FusionGroup, name: str) -> Node:
    views = _views_between(graph, group.members)
    inside = set(group.members) | set(views)
    for view in reversed(views):
        outside = [u for u in view.users if u not in inside]
        returned = [r for r in view.results if any(o is r for o in graph.outputs)]
        if not outside and not returned:
            continue
        # the outside readers get their own copy, placed just before the first of them (after the group)
        at = min((graph.index_of(u) for u in outside), default=len(graph.nodes))
        copy = graph.create_node(view.op, view.args, view.kwargs, [r.type for r in view.results],
                                 names=[r.name for r in view.results], attrs=view.attrs, index=at)
        for old, new in zip(view.results, copy.results):
            for user in outside:
                user.replace_input(old, new)
            graph.outputs = [new if o is old else o for o in graph.outputs]
    return outline_region(graph, inside, FUSED, dict(group.plan.attrs), name)


def order_contiguously(graph: Graph, groups: list[FusionGroup]) -> None:
    """Re-order the graph so that each group's kernels and the views between them are contiguous (a
    topological order exists: groups are acyclic). Outlining then never has to re-sort the graph."""
    unit: dict[Node, object] = {}
    for i, group in enumerate(groups):
        for n in (*group.members, *_views_between(graph, group.members)):
            unit.setdefault(n, i)
    dag = nx.DiGraph()
    rank: dict[object, int] = {}
    members: dict[object, list[Node]] = {}
    for index, node in enumerate(graph.nodes):
        u = unit.get(node, node)
        rank.setdefault(u, index)
        members.setdefault(u, []).append(node)
        dag.add_node(u)
        for v in node.inputs:
            if v.producer is not None:
                p = unit.get(v.producer, v.producer)
                if p != u:
                    dag.add_edge(p, u)
    graph.set_order(n for u in nx.lexicographical_topological_sort(dag, key=rank.__getitem__) for n in members[u])


@register_pass("fuse")
@dataclass(frozen=True)
class Fuse(Pass):
    """Greedy kernel fusion into ``kiln.fused`` groups (pointwise, reduction, epilogue, horizontal)."""

    policy: FusionPolicy = DefaultPolicy()
    kinds: tuple[str, ...] = FUSION_KINDS

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        before = sum(1 for n in graph.nodes if is_kernel(n))
        groups = find_groups(graph, self.policy, self.kinds)
        by_kind = Counter(g.plan.kind for g in groups)
        if groups:
            order_contiguously(graph, groups)
        for i, group in enumerate(groups):
            outline_group(graph, group, f"{group.plan.kind}_{i}")
        after = sum(1 for n in graph.nodes if is_kernel(n))
        return PassResult(changed=bool(groups), stats={"groups": len(groups), "by_kind": dict(by_kind),
                                                       "kernels_before": before, "kernels_after": after})
