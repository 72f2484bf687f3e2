"""Scratchpad mapping: ``evaluate`` enforces every rule; baselines and the ILP give valid plans; the ILP
never loses to a baseline and matches a brute-force optimum on tiny problems; Belady is optimal where
theory says so; plans can be placed at addresses."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from kiln.errors import KilnError, KilnInputError
from kiln.ir.builder import Builder
from kiln.ir.graph import Graph
from kiln.ir.ops import aten
from kiln.ir.types import TensorType
from kiln.scheduler.buffers import check_plan
from kiln.scheduler.graphs import nas_cell_graph, random_dag
from kiln.scheduler.liveness import compute_nodes, peak_memory
from kiln.scheduler.ordering import order_lpmf
from kiln.scheduler.scratchpad import (
    BASELINES,
    METHODS,
    EvictionSimulator,
    MappedTensor,
    MappingPlan,
    MappingProblem,
    evaluate,
    experiment_capacities,
    mapping_problem,
    place,
    plan_belady,
    plan_ilp,
    plan_mapping,
    residency_buffers,
)

F32 = torch.float32
TEST_LIMIT_S = 5.0  # generous: these ILPs solve in milliseconds; the limit only guards a hang


# ---------------------------------------------------------------------------------------------- helpers


def tensor(name: str, size: int, producer: int | None, uses, is_output: bool = False) -> MappedTensor:
    return MappedTensor(name, size, producer, tuple(uses), is_output)


def small_problem(capacity: int = 4) -> MappingProblem:
    """x (input) read at 0 and 3; a made at 0, read at 1 and 3 (output); b made at 1, read at 2."""
    return MappingProblem([tensor("x", 1, None, [0, 3]), tensor("a", 2, 0, [1, 3], True), tensor("b", 1, 1, [2])],
                          n_steps=4, capacity=capacity, name="small")


def plan(resident, stored=None) -> MappingPlan:
    return MappingPlan({k: list(v) for k, v in resident.items()}, dict(stored or {}), "hand")


VALID = {"x": [(0, 0), (3, 3)], "a": [(0, 3)], "b": [(1, 2)]}


def random_problem(rng: random.Random, n_tensors: int, n_steps: int, max_size: int = 3) -> MappingProblem:
    """Random events and sizes; the capacity in the lower half between the largest step footprint and the
    peak."""
    tensors = []
    for k in range(n_tensors):
        producer = None if rng.random() < 0.3 else rng.randrange(n_steps - 1)
        after = list(range((producer if producer is not None else -1) + 1, n_steps))
        uses = sorted(rng.sample(after, rng.randint(1 if producer is None else 0, min(3, len(after)))))
        tensors.append(tensor(f"t{k}", rng.randint(1, max_size), producer, uses, rng.random() < 0.3))
    loose = MappingProblem(tensors, n_steps, capacity=10**9)
    capacity = rng.randint(max(1, loose.min_capacity), max(1, (loose.min_capacity + loose.peak) // 2))
    return loose.with_capacity(capacity)


def _subsets_covering(t: MappedTensor, n_steps: int):
    """Every set of steps that holds ``t``'s events and nothing before its producer, as intervals."""
    first = t.producer if t.producer is not None else 0
    free = [s for s in range(first, n_steps) if s not in t.events]
    for extra in itertools.product((False, True), repeat=len(free)):
        steps = sorted({*t.events, *(s for s, on in zip(free, extra) if on)})
        intervals, start = [], steps[0]
        for a, b in itertools.pairwise(steps):
            if b != a + 1:
                intervals.append((start, a))
                start = b
        intervals.append((start, steps[-1]))
        yield intervals


def brute_force_bytes(problem: MappingProblem) -> int:
    """Fewest off-chip bytes over every residency pattern (any set of steps per tensor) and every store
    choice; a store, when there is one, at the producer step (a store there is legal whenever any is, and
    makes every later load legal). Plans ``evaluate`` rejects are skipped."""
    per_tensor = []
    for t in problem.tensors:
        stores = [None] if t.producer is None else ([t.producer] if t.is_output else [None, t.producer])
        per_tensor.append([(iv, s) for iv in _subsets_covering(t, problem.n_steps) for s in stores])
    best = None
    for choice in itertools.product(*per_tensor):
        resident = {t.name: iv for t, (iv, _) in zip(problem.tensors, choice)}
        stored = {t.name: s for t, (_, s) in zip(problem.tensors, choice) if s is not None}
        try:
            total = evaluate(problem, plan(resident, stored)).total
        except KilnError:
            continue
        best = total if best is None else min(best, total)
    assert best is not None, "some plan is always valid (the capacity is at least every step's footprint)"
    return best


