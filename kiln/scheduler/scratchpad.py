"""Multi-level memory mapping: which tensors stay in a scratchpad of ``capacity`` bytes, which go to DRAM.

Contract:
- A ``MappingProblem`` has steps ``0..n_steps-1`` (step ``i`` runs the ``i``-th op of an order) and
  ``MappedTensor``s: ``size`` bytes, a ``producer`` step (``None`` for a graph input, which starts in
  DRAM), the sorted distinct steps that read it (``uses``, all after the producer) and ``is_output``
  (a graph output must end in DRAM: a produced one is stored, an input one already is there). A
  tensor's *events* are its producer step and its uses. The op at step ``i`` needs every tensor with an
  event at ``i`` (its inputs and outputs) on chip; the resident bytes at every step must stay
  ``<= capacity``. Building a problem whose step needs more than the capacity on its own raises
  ``KilnError`` naming the step and the bytes. Tensors are immutable: one store to DRAM lets a tensor be
  dropped and reloaded any number of times. Off-chip bytes = loads + stores; *compulsory* traffic is
  one load of every graph input and one store of every produced graph output, the rest (spills and
  reloads) is *non-compulsory*.
- ``mapping_problem(graph, order, capacity, include_inputs=True)`` builds one from a graph and an
  order of its compute nodes (program order when ``None``; ``liveness.validate_order`` rules; capacity
  ``None`` means the peak). Tensors are the tensor results of compute nodes and, with
  ``include_inputs``, the graph inputs somebody reads; weights stream from DRAM and are not modelled (as
  in ``liveness``), nor are inputs nobody reads. Views are materialised, as in ``liveness``.
  ``experiment_capacities(problem, fractions)`` picks capacities between the largest step footprint
  (``min_capacity``) and the peak of keeping everything (``peak``), where traffic is compulsory only.
- A ``MappingPlan`` gives each tensor its on-chip residency intervals (inclusive steps, sorted,
  disjoint and not adjacent) and its store step, if any. An interval that starts at the producer step is
  the production; every other interval start is a load. ``evaluate(problem, plan)`` raises ``KilnError``
  naming the rule and tensor at fault unless: every event is covered; the capacity holds at every step;
  nothing is resident before its production; a store happens at a step where the tensor is resident (and
  never for a graph input, already in DRAM); a load of a produced tensor comes after its store; every
  produced output is stored. It returns the ``Traffic`` (loads, stores, compulsory, non-compulsory).
- Baselines simulate on-demand residency (``EvictionSimulator``): at each step the missing tensors are
  loaded or produced; when they do not fit, resident tensors the step does not need are evicted one at a
  time by a policy; evicting a produced tensor not yet stored stores it first; a tensor with no later
  event leaves at once (an output is stored first). ``plan_lru`` evicts the least recently used,
  ``plan_belady`` the one used furthest in the future (ties: already stored, then larger), and
  ``plan_belady_fit`` (size-aware) the furthest among those whose eviction alone covers the bytes still
  missing, else the furthest. All three are deterministic and valid; on unit sizes with graph inputs
  only, Belady is optimal.
- ``plan_ilp``: CP-SAT over one Boolean per gap between consecutive events of a tensor ("kept on chip
  through the gap"; dropping at the start of a gap and reloading at its end is never worse than any other
  way of leaving the gap) and one "stored" Boolean per produced non-output tensor, which every dropped
  gap forces; per step, the kept gaps that span it must fit in ``capacity`` minus the step's own
  footprint. Minimises loads + stores, exactly the off-chip bytes. Warm start (hint and objective upper
  bound) from ``warm_start`` or the best baseline; never worse than it (its plan comes back with
  ``stats["kept_warm_start"] == 1``); ``optimal`` iff proved, ``lower_bound`` is the solver's bound (at
  least the compulsory bytes). ``time_limit_s`` bounds the whole call give or take model building and
  read-back (measured up to 0.5 s over on 1,700-step problems); ``workers`` defaults to 2.
- ``plan_mapping(problem, method)`` dispatches on ``METHODS`` ("lru", "belady", "belady-fit", "ilp").
- ``place(problem, plan, method="cpsat"|"greedy"|"best-fit", alignment=1)`` turns the plan's residency
  intervals into ``Buffer``s (``"<tensor>#<k>"``; a reload may land at another address) and plans their
  offsets with ``arena.plan_arena``; ``Placement.fits`` says whether the arena fits in the capacity
  (the capacity model ignores fragmentation, this checks it). Measured on the 87 ILP plans of the
  problems in ``kiln.scheduler.rl``'s numbers (alignment 1): greedy-by-size fits 20/87, CP-SAT (5 s)
  71/87; the worst arenas were 1.237 and 1.158 times the capacity (mostly training graphs, whose
  many segments CP-SAT does not improve in 5 s). A plan that must be placed needs a fragmentation-aware
  mapper or some slack in the capacity.

Anchors: Belady's MIN (1966) and its variable-size/dirty extensions; register allocation as an ILP
(Goodwin & Wilken); scratchpad allocation ILPs (Verma, Wehmeyer & Marwedel).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kiln.errors import KilnError, KilnInputError
from kiln.ir.graph import Graph, Node
from kiln.ir.ops import WEIGHT
from kiln.scheduler.buffers import ArenaPlan, Buffer, check_plan
from kiln.scheduler.liveness import compute_nodes, tensor_bytes, validate_order

# ---------------------------------------------------------------------------------------------- problem


@dataclass(frozen=True)
class MappedTensor:
    name: str
    size: int
    producer: int | None  # step that produces it; None: a graph input, in DRAM from the start
    uses: tuple[int, ...]  # sorted distinct steps that read it
    is_output: bool = False

    @property
    def events(self) -> tuple[int, ...]:
        return self.uses if self.producer is None else (self.producer, *self.uses)

    @property
    def must_store(self) -> bool:
        """A produced graph output (an input that is an output is in DRAM already)."""
        return self.is_output and self.producer is not None


@dataclass
class MappingProblem:
    tensors: list[MappedTensor]
    n_steps: int
    capacity: int
    name: str = "problem"
    step_names: tuple[str, ...] = ()  # for messages: the node each step runs

    def __post_init__(self) -> None:
        if not isinstance(self.capacity, int) or self.capacity <= 0:
            raise KilnInputError(f"{self.name}: capacity must be a positive int, got {self.capacity!r}")
        names: set[str] = set()
        for t in self.tensors:
            if t.name in names:
                raise KilnInputError(f"{self.name}: tensor names must be unique, '{t.name}' repeats")
            names.add(t.name)
            self._check_tensor(t)
        self.index = {t.name: k for k, t in enumerate(self.tensors)}
        self.needed: list[list[int]] = [[] for _ in range(self.n_steps)]
        for k, t in enumerate(self.tensors):
            for e in t.events:
                self.needed[e].append(k)
        self.footprint = [sum(self.tensors[k].size for k in ks) for ks in self.needed]
        for i, need in enumerate(self.footprint):
            if need > self.capacity:
                raise KilnError(f"{self.name}: step {i}{self._step_label(i)} needs {need} bytes on chip (its "
                                f"inputs and outputs) but the capacity is {self.capacity} bytes")

    def _check_tensor(self, t: MappedTensor) -> None:
        if t.size < 0:
            raise KilnInputError(f"{self.name}: tensor {t.name} has negative size {t.size}")
        if list(t.uses) != sorted(set(t.uses)):
            raise KilnInputError(f"{self.name}: uses of {t.name} must be sorted and distinct, got {t.uses}")
        if t.producer is not None and not 0 <= t.producer < self.n_steps:
            raise KilnInputError(f"{self.name}: {t.name} is produced at step {t.producer}, outside "
                                 f"0..{self.n_steps - 1}")
        if t.uses and not (t.uses[0] > (t.producer if t.producer is not None else -1) and t.uses[-1] < self.n_steps):
            raise KilnInputError(f"{self.name}: uses {t.uses} of {t.name} must lie after its producer "
                                 f"({t.producer}) and before step {self.n_steps}")
        if not t.events:
            raise KilnInputError(f"{self.name}: graph input {t.name} is never read; it needs no memory, leave it out")

    def _step_label(self, i: int) -> str:
        return f" ({self.step_names[i]})" if i < len(self.step_names) else ""

    @property
    def min_capacity(self) -> int:
        """The largest single step's footprint: no capacity below it is feasible."""
        return max(self.footprint, default=0)

    @property
    def peak(self) -> int:
        """Max over steps of the bytes resident if every tensor stays from its first to its last event."""
        return _keep_all_peak(self.tensors, self.n_steps)

    @property
    def compulsory_bytes(self) -> int:
        return sum(t.size for t in self.tensors if t.producer is None or t.must_store)

    def with_capacity(self, capacity: int) -> MappingProblem:
        return replace(self, capacity=int(capacity))


