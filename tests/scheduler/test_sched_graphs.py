"""Experiment graphs: deterministic for a seed, well-formed, static, runnable; zoo graphs at each batch."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import KilnError
from kiln.ir.graph import Graph
from kiln.ir.ops import WEIGHT
from kiln.ir.printer import print_graph
from kiln.ir.to_fx import to_fx
from kiln.ir.types import TensorType
from kiln.ir.verifier import verify
from kiln.scheduler.graphs import nas_cell_graph, random_dag, zoo_graphs
from kiln.scheduler.liveness import compute_nodes


def same_graph(a: Graph, b: Graph) -> bool:
    return print_graph(a) == print_graph(b) and a.weights.keys() == b.weights.keys() and all(
        torch.equal(a.weights[k], b.weights[k]) for k in a.weights)


def check_well_formed(g: Graph) -> None:
    verify(g)
    assert all(v.type.is_static for v in g.values() if isinstance(v.type, TensorType))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = to_fx(g)(*[torch.randn(v.type.shape, generator=gen) for v in g.inputs])
    assert [tuple(o.shape) for o in out] == [tuple(v.type.shape) for v in g.outputs]


@pytest.mark.parametrize("n_nodes, seed", [(1, 0), (8, 1), (25, 2), (60, 3)])
def test_random_dag(n_nodes, seed):
    g = random_dag(n_nodes, seed)
    check_well_formed(g)
    assert len(compute_nodes(g)) == n_nodes
    assert same_graph(g, random_dag(n_nodes, seed))
    assert not same_graph(g, random_dag(n_nodes, seed + 100))
    assert all(v.uses for v in g.inputs)
    sinks = [r for n in compute_nodes(g) for r in n.results if not r.uses]
    assert sinks == g.outputs


def test_random_dag_ops_are_varied():
    ops = {n.op.name for seed in range(4) for n in compute_nodes(random_dag(40, seed))}
    assert {"aten.add.Tensor", "aten.mm", "aten.cat", "aten.relu"} <= ops


@pytest.mark.parametrize("seed", [0, 1])
def test_nas_cell_graph(seed):
    g = nas_cell_graph(seed)
    check_well_formed(g)
    assert same_graph(g, nas_cell_graph(seed))
    ops = {n.op.name for n in compute_nodes(g)}
    assert {"aten.convolution", "aten.cat", "aten.add.Tensor"} <= ops
    assert len(g.outputs) == 1 and g.outputs[0].type.shape[1] == 10
    assert sum(n.op is WEIGHT for n in g.nodes) >= 10


def test_zoo_graphs_rebatch_and_copy():
    graphs = zoo_graphs(["mlp"], batch_sizes=(1, 3))
    assert sorted(graphs) == ["mlp_b1", "mlp_b3"]
    for key, g in graphs.items():
        check_well_formed(g)
        assert g.inputs[0].type.shape[0] == int(key.rsplit("_b", 1)[1])
    again = zoo_graphs(["mlp"], batch_sizes=(1,))["mlp_b1"]
    assert again is not graphs["mlp_b1"] and same_graph(again, graphs["mlp_b1"])
    graphs["mlp_b1"].nodes.clear()
    assert compute_nodes(zoo_graphs(["mlp"], batch_sizes=(1,))["mlp_b1"])
    with pytest.raises(KilnError, match="unknown zoo model"):
        zoo_graphs(["nope"])


def test_zoo_graphs_fold_constants():
    plain = zoo_graphs(["mlp"], batch_sizes=(1,))["mlp_b1"]
    folded = zoo_graphs(["mlp"], batch_sizes=(1,), fold_constants=True)["mlp_b1"]
    check_well_formed(folded)
    assert len(compute_nodes(folded)) < len(compute_nodes(plain))
    weight_only = [n for n in compute_nodes(folded)
                   if n.inputs and all(v.producer is not None and v.producer.op is WEIGHT for v in n.inputs)]
    assert weight_only == []


def test_training_graph_matches_eager_autograd():
    from examples.models import REGISTRY
    from kiln.ir.to_fx import to_fx
    from kiln.numerics import assert_match
    from kiln.scheduler.graphs import training_graph

    graph = training_graph("mlp")
    verify(graph)
    model, inputs = REGISTRY["mlp"]()
    out = model(*inputs)
    loss = sum(t.float().pow(2).mean() for t in (out if isinstance(out, tuple) else (out,)))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    got = to_fx(graph)(*inputs)
    assert len(got) == 1 + len(grads)
    assert_match(got[0], loss.detach())
    for g, ref in zip(got[1:], grads):
        assert_match(g, ref, magnitude=float(ref.abs().max()))