def assert_valid(problem: MappingProblem, p: MappingPlan) -> None:
    traffic = evaluate(problem, p)
    assert p.offchip_bytes == traffic.total
    assert traffic.compulsory == problem.compulsory_bytes <= traffic.total
    assert problem.compulsory_bytes <= p.lower_bound <= p.offchip_bytes


def graph_problems():
    """Problems from generated graphs (LPMF orders) at three capacities each."""
    graphs = [random_dag(n, seed=s) for s, n in enumerate((15, 25, 35))] + [nas_cell_graph(seed=0, n_cells=2)]
    for g in graphs:
        base = mapping_problem(g, order_lpmf(g, include_inputs=True), None)
        for c in experiment_capacities(base, (0.0, 0.3, 0.7)):
            yield base.with_capacity(c)


GRAPH_PROBLEMS = list(graph_problems())


# ---------------------------------------------------------------------------------------------- evaluate


def test_evaluate_counts_compulsory_and_spill_traffic():
    p = small_problem()
    t = evaluate(p, plan(VALID, {"a": 0}))
    assert (t.loads, t.stores, t.compulsory) == (2, 2, 3)  # x twice; a stored once (an output)
    assert t.total == 4 and t.non_compulsory == 1  # the reload of x
    spilled = plan({"x": [(0, 0), (3, 3)], "a": [(0, 1), (3, 3)], "b": [(1, 2)]}, {"a": 1})
    t = evaluate(p, spilled)
    assert (t.loads, t.stores, t.non_compulsory) == (4, 2, 3)  # plus the reload of a


def test_evaluate_rejects_a_tensor_missing_at_a_use():
    with pytest.raises(KilnError, match=r"x is not on chip at step 3, which reads it"):
        evaluate(small_problem(), plan({**VALID, "x": [(0, 0)]}, {"a": 0}))


def test_evaluate_rejects_a_tensor_missing_at_its_production():
    with pytest.raises(KilnError, match=r"b is not on chip at step 1, which produces it"):
        evaluate(small_problem(), plan({**VALID, "b": [(2, 2)]}, {"a": 0}))


def test_evaluate_rejects_exceeding_the_capacity():
    evaluate(small_problem(capacity=4), plan({**VALID, "x": [(0, 3)]}, {"a": 0}))  # 4 bytes at steps 1-2
    with pytest.raises(KilnError, match=r"4 bytes on chip at step 1, over the capacity of 3"):
        evaluate(small_problem(capacity=3), plan({**VALID, "x": [(0, 3)]}, {"a": 0}))


def test_evaluate_rejects_residency_before_production():
    with pytest.raises(KilnError, match=r"b is resident at step 0, before it is produced at 1"):
        evaluate(small_problem(), plan({**VALID, "b": [(0, 2)]}, {"a": 0}))


def test_evaluate_rejects_a_reload_that_was_never_stored():
    p = MappingProblem([tensor("a", 1, 0, [2])], n_steps=3, capacity=1)
    with pytest.raises(KilnError, match=r"a is loaded at step 2 but never stored"):
        evaluate(p, plan({"a": [(0, 0), (2, 2)]}))


def test_evaluate_rejects_a_reload_before_the_store():
    p = MappingProblem([tensor("a", 1, 0, [2, 4])], n_steps=5, capacity=1)
    with pytest.raises(KilnError, match=r"a is loaded at step 2 but stored only at step 2"):
        evaluate(p, plan({"a": [(0, 0), (2, 2), (4, 4)]}, {"a": 2}))


def test_evaluate_rejects_a_store_where_the_tensor_is_not_on_chip():
    with pytest.raises(KilnError, match=r"a is stored at step 5, where it is not on chip"):
        evaluate(small_problem(), plan(VALID, {"a": 5}))


def test_evaluate_rejects_storing_a_graph_input():
    with pytest.raises(KilnError, match=r"x is a graph input, already in DRAM"):
        evaluate(small_problem(), plan(VALID, {"a": 0, "x": 0}))


def test_evaluate_rejects_an_output_never_stored():
    with pytest.raises(KilnError, match=r"graph output a is never stored"):
        evaluate(small_problem(), plan(VALID))


def test_evaluate_rejects_touching_or_out_of_range_intervals_and_unknown_tensors():
    with pytest.raises(KilnError, match=r"intervals of a overlap or touch at step 2"):
        evaluate(small_problem(), plan({**VALID, "a": [(0, 1), (2, 3)]}, {"a": 0}))
    with pytest.raises(KilnError, match=r"not a range of steps 0..3"):
        evaluate(small_problem(), plan({**VALID, "b": [(1, 4)]}, {"a": 0}))
    with pytest.raises(KilnError, match=r"residency for unknown tensors \['ghost'\]"):
        evaluate(small_problem(), plan({**VALID, "ghost": [(0, 0)]}, {"a": 0}))


# ---------------------------------------------------------------------------------------------- problems