def _keep_all_peak(tensors: Sequence[MappedTensor], n_steps: int) -> int:
    delta = [0] * (n_steps + 1)
    for t in tensors:
        delta[t.events[0]] += t.size
        delta[t.events[-1] + 1] -= t.size
    live = best = 0
    for d in delta:
        live += d
        best = max(best, live)
    return best


def mapping_problem(graph: Graph, order: Sequence[Node] | None, capacity: int | None,
                    include_inputs: bool = True) -> MappingProblem:
    """The mapping problem of ``graph`` run in ``order``; ``capacity=None`` means the peak (no spills)."""
    steps = compute_nodes(graph) if order is None else [n for n in order if n.op is not WEIGHT]
    if order is not None:
        validate_order(graph, order)
    pos = {n: i for i, n in enumerate(steps)}
    outputs = {id(v) for v in graph.outputs}
    tensors: list[MappedTensor] = []

    def add(v, producer: int | None) -> None:
        size = tensor_bytes(v)
        if size is None:
            return
        uses = tuple(sorted({pos[u] for u in v.users if u in pos}))
        if producer is None and not uses:
            return  # an unread input needs no memory (if it is an output, it already is in DRAM)
        tensors.append(MappedTensor(v.name, size, producer, uses, id(v) in outputs))

    if include_inputs:
        for v in graph.inputs:
            add(v, None)
    for n in steps:
        for r in n.results:
            add(r, pos[n])
    if capacity is None:
        capacity = max(1, _keep_all_peak(tensors, len(steps)))
    return MappingProblem(tensors, len(steps), capacity, name=graph.name,
                          step_names=tuple(f"%{n.results[0].name}" if n.results else n.op.name for n in steps))


