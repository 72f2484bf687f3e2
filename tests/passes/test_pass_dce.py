"""Dead-code elimination: dead pure nodes go (chains at once, inside regions too), unused weights are
dropped; graph outputs, graph inputs and side-effecting ops stay."""

from __future__ import annotations

import torch

from kiln.ir.builder import Builder
from kiln.ir.clone import clone_graph
from kiln.ir.graph import Graph
from kiln.ir.ops import FUSED, WEIGHT, aten
from kiln.ir.to_fx import to_fx
from kiln.ir.types import ScalarType, TensorType
from kiln.ir.verifier import verify
from kiln.numerics import assert_match
from kiln.passes.base import PassContext, get_pass
from kiln.passes.dce import eliminate_dead_code

F32 = torch.float32


def run_dce(g: Graph, *inputs) -> int:
    """Run DCE; the graph must still verify and compute what it computed before."""
    before = clone_graph(g)
    result = get_pass("dce").run(g, PassContext())
    verify(g)
    if inputs:
        with torch.no_grad():
            assert_match(list(to_fx(g)(*inputs)), list(to_fx(before)(*inputs)), "after dce")
    assert result.changed == (result.stats["removed"] > 0)
    return result.stats["removed"]


def ops(g: Graph) -> list[str]:
    return [n.op.name for n in g.nodes]


def test_removes_dead_chain_in_one_sweep():
    g = Graph("chain")
    x = g.add_input(TensorType((4,), F32), "x")
    b = Builder(g)
    live = b.call(aten.relu, x)
    d = x
    for _ in range(4):
        d = b.call(aten.neg, d)
    b.call(aten.add.Tensor, d, live)  # dead too, though it reads a live value
    g.set_outputs([live])
    assert run_dce(g, torch.randn(4)) == 5
    assert ops(g) == ["aten.relu"]
    assert eliminate_dead_code(g) == 0  # already a fixpoint


def test_keeps_graph_outputs_and_inputs():
    g = Graph("outs")
    x = g.add_input(TensorType((4,), F32), "x")
    unused = g.add_input(TensorType((4,), F32), "unused")
    b = Builder(g)
    n = b.call(aten.neg, x)
    r = b.call(aten.relu, n)
    g.set_outputs([r, n, x])
    assert run_dce(g, torch.randn(4), torch.randn(4)) == 0
    assert ops(g) == ["aten.neg", "aten.relu"]
    assert g.inputs == [x, unused]


def test_keeps_one_result_of_a_multi_result_node():
    g = Graph("multi")
    x = g.add_input(TensorType((2, 5), F32), "x")
    values, _indices = Builder(g).call(aten.max.dim, x, 1)
    g.set_outputs([values])
    assert run_dce(g, torch.randn(2, 5)) == 0
    assert ops(g) == ["aten.max.dim"]


def test_keeps_side_effecting_ops():
    g = Graph("effects")
    x = g.add_input(TensorType((4,), F32), "x")
    flag = g.add_input(ScalarType("symbool"), "flag")
    b = Builder(g)
    c = b.call(aten.clone, x)
    b.call(aten.add_.Tensor, c, 1.0)      # in place, result unused
    b.call(aten.copy_, x, c)              # writes the graph input
    g.create_node(aten._assert_scalar.default, [flag, "runtime check"])  # no result at all
    b.call(aten.neg, x)                   # pure and dead: the only thing to go
    g.set_outputs([c])
    assert run_dce(g) == 1
    assert ops(g) == ["aten.clone", "aten.add_.Tensor", "aten.copy_", "aten._assert_scalar"]
    xin = torch.zeros(4)
    (out,) = to_fx(g)(xin, True)
    assert torch.equal(out, torch.ones(4)) and torch.equal(xin, torch.ones(4))


def test_removes_unused_nondeterministic_op():
    g = Graph("rand")
    x = g.add_input(TensorType((4,), F32), "x")
    b = Builder(g)
    b.call(aten.rand, [4])
    b.call(aten.bernoulli, x)
    g.set_outputs([b.call(aten.relu, x)])
    assert run_dce(g, torch.rand(4)) == 2  # unused random numbers are not effects


def test_drops_weights_no_node_reads():
    g = Graph("weights")
    x = g.add_input(TensorType((3,), F32), "x")
    b = Builder(g)
    w_live, w_dead = torch.randn(3), torch.randn(3)
    g.set_outputs([b.call(aten.mul.Tensor, x, b.weight("live", w_live))])
    b.call(aten.neg, b.weight("dead", w_dead))
    g.weights["orphan"] = torch.randn(2)  # no node ever read it
    assert run_dce(g, torch.randn(3)) == 2  # the neg and the dead weight node
    assert set(g.weights) == {"live"} and g.weights["live"] is w_live
    assert [n.attrs["name"] for n in g.find(WEIGHT)] == ["live"]


def test_keeps_weight_that_is_a_graph_output():
    g = Graph("wout")
    g.set_outputs([Builder(g).weight("w", torch.randn(2))])
    assert run_dce(g) == 0 and "w" in g.weights


def test_recurses_into_regions():
    sub = Graph("ew")
    a = sub.add_input(TensorType((3,), F32), "a")
    sb = Builder(sub)
    sb.call(aten.neg, sb.call(aten.abs, a))  # dead inside the region
    sub.set_outputs([sb.call(aten.relu, a)])
    g = Graph("outer")
    x = g.add_input(TensorType((3,), F32), "x")
    fused = g.create_node(FUSED, [x], subgraph=sub)
    g.set_outputs([fused.output])
    assert run_dce(g, torch.randn(3)) == 2
    assert ops(sub) == ["aten.relu"]
    assert ops(g) == ["kiln.fused"]


def test_dead_region_node_goes_whole():
    sub = Graph("ew")
    a = sub.add_input(TensorType((3,), F32), "a")
    sub.set_outputs([Builder(sub).call(aten.relu, a)])
    g = Graph("outer")
    x = g.add_input(TensorType((3,), F32), "x")
    g.create_node(FUSED, [x], subgraph=sub)
    g.set_outputs([x])
    assert run_dce(g, torch.randn(3)) == 1 and g.nodes == []


def test_near_miss_value_used_only_by_a_live_node_stays():
    g = Graph("near")
    x = g.add_input(TensorType((3,), F32), "x")
    b = Builder(g)
    t = b.call(aten.neg, x)
    u = b.call(aten.abs, t)
    g.set_outputs([b.call(aten.add.Tensor, u, t)])
    assert run_dce(g, torch.randn(3)) == 0 and len(g.nodes) == 3