def test_a_step_over_the_capacity_is_named():
    with pytest.raises(KilnError, match=r"step 0 needs 3 bytes on chip .* capacity is 2 bytes"):
        small_problem(capacity=2)


@pytest.mark.parametrize("bad, match", [
    (tensor("a", 1, 2, [1]), "must lie after its producer"),
    (tensor("a", 1, 0, [2, 1]), "sorted and distinct"),
    (tensor("a", 1, None, []), "never read"),
    (tensor("a", 1, 7, []), "outside 0..3"),
])
def test_malformed_tensors_are_rejected(bad, match):
    with pytest.raises(KilnInputError, match=match):
        MappingProblem([bad], n_steps=4, capacity=10)


def test_mapping_problem_from_a_graph():
    g = Graph("g")
    b = Builder(g)
    x = g.add_input(TensorType((2, 4), F32), "x")
    g.add_input(TensorType((2, 4), F32), "unused")
    r = b.call(aten.relu, x)
    s = b.call(aten.sigmoid, x)
    y = b.call(aten.add.Tensor, r, s)
    g.set_outputs([y, r])
    p = mapping_problem(g, None, 1000)
    by_name = {t.name: t for t in p.tensors}
    assert set(by_name) == {x.name, r.name, s.name, y.name}  # the unread input needs no memory
    assert by_name[x.name] == MappedTensor(x.name, 32, None, (0, 1), False)
    assert by_name[r.name] == MappedTensor(r.name, 32, 0, (2,), True)
    assert by_name[y.name].is_output and by_name[y.name].uses == ()
    assert p.footprint == [64, 64, 96] and p.min_capacity == 96
    assert p.compulsory_bytes == 32 + 32 + 32  # load x, store r and y
    assert mapping_problem(g, None, 1000, include_inputs=False).compulsory_bytes == 64
    with pytest.raises(KilnError, match=r"step 2 \(%.*\) needs 96 bytes"):
        mapping_problem(g, None, 95)


@pytest.mark.parametrize("seed", range(4))
def test_capacity_range_of_graph_problems(seed):
    g = random_dag(20, seed=seed)
    order = order_lpmf(g, include_inputs=True)
    p = mapping_problem(g, order, None)
    assert p.capacity == p.peak <= peak_memory(g, order, include_inputs=True)
    assert p.n_steps == len(compute_nodes(g))
    caps = experiment_capacities(p, (0.0, 0.5, 1.0))
    assert caps[0] == p.min_capacity and caps[-1] == p.peak and caps == sorted(caps)
    assert plan_belady(p).offchip_bytes == p.compulsory_bytes  # at the peak nothing spills
    for c in caps:
        p.with_capacity(c)  # feasible down to the largest step footprint


# ---------------------------------------------------------------------------------------------- planners


@pytest.mark.parametrize("index", range(len(GRAPH_PROBLEMS)))
def test_planners_are_valid_and_the_ilp_never_loses(index):
    p = GRAPH_PROBLEMS[index]
    plans = {m: plan_mapping(p, m) for m in BASELINES}
    ilp = plan_ilp(p, time_limit_s=TEST_LIMIT_S)
    for pl in [*plans.values(), ilp]:
        assert_valid(p, pl)
    assert all(ilp.offchip_bytes <= pl.offchip_bytes for pl in plans.values())
    assert ilp.method == "ilp" and ilp.stats["warm_start_bytes"] == min(pl.offchip_bytes for pl in plans.values())


def test_ilp_matches_brute_force_on_tiny_problems():
    rng = random.Random(7)
    checked = spilling = 0
    while checked < 20:
        p = random_problem(rng, n_tensors=rng.choice((3, 4)), n_steps=rng.choice((4, 5)))
        if math.prod(2 ** (p.n_steps - (t.producer or 0) - len(t.events)) * 2 for t in p.tensors) > 4096:
            continue  # keep the enumeration small
        ilp = plan_ilp(p, time_limit_s=TEST_LIMIT_S)
        assert_valid(p, ilp)
        assert ilp.optimal and ilp.offchip_bytes == ilp.lower_bound == brute_force_bytes(p)
        spilling += ilp.offchip_bytes > p.compulsory_bytes
        checked += 1
    assert spilling >= 5  # the sample holds problems where spills are unavoidable


def test_ilp_beats_belady_when_sizes_differ():
    """Belady evicts the big tensor used last; evicting the small one used sooner costs less."""
    p = MappingProblem([tensor("big", 4, None, [0, 5]), tensor("small", 1, None, [0, 3]),
                        tensor("fresh", 1, 1, [2])], n_steps=6, capacity=5)
    assert plan_belady(p).offchip_bytes == 1 + 4 + 4  # loads small, big, then big again
    ilp = plan_ilp(p, time_limit_s=TEST_LIMIT_S)
    assert ilp.optimal and ilp.offchip_bytes == 1 + 4 + 1  # reloads small instead
    assert ilp.stats["kept_warm_start"] in (0, 1)