def experiment_capacities(problem: MappingProblem, fractions: Sequence[float] = (0.25, 0.5, 0.75)) -> list[int]:
    """Distinct capacities ``min_capacity + f * (peak - min_capacity)``, ascending: at 0 every step is as
    tight as it can be, at 1 nothing ever needs to leave the chip."""
    lo, hi = problem.min_capacity, problem.peak
    return sorted({max(1, int(lo + f * (hi - lo))) for f in fractions})


# ---------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Traffic:
    loads: int
    stores: int
    compulsory: int

    @property
    def total(self) -> int:
        return self.loads + self.stores

    @property
    def non_compulsory(self) -> int:
        return self.total - self.compulsory


@dataclass
class MappingPlan:
    resident: dict[str, list[tuple[int, int]]]  # tensor -> on-chip intervals [first, last] (inclusive)
    stored: dict[str, int]  # tensor -> step it is stored to DRAM (absent: never stored)
    method: str
    offchip_bytes: int = 0  # filled by the planners (evaluate's total)
    lower_bound: int = 0  # a bound on any plan's off-chip bytes
    optimal: bool | None = None
    solve_s: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)


def evaluate(problem: MappingProblem, plan: MappingPlan) -> Traffic:
    """Check every rule of the module contract; return the plan's traffic."""
    where = f"mapping plan '{plan.method}' for {problem.name}"
    unknown = sorted(set(plan.resident) - set(problem.index))
    if unknown:
        raise KilnError(f"{where}: residency for unknown tensors {unknown[:5]}")
    unknown = sorted(set(plan.stored) - set(problem.index))
    if unknown:
        raise KilnError(f"{where}: stores of unknown tensors {unknown[:5]}")
    occupied = [0] * problem.n_steps
    loads = stores = 0
    for t in problem.tensors:
        intervals = plan.resident.get(t.name, [])
        prev_end = -2
        for a, b in intervals:
            if not (0 <= a <= b < problem.n_steps):
                raise KilnError(f"{where}: {t.name} resident over [{a}, {b}], not a range of steps "
                                f"0..{problem.n_steps - 1}")
            if a <= prev_end + 1:
                raise KilnError(f"{where}: intervals of {t.name} overlap or touch at step {a}; merge them")
            prev_end = b
            if t.producer is not None and a < t.producer:
                raise KilnError(f"{where}: {t.name} is resident at step {a}, before it is produced at {t.producer}")
            for s in range(a, b + 1):
                occupied[s] += t.size
        for e in t.events:
            if not any(a <= e <= b for a, b in intervals):
                raise KilnError(f"{where}: {t.name} is not on chip at step {e}{problem._step_label(e)}, which "
                                f"{'produces' if e == t.producer else 'reads'} it")
        store = plan.stored.get(t.name)
        if store is not None:
            if t.producer is None:
                raise KilnError(f"{where}: {t.name} is a graph input, already in DRAM; it cannot be stored")
            if not any(a <= store <= b for a, b in intervals):
                raise KilnError(f"{where}: {t.name} is stored at step {store}, where it is not on chip")
            stores += t.size
        elif t.must_store:
            raise KilnError(f"{where}: graph output {t.name} is never stored to DRAM")
        for a, _ in intervals:
            if a == t.producer:
                continue
            if t.producer is not None and (store is None or store >= a):
                raise KilnError(f"{where}: {t.name} is loaded at step {a} but "
                                f"{'never stored' if store is None else f'stored only at step {store}'}")
            loads += t.size
    for s, used in enumerate(occupied):
        if used > problem.capacity:
            raise KilnError(f"{where}: {used} bytes on chip at step {s}{problem._step_label(s)}, over the "
                            f"capacity of {problem.capacity}")
    return Traffic(loads, stores, problem.compulsory_bytes)


