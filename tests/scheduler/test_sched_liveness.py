"""Liveness: one buffer per tensor result of a compute node with the documented lifetime, peak memory equal
to a brute-force count over steps, a footprint bound no order beats, and strict order validation."""

from __future__ import annotations

import random

import pytest
import torch

from kiln.errors import KilnError
from kiln.ir.builder import Builder
from kiln.ir.graph import Graph
from kiln.ir.ops import WEIGHT, aten
from kiln.ir.types import TensorType, sym
from kiln.scheduler.buffers import Buffer
from kiln.scheduler.graphs import nas_cell_graph, random_dag
from kiln.scheduler.liveness import (
    buffers_for_order,
    compute_nodes,
    footprint_lower_bound,
    peak_memory,
    validate_order,
)

F32 = torch.float32


def by_name(buffers: list[Buffer]) -> dict[str, tuple[int, int, int]]:
    return {b.name: (b.size, b.start, b.end) for b in buffers}


def brute_peak(graph: Graph, order, include_inputs: bool = False) -> int:
    """Live bytes counted step by step straight from the definition, independently of buffers_for_order."""
    steps = [n for n in order if n.op is not WEIGHT]
    pos = {n: i for i, n in enumerate(steps)}
    last = max(len(steps) - 1, 0)
    values = [(v, 0) for v in graph.inputs] if include_inputs else []
    values += [(r, pos[n]) for n in steps for r in n.results]
    peak = 0
    for t in range(len(steps) or 1):
        live = 0
        for v, start in values:
            if not isinstance(v.type, TensorType):
                continue
            end = last if any(o is v for o in graph.outputs) else max([pos[u] for u in v.uses] + [start])
            if start <= t <= end:
                live += v.type.numel() * v.type.dtype.itemsize
        peak = max(peak, live)
    return peak


def random_order(graph: Graph, seed: int) -> list:
    """A random topological order: repeatedly run a random ready compute node."""
    rng = random.Random(seed)
    nodes = compute_nodes(graph)
    done: set = set()
    order = []
    while len(order) < len(nodes):
        ready = [n for n in nodes if n not in done
                 and all(v.producer is None or v.producer.op is WEIGHT or v.producer in done for v in n.inputs)]
        n = rng.choice(ready)
        done.add(n)
        order.append(n)
    return order


def small_graph():
    """x -> a = relu(x); b = mm(a, w); c = add(a, b); d = neg(x) (unread); outputs (c,)."""
    g = Graph("small")
    x = g.add_input(TensorType((4, 8), F32), "x")
    b = Builder(g)
    a = b.call(aten.relu, x, name="a")
    m = b.call(aten.mm, a, b.weight("w", torch.randn(8, 8)), name="m")
    c = b.call(aten.add.Tensor, a, m, name="c")
    d = b.call(aten.neg, x, name="d")
    g.set_outputs([c])
    return g, (a, m, c, d)


def test_buffers_follow_the_contract():
    g, _ = small_graph()
    order = compute_nodes(g)
    assert by_name(buffers_for_order(g, order)) == {
        "a": (128, 0, 2), "m": (128, 1, 2), "c": (128, 2, 3), "d": (128, 3, 3)}
    assert peak_memory(g, order) == 3 * 128
    assert peak_memory(g, order) == brute_peak(g, order)


def test_include_inputs_and_output_inputs():
    g, _ = small_graph()
    unused = g.add_input(TensorType((2,), F32), "unused")
    g.set_outputs([*g.outputs, g.inputs[0]])
    order = compute_nodes(g)
    bufs = by_name(buffers_for_order(g, order, include_inputs=True))
    assert bufs["x"] == (128, 0, 3)  # a graph output lives to the last step
    assert bufs[unused.name] == (8, 0, 0)  # unread input: step 0 only
    assert "x" not in by_name(buffers_for_order(g, order))
    assert peak_memory(g, order, include_inputs=True) == brute_peak(g, order, include_inputs=True)


def test_weights_are_never_buffers_and_may_be_in_the_order():
    g, _ = small_graph()
    weights = [n for n in g.nodes if n.op is WEIGHT]
    assert weights and all(r.name not in by_name(buffers_for_order(g, compute_nodes(g))) for w in weights
                           for r in w.results)
    with_weights = list(reversed(weights)) + compute_nodes(g)
    assert buffers_for_order(g, with_weights) == buffers_for_order(g, compute_nodes(g))
    assert buffers_for_order(g, g.nodes) == buffers_for_order(g, compute_nodes(g))


