"""Ordering: every method gives a valid topological order; ``order_exact`` is the brute-force optimum on
tiny graphs and beats every heuristic; the best heuristic never loses to its baselines; ``reorder`` keeps
the graph verifying and computing the same outputs."""

from __future__ import annotations

import random

import networkx as nx
import pytest
import torch

from kiln.errors import KilnError
from kiln.ir.builder import Builder
from kiln.ir.graph import Graph
from kiln.ir.ops import WEIGHT, aten
from kiln.ir.to_fx import to_fx
from kiln.ir.types import TensorType
from kiln.ir.verifier import verify
from kiln.scheduler.graphs import nas_cell_graph, random_dag, zoo_graphs
from kiln.scheduler.liveness import compute_nodes, dependencies, footprint_lower_bound, peak_memory, validate_order
from kiln.scheduler.ordering import (
    METHODS,
    order_best_heuristic,
    order_bfs,
    order_dfs,
    order_exact,
    order_lpmf,
    order_program,
    reorder,
    schedule,
)

F32 = torch.float32
BASELINES = {"program": order_program, "bfs": order_bfs, "dfs": order_dfs, "lpmf": order_lpmf}


def dag(graph: Graph) -> nx.DiGraph:
    d = nx.DiGraph()
    for n, preds in dependencies(graph).items():
        d.add_node(n)
        d.add_edges_from((p, n) for p in preds)
    return d


def assert_valid(graph: Graph, order) -> None:
    validate_order(graph, order)
    assert all(n.op is not WEIGHT for n in order)
    pos = {n: i for i, n in enumerate(order)}
    assert len(pos) == len(compute_nodes(graph))
    assert all(pos[a] < pos[b] for a, b in dag(graph).edges)


def tiny_graphs(count: int, max_nodes: int = 8):
    rng = random.Random(1234)
    for i in range(count):
        yield random_dag(rng.randint(2, max_nodes), seed=i, n_inputs=rng.randint(1, 2), p_far=0.5,
                         widths=(4, 8, 16))


def inputs_for(graph: Graph, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(v.type.shape, generator=gen) for v in graph.inputs]


@pytest.mark.parametrize("include_inputs", [False, True])
def test_exact_equals_brute_force_on_tiny_graphs(include_inputs):
    for i, g in enumerate(tiny_graphs(40)):
        if i % 2:
            g.add_input(TensorType((64,), F32), "unread")  # live at step 0 only, with include_inputs
        brute = min(peak_memory(g, order, include_inputs) for order in nx.all_topological_sorts(dag(g)))
        order = order_exact(g, include_inputs=include_inputs)
        assert_valid(g, order)
        assert peak_memory(g, order, include_inputs) == brute, g.name
        assert footprint_lower_bound(g, include_inputs) <= brute


def small_graphs():
    yield from (random_dag(n, seed, p_far=0.5) for n, seed in [(10, 1), (12, 2), (14, 3), (14, 4), (13, 5)])
    yield from (random_dag(14, seed) for seed in (6, 7))
    yield nas_cell_graph(0, n_cells=1, n_steps=2)
    yield nas_cell_graph(3, n_cells=1, n_steps=2)


@pytest.mark.parametrize("include_inputs", [False, True])
def test_exact_beats_every_heuristic(include_inputs):
    for g in small_graphs():
        assert len(compute_nodes(g)) <= 14
        exact = peak_memory(g, order_exact(g, include_inputs=include_inputs), include_inputs)
        assert footprint_lower_bound(g, include_inputs) <= exact
        for name, method in METHODS.items():
            order = method(g, include_inputs=include_inputs)
            assert_valid(g, order)
            assert exact <= peak_memory(g, order, include_inputs), (g.name, name)


