"""Operator ordering: topological orders of a graph's compute nodes that keep peak memory low.

Contract:
- Every ``order_*`` function takes a ``Graph`` (and ``include_inputs=False``, as in
  ``kiln.scheduler.liveness``) and returns a list of its compute nodes (``kiln.weight`` nodes excluded),
  a valid order for ``liveness.validate_order``; peak memory is ``liveness.peak_memory`` of it. All are
  deterministic: ties break by program position.
- ``order_program``: the graph's own order. ``order_bfs``, ``order_dfs``, ``order_lpmf``: the three
  heuristics of TorchInductor's ``reorder_for_peak_memory`` (torch/_inductor/memory.py), re-implemented on
  kiln graphs: BFS runs first the ready node whose predecessors ran earliest (FIFO, short lifetimes);
  DFS emits each node after its predecessors, visiting nodes and predecessors in ascending order of
  bytes touched (outputs + inputs); LPMF (least peak memory first) greedily runs a ready node that fits
  under the peak so far while leaving the least memory live, else the one that allocates least.
- ``order_exact(graph, max_nodes=20)``: a minimum-peak order (Serenity-style DP over scheduled sets: the
  live bytes after scheduling a set of nodes depend only on the set, so the best peak to reach each set
  is memoised layer by layer, the set encoded as a bitmask; states that cannot beat a heuristic's peak
  are pruned). More than ``max_nodes`` compute nodes raise ``KilnError``.
- ``order_best_heuristic(graph)``: program/BFS/DFS/LPMF and a memory-aware beam search (partial orders
  ranked by peak so far, then live bytes), the best two improved by a bounded, seeded iterated local
  search (move producers of bytes live at a peak step later, their last readers earlier; kick with random
  valid moves when stuck). Never worse than any of the four baselines.
- ``schedule(graph, method="best") -> (order, peak_bytes)`` dispatches by name (``METHODS``);
  ``reorder(graph, order)`` rewrites ``graph.nodes`` in place: weights first, in their original relative
  order, then the order's compute nodes.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence

from kiln.errors import KilnError
from kiln.ir.graph import Graph, Node
from kiln.ir.ops import WEIGHT
from kiln.scheduler.liveness import (
    compute_nodes,
    dependencies,
    footprint_lower_bound,
    peak_memory,
    tensor_bytes,
    validate_order,
)


class _Problem:
    """A graph's scheduling problem on integer ids: node i is ``nodes[i]`` (program order), buffer b has
    ``size[b]``, consumer set ``consumers[b]`` and is an output or not; all state updates are O(degree)."""

    def __init__(self, graph: Graph, include_inputs: bool = False):
        self.nodes = compute_nodes(graph)
        n = len(self.nodes)
        idx = {node: i for i, node in enumerate(self.nodes)}
        deps = dependencies(graph)
        self.preds = [sorted({idx[p] for p in deps[node]}) for node in self.nodes]
        self.succs: list[list[int]] = [[] for _ in range(n)]
        for i, ps in enumerate(self.preds):
            for p in ps:
                self.succs[p].append(i)
        self.pred_mask = [sum(1 << p for p in ps) for ps in self.preds]
        outputs = {id(v) for v in graph.outputs}
        self.size: list[int] = []
        self.consumers: list[list[int]] = []
        self.cons_mask: list[int] = []
        self.producer: list[int] = []
        self.is_output: list[bool] = []
        self.out_bufs: list[list[int]] = [[] for _ in range(n)]
        self.in_bufs: list[list[int]] = [[] for _ in range(n)]
        values = [(v, -1) for v in graph.inputs] if include_inputs else []
        values += [(r, i) for i, node in enumerate(self.nodes) for r in node.results]
        for v, producer in values:
            size = tensor_bytes(v)
            if size is None:
                continue
            b = len(self.size)
            cons = sorted({idx[u] for u in v.users})
            self.size.append(size)
            self.consumers.append(cons)
            self.cons_mask.append(sum(1 << c for c in cons))
            self.producer.append(producer)
            self.is_output.append(id(v) in outputs)
            if producer >= 0:
                self.out_bufs[producer].append(b)
            for c in cons:
                self.in_bufs[c].append(b)
        self.out_bytes = [sum(self.size[b] for b in bs) for bs in self.out_bufs]
        # bytes freed right after a node runs whatever else ran: its own results nobody reads
        self.self_free = [sum(self.size[b] for b in bs if not self.consumers[b] and not self.is_output[b])
                          for bs in self.out_bufs]
        inputs = [b for b in range(len(self.size)) if self.producer[b] < 0]
        self.initial_live = sum(self.size[b] for b in inputs)
        # unread graph inputs occupy step 0 only
        self.first_free = sum(self.size[b] for b in inputs if not self.consumers[b] and not self.is_output[b])
        self.lower_bound = footprint_lower_bound(graph, include_inputs)  # no order can beat it: stop there

    def __len__(self) -> int:
        return len(self.nodes)

    def profile(self, order: Sequence[int]) -> list[int]:
        """Live bytes at each step of ``order`` (a list of node ids)."""
        size, is_output, in_bufs = self.size, self.is_output, self.in_bufs
        remaining = [len(c) for c in self.consumers]
        live = self.initial_live
        out: list[int] = []
        for v in order:
            live += self.out_bytes[v]
            out.append(live)
            live -= self.self_free[v]
            for b in in_bufs[v]:
                remaining[b] -= 1
                if remaining[b] == 0 and not is_output[b]:
                    live -= size[b]
            if len(out) == 1:
                live -= self.first_free
        return out

    def peak(self, order: Sequence[int]) -> int:
        return max(self.profile(order), default=self.initial_live)

    def freed(self, v: int, done: int) -> int:
        """Bytes freed once ``v`` runs, given ``done`` (a bitmask of scheduled nodes, ``v`` included)."""
        freed = self.self_free[v] + (self.first_free if done == 1 << v else 0)
        for b in self.in_bufs[v]:
            if not self.is_output[b] and not self.cons_mask[b] & ~done:
                freed += self.size[b]
        return freed

    def to_nodes(self, order: Sequence[int]) -> list[Node]:
        return [self.nodes[i] for i in order]


# -- the TorchInductor heuristics ----------------------------------------------------------------------

def _program(p: _Problem) -> list[int]:
    return list(range(len(p)))


def _bfs(p: _Problem) -> list[int]:
    indegree = [len(ps) for ps in p.preds]
    position = [-1] * len(p)
    heap = [((), i) for i in range(len(p)) if indegree[i] == 0]
    heapq.heapify(heap)
    order: list[int] = []
    while heap:
        _, v = heapq.heappop(heap)
        position[v] = len(order)
        order.append(v)
        for s in p.succs[v]:
            indegree[s] -= 1
            if indegree[s] == 0:  # priority: when its predecessors ran, earliest first
                heapq.heappush(heap, (tuple(sorted(position[q] for q in p.preds[s])), s))
    return order


def _dfs(p: _Problem) -> list[int]:
    touched = [p.out_bytes[v] + sum(p.size[b] for b in p.in_bufs[v]) for v in range(len(p))]

    def by_size(vs):
        return iter(sorted(vs, key=lambda v: (touched[v], v)))

    seen: set[int] = set()
    order: list[int] = []
    for root in sorted(range(len(p)), key=lambda v: (touched[v], v)):
        if root in seen:
            continue
        seen.add(root)
        stack = [(root, by_size(p.preds[root]))]
        while stack:  # iterative post-order: deep graphs would overflow Python's recursion
            v, preds = stack[-1]
            for q in preds:
                if q not in seen:
                    seen.add(q)
                    stack.append((q, by_size(p.preds[q])))
                    break
            else:
                stack.pop()
                order.append(v)
    return order


def _lpmf(p: _Problem) -> list[int]:
    n = len(p)
    indegree = [len(ps) for ps in p.preds]
    remaining = [len(c) for c in p.consumers]
    done = [False] * n
    # bytes freed when the node runs: its unread results, and inputs it is the last reader of
    to_free = list(p.self_free)
    for b, cons in enumerate(p.consumers):
        if len(cons) == 1 and not p.is_output[b]:
            to_free[cons[0]] += p.size[b]
    live = p.initial_live
    max_memory = max(live, sum(s for s, o in zip(p.size, p.is_output) if o))
    ready = [v for v in range(n) if indegree[v] == 0]
    order: list[int] = []
    while ready:
        gap = max_memory - live
        v = min(ready, key=lambda u: (p.out_bytes[u] if p.out_bytes[u] > gap else 0,
                                      p.out_bytes[u] - to_free[u], u))
        ready.remove(v)
        done[v] = True
        order.append(v)
        live += p.out_bytes[v]
        max_memory = max(max_memory, live)
        live -= to_free[v] + (p.first_free if len(order) == 1 else 0)
        for s in p.succs[v]:
            indegree[s] -= 1
            if indegree[s] == 0:
                ready.append(s)
        for b in p.in_bufs[v]:
            remaining[b] -= 1
            if remaining[b] == 1 and not p.is_output[b]:  # its last reader now frees it
                last = next(c for c in p.consumers[b] if not done[c])
                to_free[last] += p.size[b]
    return order


# -- exact: DP over scheduled sets ----------------------------------------------------------------------

def _exact(p: _Problem, upper: list[int]) -> list[int]:
    """Minimum-peak order; ``upper`` is a valid order whose peak prunes the search (returned if unbeaten)."""
    n = len(p)
    bound = p.peak(upper)
    if bound <= p.lower_bound:
        return list(upper)
    full = (1 << n) - 1
    # state: scheduled set -> (best peak reaching it, live bytes after it); parent links rebuild the order
    layer: dict[int, tuple[int, int]] = {0: (0, p.initial_live)}
    parent: dict[int, tuple[int, int]] = {}
    for _ in range(n):
        nxt: dict[int, tuple[int, int]] = {}
        for done in sorted(layer):
            cost, live = layer[done]
            for v in range(n):
                bit = 1 << v
                if done & bit or p.pred_mask[v] & ~done:
                    continue
                step = live + p.out_bytes[v]
                c = max(cost, step)
                if c >= bound:
                    continue
                new = done | bit
                if new not in nxt or c < nxt[new][0]:
                    nxt[new] = (c, step - p.freed(v, new))
                    parent[new] = (done, v)
        if not nxt:
            return list(upper)
        layer = nxt
    order: list[int] = []
    state = full
    while state:
        state, v = parent[state]
        order.append(v)
    return order[::-1]


# -- the better heuristic: beam search + local search --------------------------------------------------

def _beam(p: _Problem, width: int) -> list[int]:
    """Beam search over ready nodes: keep the ``width`` partial orders of lowest (peak, live bytes)."""
    n = len(p)
    # state: (peak, live, done mask, ready tuple, order as a linked list (v, rest))
    beam = [(0, p.initial_live, 0, tuple(v for v in range(n) if not p.preds[v]), None)]
    for _ in range(n):
        cand: dict[int, tuple] = {}
        for peak, live, done, ready, links in beam:
            for v in ready:
                new = done | (1 << v)
                step = live + p.out_bytes[v]
                state_peak = max(peak, step)
                if new in cand and cand[new][0] <= state_peak:
                    continue
                newly = tuple(s for s in p.succs[v] if not p.pred_mask[s] & ~new)
                cand[new] = (state_peak, step - p.freed(v, new), new,
                             tuple(r for r in ready if r != v) + newly, (v, links))
        beam = sorted(cand.values(), key=lambda s: (s[0], s[1], s[2]))[:width]
    order: list[int] = []
    links = beam[0][4] if beam else None
    while links:
        v, links = links
        order.append(v)
    return order[::-1]


def _key(profile: list[int]) -> tuple[int, int, int]:
    """What local search minimises: peak, then how many steps hit it, then total live bytes over steps."""
    peak = max(profile, default=0)
    return peak, profile.count(peak), sum(profile)


def _span(p: _Problem, pos: dict[int, int], v: int, n: int) -> tuple[int, int]:
    """Where ``v`` may be reinserted once removed from the order: after its last predecessor, before
    its first successor (indices into the order without ``v``)."""
    return (max((pos[q] + 1 for q in p.preds[v]), default=0),
            min((pos[s] - 1 for s in p.succs[v]), default=n - 1))


def _moved(order: list[int], i: int, j: int) -> list[int]:
    out = order[:i] + order[i + 1:]
    out.insert(j, order[i])
    return out


def _moves(p: _Problem, order: list[int], profile: list[int]) -> list[tuple[int, int]]:
    """Single-node moves aimed at the peak steps: the node running there, producers of bytes live across
    one (to move later) and their last readers (to move earlier), each to the ends of its span or to a
    peak step."""
    n = len(order)
    pos = {v: i for i, v in enumerate(order)}
    peak = max(profile)
    steps = [t for t, live in enumerate(profile) if live == peak]
    movers = {order[t] for t in steps}
    for b in range(len(p.size)):
        start = pos[p.producer[b]] if p.producer[b] >= 0 else -1
        end = n - 1 if p.is_output[b] else max((pos[c] for c in p.consumers[b]), default=start)
        if any(start < t < end for t in steps):
            if start >= 0:
                movers.add(p.producer[b])
            if not p.is_output[b]:
                movers.add(order[end])
    moves: set[tuple[int, int]] = set()
    for v in movers:
        lo, hi = _span(p, pos, v, n)
        moves.update((pos[v], j) for j in (lo, hi, *steps) if lo <= j <= hi and j != pos[v])
    return sorted(moves)


def _local_search(p: _Problem, order: list[int], max_evals: int, kick: int = 5) -> list[int]:
    """Iterated local search: steepest descent over ``_moves`` until no move lowers ``_key``, then a
    kick (``kick`` random valid moves, seeded, from the best order so far) and again, within
    ``max_evals`` peak evaluations. Returns the best order seen (never worse than ``order``)."""
    if len(order) < 2:
        return order
    rng = random.Random(0)
    cur, cur_prof = order, p.profile(order)
    cur_key = _key(cur_prof)
    best, best_key = cur, cur_key
    evals = 0
    while evals < max_evals and best_key[0] > p.lower_bound:
        step = None
        for i, j in _moves(p, cur, cur_prof):
            cand = _moved(cur, i, j)
            prof = p.profile(cand)
            evals += 1
            if _key(prof) < cur_key:
                step, cur_prof, cur_key = cand, prof, _key(prof)
            if evals >= max_evals:
                break
        if step is not None:
            cur = step
            if cur_key < best_key:
                best, best_key = cur, cur_key
            continue
        cur = best
        for _ in range(kick):
            v = rng.randrange(len(cur))
            pos = {u: i for i, u in enumerate(cur)}
            lo, hi = _span(p, pos, v, len(cur))
            cur = _moved(cur, pos[v], rng.randint(lo, hi))
        cur_prof = p.profile(cur)
        cur_key = _key(cur_prof)
        evals += 1
    return best


def _best(p: _Problem, beam_width: int | None = None, max_evals: int | None = None) -> list[int]:
    n = len(p)
    width = beam_width if beam_width is not None else max(2, min(16, 4000 // max(n, 1)))
    evals = max_evals if max_evals is not None else max(200, min(30 * n, 6000))
    candidates = sorted([_program(p), _bfs(p), _dfs(p), _lpmf(p)], key=lambda o: _key(p.profile(o)))
    if max(p.profile(candidates[0]), default=0) <= p.lower_bound:
        return candidates[0]
    candidates = sorted([*candidates, _beam(p, width)], key=lambda o: _key(p.profile(o)))
    improved = [_local_search(p, o, evals // 2) for o in candidates[:2]]
    return min(improved, key=lambda o: _key(p.profile(o)))


# -- public API -----------------------------------------------------------------------------------------

def _public(fn: Callable[[_Problem], list[int]]):
    def order(graph: Graph, include_inputs: bool = False) -> list[Node]:
        p = _Problem(graph, include_inputs)
        return p.to_nodes(fn(p))

    order.__name__ = order.__qualname__ = f"order_{fn.__name__.strip('_')}"
    order.__doc__ = f"The {fn.__name__.strip('_')} order of ``graph``'s compute nodes (see the module contract)."
    return order


order_program = _public(_program)
order_bfs = _public(_bfs)
order_dfs = _public(_dfs)
order_lpmf = _public(_lpmf)


def order_exact(graph: Graph, max_nodes: int = 20, include_inputs: bool = False) -> list[Node]:
    p = _Problem(graph, include_inputs)
    if len(p) > max_nodes:
        raise KilnError(f"order_exact: @{graph.name} has {len(p)} compute nodes, more than max_nodes="
                        f"{max_nodes} (the search is exponential); use method='best'")
    upper = min((_program(p), _bfs(p), _dfs(p), _lpmf(p)), key=p.peak)
    return p.to_nodes(_exact(p, upper))


def order_best_heuristic(graph: Graph, include_inputs: bool = False, beam_width: int | None = None,
                         max_evals: int | None = None) -> list[Node]:
    """``beam_width`` (default: 16, less for big graphs) and ``max_evals`` (peak evaluations in the local
    search, default ``max(200, min(30 * nodes, 6000))``) bound the work."""
    p = _Problem(graph, include_inputs)
    return p.to_nodes(_best(p, beam_width, max_evals))


METHODS: dict[str, Callable[..., list[Node]]] = {
    "program": order_program,
    "bfs": order_bfs,
    "dfs": order_dfs,
    "lpmf": order_lpmf,
    "exact": order_exact,
    "best": order_best_heuristic,
}


def schedule(graph: Graph, method: str = "best", include_inputs: bool = False) -> tuple[list[Node], int]:
    if method not in METHODS:
        raise KilnError(f"unknown scheduling method {method!r}; expected one of {sorted(METHODS)}")
    order = METHODS[method](graph, include_inputs=include_inputs)
    return order, peak_memory(graph, order, include_inputs)


def reorder(graph: Graph, order: Sequence[Node]) -> None:
    validate_order(graph, order)
    weights = [n for n in graph.nodes if n.op is WEIGHT]
    graph.set_order(weights + [n for n in order if n.op is not WEIGHT])