def _finished(problem: MappingProblem, plan: MappingPlan) -> MappingPlan:
    plan.offchip_bytes = evaluate(problem, plan).total
    plan.lower_bound = max(plan.lower_bound, problem.compulsory_bytes)
    if plan.offchip_bytes == plan.lower_bound:
        plan.optimal = True
    return plan


# ---------------------------------------------------------------------------------------------- simulation


class EvictionSimulator:
    """On-demand residency. ``advance()`` runs steps until one needs an eviction (True) or the last step
    ran (False); then ``candidates()`` are the resident tensors the step does not need, ``deficit`` the
    bytes still missing, and ``evict(k)`` drops candidate ``k`` (storing it first if it is dirty)."""

    def __init__(self, problem: MappingProblem):
        self.problem = problem
        n = len(problem.tensors)
        self.events = [t.events for t in problem.tensors]
        self.size = [t.size for t in problem.tensors]
        self.step = 0
        self.deficit = 0
        self.occupied = 0
        self.loads = self.stores = 0
        self.resident: dict[int, int] = {}  # tensor -> start of its current interval
        self.intervals: list[list[tuple[int, int]]] = [[] for _ in range(n)]
        self.stored: dict[int, int] = {}
        self.next_event = [0] * n  # index into events[k] of the next event not yet run
        self.last_touch = [-1] * n
        self._need: set[int] = set()

    @property
    def done(self) -> bool:
        return self.step >= self.problem.n_steps

    def next_use(self, k: int) -> int:
        return self.events[k][self.next_event[k]]

    def uses_left(self, k: int) -> int:
        return len(self.events[k]) - self.next_event[k]

    def is_dirty(self, k: int) -> bool:
        return self.problem.tensors[k].producer is not None and k not in self.stored

    def candidates(self) -> list[int]:
        return [k for k in self.resident if k not in self._need]

    def advance(self) -> bool:
        p, size = self.problem, self.size
        while self.step < p.n_steps:
            i = self.step
            need = p.needed[i]
            self._need = set(need)
            missing = [k for k in need if k not in self.resident]
            self.deficit = self.occupied + sum(size[k] for k in missing) - p.capacity
            if self.deficit > 0:
                return True
            for k in missing:
                if p.tensors[k].producer != i:
                    self.loads += size[k]
                self.resident[k] = i
                self.occupied += size[k]
            for k in need:
                self.last_touch[k] = i
                self.next_event[k] += 1
                if self.next_event[k] == len(self.events[k]):  # dead: leaves now, an output via DRAM
                    if p.tensors[k].must_store and k not in self.stored:
                        self.stored[k] = i
                        self.stores += size[k]
                    self._leave(k, i)
            self.step += 1
        self._need = set()
        self.deficit = 0
        return False

    def _leave(self, k: int, last: int) -> None:
        self.intervals[k].append((self.resident.pop(k), last))
        self.occupied -= self.size[k]

    def evict(self, k: int) -> int:
        """Evict candidate ``k``; returns the off-chip bytes it causes (its store if dirty, and the
        reload its next use will need) so that a policy's costs sum to the non-compulsory traffic."""
        if k not in self.resident or k in self._need:
            raise KilnError(f"cannot evict tensor {k} at step {self.step}: not an eviction candidate")
        cost = self.size[k]  # the reload at its next use
        if self.is_dirty(k):
            self.stored[k] = self.step - 1  # its last step on chip
            self.stores += self.size[k]
            if not self.problem.tensors[k].is_output:  # an output's store is compulsory
                cost += self.size[k]
        self._leave(k, self.step - 1)
        self.deficit -= self.size[k]
        return cost

    def plan(self, method: str) -> MappingPlan:
        if not self.done:
            raise KilnError(f"simulation of {self.problem.name} stopped at step {self.step}, not finished")
        names = [t.name for t in self.problem.tensors]
        return MappingPlan({names[k]: list(iv) for k, iv in enumerate(self.intervals)},
                           {names[k]: s for k, s in self.stored.items()}, method)


