"""Common-subexpression elimination: equal pure nodes merge (transitively, in one sweep, inside regions);
near misses (random ops, 1 vs 1.0, -0.0 vs 0.0, different kwargs/attrs/arg order, side effects, regions)
never do."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.ir.builder import Builder
from kiln.ir.clone import clone_graph
from kiln.ir.graph import Graph
from kiln.ir.ops import FUSED, WEIGHT, aten
from kiln.ir.to_fx import to_fx
from kiln.ir.types import TensorType
from kiln.ir.verifier import verify
from kiln.numerics import assert_match
from kiln.passes.base import PassContext, get_pass
from kiln.passes.cse import eliminate_common_subexpressions

F32 = torch.float32


def run_cse(g: Graph, inputs: tuple | None = None) -> int:
    before = clone_graph(g)
    result = get_pass("cse").run(g, PassContext())
    verify(g)
    if inputs is not None:
        with torch.no_grad():
            assert_match(list(to_fx(g)(*inputs)), list(to_fx(before)(*inputs)), "after cse")
    assert result.changed == (result.stats["merged"] > 0)
    return result.stats["merged"]


def graph_with_x(shape=(4,)) -> tuple[Graph, object, Builder]:
    g = Graph("cse")
    x = g.add_input(TensorType(shape, F32), "x")
    return g, x, Builder(g)


# -- merges ------------------------------------------------------------------------------------------------

def test_merges_identical_pure_nodes():
    g, x, b = graph_with_x()
    a1 = b.call(aten.neg, x)
    a2 = b.call(aten.neg, x)
    g.set_outputs([b.call(aten.add.Tensor, a1, a2)])
    assert run_cse(g, (torch.randn(4),)) == 1
    assert len(g.find(aten.neg)) == 1
    add = g.find(aten.add)[0]
    assert add.args[0] is add.args[1]


def test_merges_transitively_in_one_sweep():
    g, x, b = graph_with_x()
    chains = []
    for _ in range(3):
        v = b.call(aten.neg, x)
        v = b.call(aten.relu, v)
        v = b.call(aten.mul.Tensor, v, 2.0, name="m")
        chains.append(v)
    g.set_outputs(chains)
    assert run_cse(g, (torch.randn(4),)) == 6
    assert len(g.nodes) == 3
    assert g.outputs[0] is g.outputs[1] is g.outputs[2]
    assert eliminate_common_subexpressions(g) == 0


def test_merges_equal_literals_kwargs_and_lists():
    g, x, b = graph_with_x((2, 3))
    outs = [b.call(aten.add.Tensor, x, 1.5, alpha=2) for _ in range(2)]
    outs += [b.call(aten.sum.dim_IntList, x, [0, 1], True) for _ in range(2)]
    outs += [b.call(aten.mul.Tensor, x, math.nan) for _ in range(2)]  # nan == nan for CSE
    outs += [b.call(aten._to_copy, x, dtype=torch.float64) for _ in range(2)]
    g.set_outputs(outs)
    assert run_cse(g, (torch.randn(2, 3),)) == 4


def test_merges_weight_nodes_reading_the_same_name():
    g, x, b = graph_with_x((3,))
    t = torch.randn(3)
    w1 = b.weight("w", t)
    w2 = g.create_node(WEIGHT, (), {}, [w1.type], names=["w_again"], attrs={"name": "w"}).output
    g.set_outputs([b.call(aten.add.Tensor, w1, w2)])
    assert run_cse(g, (torch.randn(3),)) == 1
    assert len(g.find(WEIGHT)) == 1


def test_merges_multi_result_nodes():
    g, x, b = graph_with_x((2, 5))
    v1, i1 = b.call(aten.max.dim, x, 1)
    v2, i2 = b.call(aten.max.dim, x, 1)
    g.set_outputs([v1, i2, b.call(aten.add.Tensor, v2, v1)])
    assert run_cse(g, (torch.randn(2, 5),)) == 1
    assert len(g.find(aten.max)) == 1
    assert g.outputs[1] is g.find(aten.max)[0].results[1]


def test_merges_inside_regions():
    sub = Graph("ew")
    a = sub.add_input(TensorType((3,), F32), "a")
    sb = Builder(sub)
    sub.set_outputs([sb.call(aten.add.Tensor, sb.call(aten.relu, a), sb.call(aten.relu, a))])
    g, x, b = graph_with_x((3,))
    g.set_outputs([g.create_node(FUSED, [x], subgraph=sub).output])
    assert run_cse(g, (torch.randn(3),)) == 1
    assert len(sub.find(aten.relu)) == 1


# -- near misses -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    pytest.param(lambda b, x: b.call(aten.rand, [4]), id="rand"),
    pytest.param(lambda b, x: b.call(aten.rand_like, x), id="rand_like"),
    pytest.param(lambda b, x: b.call(aten.randn, [4]), id="randn"),
    pytest.param(lambda b, x: b.call(aten.bernoulli, x), id="bernoulli"),
    pytest.param(lambda b, x: b.call(aten.bernoulli.p, x, 0.5), id="bernoulli.p"),
    pytest.param(lambda b, x: b.call(aten.native_dropout, x, 0.5, True)[0], id="native_dropout"),
])
def test_never_merges_nondeterministic_ops(make):
    g, x, b = graph_with_x()
    g.set_outputs([make(b, x), make(b, x)])
    assert run_cse(g) == 0
    assert len(g.nodes) == 2
    torch.manual_seed(0)
    out = to_fx(g)(torch.full((4,), 0.5))
    assert not torch.equal(out[0], out[1])  # two draws, two results


@pytest.mark.parametrize("first, second", [
    (1, 1.0),      # int and float promote differently (i64 tensor * 1 stays i64)
    (True, 1),     # bool is not int
    (0.0, -0.0),   # equal under ==, but 1 / (x * -0.0) = -inf
    (2, 3),
    (1e-05, 1e-06),
])
def test_different_literals_are_not_merged(first, second):
    g, x, b = graph_with_x()
    m1 = b.call(aten.mul.Tensor, x, first)
    m2 = b.call(aten.mul.Tensor, x, second)
    g.set_outputs([b.call(aten.reciprocal, m1), b.call(aten.reciprocal, m2)])
    assert run_cse(g, (torch.tensor([1.0, 2.0, -3.0, 0.5]),)) == 0
    assert len(g.nodes) == 4


def test_int_vs_float_literal_matters_for_integer_tensors():
    g = Graph("ints")
    x = g.add_input(TensorType((3,), torch.int64), "x")
    b = Builder(g)
    a = b.call(aten.mul.Tensor, x, 1)
    f = b.call(aten.mul.Tensor, x, 1.0)
    assert a.type.dtype == torch.int64 and f.type.dtype == F32
    g.set_outputs([a, f])
    assert run_cse(g, (torch.arange(3),)) == 0


def test_negative_zero_is_kept_apart():
    g, x, b = graph_with_x()
    r1 = b.call(aten.reciprocal, b.call(aten.mul.Tensor, x, 0.0))
    r2 = b.call(aten.reciprocal, b.call(aten.mul.Tensor, x, -0.0))
    g.set_outputs([r1, r2])
    run_cse(g)
    pos, neg = to_fx(g)(torch.ones(4))
    assert torch.equal(pos, torch.full((4,), math.inf)) and torch.equal(neg, torch.full((4,), -math.inf))


@pytest.mark.parametrize("kw1, kw2", [
    ({"alpha": 2}, {}),
    ({"alpha": 2}, {"alpha": 3}),
    ({"alpha": 1}, {}),  # semantically equal, but CSE compares spelled arguments: conservative
])
def test_different_kwargs_are_not_merged(kw1, kw2):
    g, x, b = graph_with_x()
    g.set_outputs([b.call(aten.add.Tensor, x, x, **kw1), b.call(aten.add.Tensor, x, x, **kw2)])
    assert run_cse(g, (torch.randn(4),)) == 0


def test_different_string_kwargs_are_not_merged():
    g, x, b = graph_with_x()
    g.set_outputs([b.call(aten.gelu, x), b.call(aten.gelu, x, approximate="tanh")])
    assert run_cse(g, (torch.randn(4),)) == 0


def test_argument_order_and_overload_matter():
    g, x, b = graph_with_x()
    y = g.add_input(TensorType((4,), F32), "y")
    g.set_outputs([b.call(aten.sub.Tensor, x, y), b.call(aten.sub.Tensor, y, x),
                   b.call(aten.add.Tensor, x, 2), b.call(aten.add.Scalar, x, 2)])
    assert run_cse(g, (torch.randn(4), torch.randn(4))) == 0


def test_different_attrs_are_not_merged():
    g, x, b = graph_with_x()
    n1 = g.create_node(aten.neg.default, [x], attrs={"tag": "a"})
    n2 = g.create_node(aten.neg.default, [x], attrs={"tag": "b"})
    g.set_outputs([n1.output, n2.output])
    assert run_cse(g) == 0


def test_weights_with_different_names_are_not_merged():
    g, x, b = graph_with_x((3,))
    t = torch.randn(3)
    g.set_outputs([b.weight("a", t), b.weight("b", t)])
    assert run_cse(g) == 0


def test_side_effecting_ops_are_not_merged():
    g, x, b = graph_with_x()
    c = b.call(aten.clone, x)
    b.call(aten.add_.Tensor, c, 1.0)
    b.call(aten.add_.Tensor, c, 1.0)
    g.set_outputs([c])
    assert run_cse(g) == 0
    assert torch.equal(to_fx(g)(torch.zeros(4))[0], torch.full((4,), 2.0))


def test_region_nodes_are_not_merged():
    def region():
        sub = Graph("ew")
        a = sub.add_input(TensorType((4,), F32), "a")
        sub.set_outputs([Builder(sub).call(aten.relu, a)])
        return sub

    g, x, b = graph_with_x()
    f1 = g.create_node(FUSED, [x], subgraph=region())
    f2 = g.create_node(FUSED, [x], subgraph=region())
    g.set_outputs([f1.output, f2.output])
    assert run_cse(g, (torch.randn(4),)) == 0


def test_exported_model_with_duplicate_subexpressions():
    class Twice(torch.nn.Module):
        def forward(self, x):
            return torch.sin(x) * 2 + torch.sin(x) * 2, torch.cos(x)

    from kiln.frontend.export import from_export

    xin = torch.randn(5)
    g = from_export(Twice(), (xin,))
    assert run_cse(g, (xin,)) == 2
    (sin,) = g.find(aten.sin)
    assert len(sin.users) == 1
    out = to_fx(g)(xin)
    assert_match(list(out), list(Twice()(xin)))