@pytest.mark.parametrize("seed", range(6))
def test_belady_is_optimal_for_unit_sizes_and_clean_tensors(seed):
    """One read per step of unit-size graph inputs: paging, where Belady's MIN is optimal."""
    rng = random.Random(seed)
    n_pages, n_steps = rng.randint(3, 6), rng.randint(8, 16)
    requests = [rng.randrange(n_pages) for _ in range(n_steps)]
    tensors = [tensor(f"p{k}", 1, None, [i for i, r in enumerate(requests) if r == k])
               for k in range(n_pages) if k in requests]
    p = MappingProblem(tensors, n_steps, capacity=rng.randint(1, 3))
    belady = plan_belady(p)
    ilp = plan_ilp(p, time_limit_s=TEST_LIMIT_S)
    assert ilp.optimal and belady.offchip_bytes == ilp.offchip_bytes
    assert belady.offchip_bytes <= plan_mapping(p, "lru").offchip_bytes


def test_dirty_evictions_store_once_and_outputs_leave_through_dram():
    p = MappingProblem([tensor("a", 2, 0, [1, 3, 5]), tensor("b", 2, 1, [2], True), tensor("c", 2, 2, [3]),
                        tensor("d", 2, 4, [5])], n_steps=6, capacity=4)
    pl = plan_belady(p)
    traffic = evaluate(p, pl)
    assert pl.stored["a"] == 1 and pl.stored["b"] == 2  # a spilled after step 1; b stored as it dies
    assert traffic.stores == 4 and traffic.loads == 2  # a stored once and reloaded once; b stored as an output
    sim = EvictionSimulator(p)
    assert sim.advance() and sim.step == 2 and sim.candidates() == [0]
    with pytest.raises(KilnError, match="not an eviction candidate"):
        sim.evict(1)


def test_ilp_respects_and_validates_its_warm_start():
    p = GRAPH_PROBLEMS[1]
    warm = plan_belady(p)
    ilp = plan_ilp(p, time_limit_s=TEST_LIMIT_S, warm_start=warm)
    assert ilp.offchip_bytes <= warm.offchip_bytes
    bad = plan({t.name: [] for t in p.tensors})
    with pytest.raises(KilnInputError, match="warm start is not a valid plan"):
        plan_ilp(p, warm_start=bad)
    with pytest.raises(KilnInputError, match="unknown mapping method"):
        plan_mapping(p, "magic")
    assert set(METHODS) == {"lru", "belady", "belady-fit", "ilp"}


# ---------------------------------------------------------------------------------------------- placement


@pytest.mark.parametrize("method", ["greedy", "cpsat"])
def test_placement_of_unit_size_plans_always_fits(method):
    """Equal sizes: an interval graph, coloured optimally by first fit in start order."""
    rng = random.Random(3)
    requests = [rng.randrange(6) for _ in range(30)]
    p = MappingProblem([tensor(f"p{k}", 8, None, [i for i, r in enumerate(requests) if r == k])
                        for k in range(6) if k in requests], 30, capacity=24)
    pl = plan_ilp(p, time_limit_s=TEST_LIMIT_S)
    placement = place(p, pl, method=method, **({"time_limit_s": TEST_LIMIT_S} if method == "cpsat" else {}))
    check_plan(placement.buffers, placement.arena)
    assert placement.fits and placement.arena.size <= 24
    assert len(placement.buffers) == sum(len(v) for v in pl.resident.values())


def test_placement_reports_fragmentation():
    """Four unit tensors fill the chip at step 0; b and d leave; e (2 bytes) needs the two free bytes to
    be adjacent, which holds only if a and c were placed side by side."""
    p = MappingProblem([tensor("a", 1, 0, [2]), tensor("b", 1, 0, []), tensor("c", 1, 0, [2]),
                        tensor("d", 1, 0, []), tensor("e", 2, 1, [2])], n_steps=3, capacity=4)
    pl = plan_ilp(p)
    assert pl.offchip_bytes == p.compulsory_bytes
    fits = {}
    for method in ("greedy", "best-fit", "cpsat"):
        placement = place(p, pl, method=method)
        assert placement.fits == (placement.arena.size <= 4)
        ac = {placement.arena.offsets["a#0"], placement.arena.offsets["c#0"]}
        assert placement.fits == (ac in ({0, 1}, {2, 3}))
        fits[method] = placement.fits
    assert fits == {"greedy": True, "best-fit": False, "cpsat": True}  # best-fit puts a, c at 0 and 2
    assert [b.name for b in residency_buffers(p, pl)] == ["a#0", "b#0", "c#0", "d#0", "e#0"]