Policy = Callable[[EvictionSimulator, list[int]], int]


def lru_policy(sim: EvictionSimulator, cands: list[int]) -> int:
    return min(cands, key=lambda k: (sim.last_touch[k], k))


def belady_policy(sim: EvictionSimulator, cands: list[int]) -> int:
    return max(cands, key=lambda k: (sim.next_use(k), not sim.is_dirty(k), sim.size[k], -k))


def belady_fit_policy(sim: EvictionSimulator, cands: list[int]) -> int:
    covering = [k for k in cands if sim.size[k] >= sim.deficit]
    return belady_policy(sim, covering or cands)


def simulate(problem: MappingProblem, policy: Policy, method: str) -> MappingPlan:
    """Run the on-demand simulation with ``policy`` choosing every eviction; a valid, evaluated plan."""
    t0 = time.perf_counter()
    sim = EvictionSimulator(problem)
    decisions = 0
    while sim.advance():
        while sim.deficit > 0:
            sim.evict(policy(sim, sim.candidates()))
            decisions += 1
    plan = sim.plan(method)
    plan.solve_s = time.perf_counter() - t0
    plan.stats["evictions"] = decisions
    return _finished(problem, plan)


def plan_lru(problem: MappingProblem) -> MappingPlan:
    return simulate(problem, lru_policy, "lru")


def plan_belady(problem: MappingProblem) -> MappingPlan:
    return simulate(problem, belady_policy, "belady")


def plan_belady_fit(problem: MappingProblem) -> MappingPlan:
    return simulate(problem, belady_fit_policy, "belady-fit")


BASELINES: dict[str, Callable[[MappingProblem], MappingPlan]] = {
    "lru": plan_lru,
    "belady": plan_belady,
    "belady-fit": plan_belady_fit,
}