def test_multi_result_scalar_and_effect_nodes():
    g = Graph("multi")
    x = g.add_input(TensorType((1, 2, 4, 4), F32), "x")
    b = Builder(g)
    vals, idx = b.call(aten.max_pool2d_with_indices, x, [3, 3], [1, 1], [1, 1])
    size = b.call(aten.sym_size.int, x, 0)
    b.call(aten._print, "hello")
    y = b.call(aten.relu, vals)
    g.set_outputs([y, size])
    order = compute_nodes(g)
    bufs = by_name(buffers_for_order(g, order))
    assert bufs == {vals.name: (128, 0, 3), idx.name: (256, 0, 0), y.name: (128, 3, 3)}
    assert peak_memory(g, order) == brute_peak(g, order) == 128 + 256


def test_views_get_their_own_buffer():
    g = Graph("views")
    x = g.add_input(TensorType((2, 8), F32), "x")
    b = Builder(g)
    r = b.call(aten.relu, x)
    v = b.call(aten.view, r, [16])
    t = b.call(aten.permute, b.call(aten.view, v, [4, 4]), [1, 0])
    g.set_outputs([b.call(aten.neg, t)])
    order = compute_nodes(g)
    assert len(buffers_for_order(g, order)) == 5
    assert v.name in by_name(buffers_for_order(g, order))
    assert peak_memory(g, order) == 2 * 64


def test_symbolic_shape_is_an_error_naming_the_value():
    g = Graph("dyn")
    x = g.add_input(TensorType((sym("s0"), 4), F32), "x")
    r = Builder(g).call(aten.relu, x, name="act")
    g.set_outputs([r])
    with pytest.raises(KilnError, match="%act"):
        buffers_for_order(g, compute_nodes(g))
    with pytest.raises(KilnError, match="%x"):
        peak_memory(g, compute_nodes(g), include_inputs=True)


def test_empty_graph():
    g = Graph("empty")
    x = g.add_input(TensorType((4,), F32), "x")
    g.set_outputs([x])
    assert buffers_for_order(g, []) == []
    assert peak_memory(g, []) == 0
    assert peak_memory(g, [], include_inputs=True) == 16 == brute_peak(g, [], include_inputs=True)


@pytest.mark.parametrize("seed", range(6))
def test_peak_equals_brute_force_and_bound_holds(seed):
    g = random_dag(14, seed, p_far=0.5) if seed % 3 else nas_cell_graph(seed, n_cells=1, n_steps=2)
    for include_inputs in (False, True):
        bound = footprint_lower_bound(g, include_inputs)
        for k in range(5):
            order = random_order(g, seed * 10 + k)
            peak = peak_memory(g, order, include_inputs)
            assert peak == brute_peak(g, order, include_inputs)
            assert bound <= peak


def test_validate_order_rejects_bad_orders():
    g, (a, m, c, d) = small_graph()
    nodes = compute_nodes(g)
    validate_order(g, nodes)
    validate_order(g, [d.producer, a.producer, m.producer, c.producer])
    with pytest.raises(KilnError, match="misses"):
        validate_order(g, nodes[:-1])
    with pytest.raises(KilnError, match="twice"):
        validate_order(g, nodes + [nodes[0]])
    with pytest.raises(KilnError, match="before"):
        validate_order(g, [m.producer, a.producer, c.producer, d.producer])
    other, _ = small_graph()
    with pytest.raises(KilnError, match="not a compute node"):
        validate_order(g, nodes[:-1] + [compute_nodes(other)[-1]])
    weight = next(n for n in g.nodes if n.op is WEIGHT)
    w2 = Builder(g).weight("w2", torch.randn(3)).producer  # a second weight: hold both or none
    with pytest.raises(KilnError, match="weight"):
        validate_order(g, [weight, *nodes])
    validate_order(g, [weight, *nodes, w2])


def test_side_effects_keep_program_order():
    g = Graph("effects")
    x = g.add_input(TensorType((4,), F32), "x")
    b = Builder(g)
    b.call(aten._print, "first")
    r = b.call(aten.relu, x)
    b.call(aten._print, "second")
    g.set_outputs([r])
    p1, relu, p2 = compute_nodes(g)
    validate_order(g, [relu, p1, p2])
    with pytest.raises(KilnError, match="side effect"):
        validate_order(g, [p2, relu, p1])