def test_best_never_loses_to_its_baselines():
    graphs = [random_dag(n, seed) for n, seed in [(20, 0), (40, 1), (60, 2), (30, 3)]]
    graphs += [random_dag(35, 4, p_far=0.6), nas_cell_graph(1), nas_cell_graph(2, n_cells=4, n_steps=3)]
    for g in graphs:
        best_order = order_best_heuristic(g)
        assert_valid(g, best_order)
        best = peak_memory(g, best_order)
        baselines = {name: peak_memory(g, fn(g)) for name, fn in BASELINES.items()}
        assert best <= min(baselines.values()), (g.name, best, baselines)
        assert footprint_lower_bound(g) <= best


def test_orders_are_deterministic():
    for method in METHODS:
        a, b = random_dag(12, 5), random_dag(12, 5)
        names_a = [n.results[0].name for n in schedule(a, method)[0]]
        assert names_a == [n.results[0].name for n in schedule(b, method)[0]]


def test_schedule_dispatches_and_reports_the_peak():
    g = random_dag(12, 9)
    for method in METHODS:
        order, peak = schedule(g, method)
        assert_valid(g, order)
        assert peak == peak_memory(g, order)
    assert schedule(g, "program")[0] == compute_nodes(g)
    with pytest.raises(KilnError, match="unknown scheduling method"):
        schedule(g, "fastest")


def test_exact_refuses_big_graphs():
    g = random_dag(21, 0)
    with pytest.raises(KilnError, match="max_nodes"):
        order_exact(g)
    assert_valid(g, order_exact(g, max_nodes=21))


@pytest.mark.parametrize("make", [lambda: random_dag(30, 11, p_far=0.5), lambda: nas_cell_graph(4)])
def test_reorder_keeps_outputs(make):
    g = make()
    inputs = inputs_for(g)
    with torch.no_grad():
        before = to_fx(g)(*inputs)
    weights = [n for n in g.nodes if n.op is WEIGHT]
    order, peak = schedule(g, "best")
    reorder(g, order)
    verify(g)
    assert g.nodes[:len(weights)] == weights
    assert compute_nodes(g) == order
    assert peak_memory(g, compute_nodes(g)) == peak
    with torch.no_grad():
        after = to_fx(g)(*inputs)
    assert len(before) == len(after)
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_reorder_rejects_an_invalid_order():
    g = random_dag(6, 0)
    with pytest.raises(KilnError):
        reorder(g, list(reversed(compute_nodes(g))))


def test_side_effects_stay_in_program_order():
    g = Graph("effects")
    x = g.add_input(TensorType((64,), F32), "x")
    b = Builder(g)
    big = b.call(aten.cat, [x, x, x, x], 0)
    b.call(aten._print, "first")
    small = b.call(aten.relu, x)
    b.call(aten._print, "second")
    g.set_outputs([b.call(aten.sum, big), small])
    prints = [n for n in compute_nodes(g) if n.op.side_effects]
    for method in METHODS:
        order = schedule(g, method)[0]
        assert_valid(g, order)
        assert [n for n in order if n.op.side_effects] == prints


def test_degenerate_graphs():
    g = Graph("empty")
    x = g.add_input(TensorType((4,), F32), "x")
    g.set_outputs([x])
    for method in METHODS:
        assert schedule(g, method) == ([], 0)
    r = Builder(g).call(aten.relu, x)
    g.set_outputs([r])
    for method in METHODS:
        assert schedule(g, method) == ([r.producer], 16)


def test_zoo_model_schedules():
    g = zoo_graphs(["mlp"], batch_sizes=(2,))["mlp_b2"]
    inputs = inputs_for(g)
    with torch.no_grad():
        before = to_fx(g)(*inputs)
    peaks = {}
    for method in ("program", "bfs", "dfs", "lpmf", "best"):
        order, peaks[method] = schedule(g, method)
        assert_valid(g, order)
    assert peaks["best"] <= min(peaks[m] for m in BASELINES)
    reorder(g, schedule(g, "bfs")[0])
    verify(g)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(before, to_fx(g)(*inputs)))