def best_baseline(problem: MappingProblem) -> MappingPlan:
    """The baseline plan with the fewest off-chip bytes (ties: the first of ``BASELINES``)."""
    return min((fn(problem) for fn in BASELINES.values()), key=lambda p: p.offchip_bytes)


# ---------------------------------------------------------------------------------------------- ILP


@dataclass(frozen=True)
class _Gap:
    tensor: int
    after: int  # index of the event the gap follows
    first: int  # first step strictly inside the gap
    last: int  # last step strictly inside the gap


def _gaps(problem: MappingProblem) -> list[_Gap]:
    """Gaps with at least one step inside (a gap between adjacent steps is kept for free)."""
    gaps = []
    for k, t in enumerate(problem.tensors):
        ev = t.events
        gaps += [_Gap(k, j, ev[j] + 1, ev[j + 1] - 1) for j in range(len(ev) - 1) if ev[j + 1] - ev[j] > 1]
    return gaps


def _plan_from_keeps(problem: MappingProblem, dropped: set[tuple[int, int]], method: str) -> MappingPlan:
    """Residency for "kept unless (tensor, event index) is in ``dropped``"; store at production when needed."""
    resident: dict[str, list[tuple[int, int]]] = {}
    stored: dict[str, int] = {}
    for k, t in enumerate(problem.tensors):
        ev = t.events
        intervals, start = [], ev[0]
        for j in range(len(ev) - 1):
            if (k, j) in dropped:
                intervals.append((start, ev[j]))
                start = ev[j + 1]
        intervals.append((start, ev[-1]))
        resident[t.name] = intervals
        if t.producer is not None and (t.is_output or len(intervals) > 1):
            stored[t.name] = t.producer
    return MappingPlan(resident, stored, method)


def _dropped_in(problem: MappingProblem, plan: MappingPlan) -> set[tuple[int, int]]:
    """The gaps a plan does not keep: consecutive events not inside one residency interval."""
    dropped = set()
    for k, t in enumerate(problem.tensors):
        intervals = plan.resident.get(t.name, [])
        for j in range(len(t.events) - 1):
            a, b = t.events[j], t.events[j + 1]
            if not any(lo <= a and b <= hi for lo, hi in intervals):
                dropped.add((k, j))
    return dropped


def plan_ilp(problem: MappingProblem, time_limit_s: float = 5.0, workers: int = 2,
             warm_start: MappingPlan | None = None, seed: int = 0) -> MappingPlan:
    """CP-SAT over keep-through-gap and store Booleans; never worse than the warm start (see contract)."""
    from ortools.sat.python import cp_model

    t0 = time.perf_counter()
    incumbent = best_baseline(problem)
    if warm_start is not None:
        try:
            _finished(problem, warm_start)
        except KilnError as e:
            raise KilnInputError(f"plan_ilp: the warm start is not a valid plan: {e}") from e
        if warm_start.offchip_bytes <= incumbent.offchip_bytes:
            incumbent = warm_start
    compulsory = problem.compulsory_bytes
    stats: dict[str, Any] = {"warm_start_bytes": incumbent.offchip_bytes, "warm_start_method": incumbent.method}

    def result(plan: MappingPlan, optimal: bool, bound: int, kept: bool) -> MappingPlan:
        plan = replace(plan, method="ilp", optimal=optimal, lower_bound=bound,
                       stats={**stats, "kept_warm_start": int(kept)})
        plan = _finished(problem, plan)
        plan.solve_s = time.perf_counter() - t0
        return plan

    if incumbent.offchip_bytes <= compulsory:
        stats.update(status="OPTIMAL", solver_skipped=1)
        return result(incumbent, True, compulsory, True)

    gaps = _gaps(problem)
    model = cp_model.CpModel()
    keep = [model.NewBoolVar(f"keep_{g.tensor}_{g.after}") for g in gaps]
    store: dict[int, Any] = {}
    cost_terms = []
    spanning: list[list[int]] = [[] for _ in range(problem.n_steps)]
    for gi, g in enumerate(gaps):
        t = problem.tensors[g.tensor]
        cost_terms.append(t.size * (1 - keep[gi]))
        if t.producer is not None and not t.is_output:
            if g.tensor not in store:
                store[g.tensor] = model.NewBoolVar(f"store_{g.tensor}")
                cost_terms.append(t.size * store[g.tensor])
            model.AddImplication(keep[gi].Not(), store[g.tensor])
        for s in range(g.first, g.last + 1):
            spanning[s].append(gi)
    n_capacity = 0
    for s, gis in enumerate(spanning):
        room = problem.capacity - problem.footprint[s]
        if sum(problem.tensors[gaps[gi].tensor].size for gi in gis) > room:
            model.Add(sum(problem.tensors[gaps[gi].tensor].size * keep[gi] for gi in gis) <= room)
            n_capacity += 1
    objective = sum(cost_terms)
    model.Add(objective <= incumbent.offchip_bytes - compulsory)
    model.Minimize(objective)
    dropped = _dropped_in(problem, incumbent)
    for gi, g in enumerate(gaps):
        model.AddHint(keep[gi], (g.tensor, g.after) not in dropped)
    for k, var in store.items():
        model.AddHint(var, problem.tensors[k].name in incumbent.stored)
    stats.update(gaps=len(gaps), store_vars=len(store), capacity_constraints=n_capacity)

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.05, time_limit_s - (time.perf_counter() - t0))
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    status = solver.Solve(model)
    found = status in (cp_model.OPTIMAL, cp_model.FEASIBLE)
    stats.update(status=solver.StatusName(status), conflicts=solver.NumConflicts(),
                 branches=solver.NumBranches(), solver_wall_s=solver.WallTime())
    bound = compulsory + (max(0, -int(-solver.BestObjectiveBound() // 1)) if found else 0)
    if status == cp_model.INFEASIBLE:  # the upper bound excludes everything but... the incumbent's value
        raise KilnError(f"plan_ilp: CP-SAT says no plan of {problem.name} reaches the warm start's "
                        f"{incumbent.offchip_bytes} bytes, which is itself a valid plan: a model bug")
    if found:
        solved = {(g.tensor, g.after) for gi, g in enumerate(gaps) if not solver.BooleanValue(keep[gi])}
        plan = _plan_from_keeps(problem, solved, "ilp")
        if compulsory + round(solver.ObjectiveValue()) < incumbent.offchip_bytes:
            return result(plan, status == cp_model.OPTIMAL, bound, False)
        return result(incumbent, status == cp_model.OPTIMAL, bound, True)
    return result(incumbent, False, bound, True)


# ---------------------------------------------------------------------------------------------- dispatch

METHODS: dict[str, Callable[..., MappingPlan]] = {**BASELINES, "ilp": plan_ilp}


def plan_mapping(problem: MappingProblem, method: str = "ilp", **kw) -> MappingPlan:
    if method not in METHODS:
        raise KilnInputError(f"unknown mapping method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method](problem, **kw)


# ---------------------------------------------------------------------------------------------- placement


@dataclass
class Placement:
    buffers: list[Buffer]
    arena: ArenaPlan
    capacity: int

    @property
    def fits(self) -> bool:
        return self.arena.size <= self.capacity


def residency_buffers(problem: MappingProblem, plan: MappingPlan) -> list[Buffer]:
    """One ``Buffer`` per residency interval of ``plan`` (checked with ``evaluate`` first)."""
    evaluate(problem, plan)
    return [Buffer(f"{t.name}#{j}", t.size, a, b)
            for t in problem.tensors for j, (a, b) in enumerate(plan.resident.get(t.name, []))]


def place(problem: MappingProblem, plan: MappingPlan, method: str = "cpsat", alignment: int = 1,
          **kw) -> Placement:
    """Addresses for ``plan``'s on-chip segments with an arena planner; ``fits`` iff within the capacity."""
    from kiln.scheduler.arena import plan_arena

    buffers = residency_buffers(problem, plan)
    arena = plan_arena(buffers, method=method, alignment=alignment, **kw)
    check_plan(buffers, arena)
    return Placement(buffers, arena, problem.capacity)
