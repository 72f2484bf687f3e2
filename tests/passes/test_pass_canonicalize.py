"""Canonicalization: no-op views, permutes, copies, casts, slices and arithmetic identities go; anything
whose removal would change a type, a layout that a later view relies on, an output's aliasing, or what an
in-place op writes stays."""

from __future__ import annotations

import pytest
import torch

from kiln.ir.builder import Builder
from kiln.ir.clone import clone_graph
from kiln.ir.graph import Graph
from kiln.ir.ops import aten
from kiln.ir.to_fx import to_fx
from kiln.ir.types import TensorType, sym
from kiln.ir.verifier import verify
from kiln.numerics import assert_match
from kiln.passes.base import PassContext, get_pass

F32 = torch.float32
INT64_MAX = 2**63 - 1


def canonicalize(g: Graph, inputs: tuple) -> int:
    before = clone_graph(g)
    result = get_pass("canonicalize").run(g, PassContext())
    verify(g)
    with torch.no_grad():
        assert_match(list(to_fx(g)(*[i.clone() for i in inputs])),
                     list(to_fx(before)(*[i.clone() for i in inputs])), "after canonicalize")
    assert result.changed == (result.stats["rewrites"] > 0)
    return result.stats["rewrites"]


def ops(g: Graph) -> list[str]:
    return [n.op.name for n in g.nodes]


def single(make, shape=(2, 3, 4), dtype=F32):
    """x -> make(b, x) -> relu -> output: the node under test is never a graph output itself."""
    g = Graph("canon")
    x = g.add_input(TensorType(shape, dtype), "x")
    b = Builder(g)
    g.set_outputs([b.call(aten.abs, make(b, x))])
    return g


def inputs_for(g: Graph) -> tuple:
    gen = torch.Generator().manual_seed(0)
    out = []
    for v in g.inputs:
        t = v.type
        if t.dtype.is_floating_point:
            out.append(torch.randn(t.shape, generator=gen, dtype=t.dtype))
        else:
            out.append(torch.randint(-5, 5, t.shape, generator=gen).to(t.dtype))
    return tuple(out)


REMOVED = [
    pytest.param(lambda b, x: b.call(aten.view, x, [2, 3, 4]), id="view-same-shape"),
    pytest.param(lambda b, x: b.call(aten._unsafe_view, x, [2, 3, 4]), id="unsafe-view-same-shape"),
    pytest.param(lambda b, x: b.call(aten.reshape, x, [2, -1, 4]), id="reshape-same-shape"),
    pytest.param(lambda b, x: b.call(aten.expand, x, [2, 3, 4]), id="expand-same-shape"),
    pytest.param(lambda b, x: b.call(aten.expand, x, [-1, -1, -1]), id="expand-minus-one"),
    pytest.param(lambda b, x: b.call(aten.permute, x, [0, 1, 2]), id="identity-permute"),
    pytest.param(lambda b, x: b.call(aten.permute, x, [-3, -2, -1]), id="identity-permute-negative"),
    pytest.param(lambda b, x: b.call(aten.clone, x), id="clone"),
    pytest.param(lambda b, x: b.call(aten.clone, x, memory_format=torch.preserve_format), id="clone-preserve"),
    pytest.param(lambda b, x: b.call(aten.alias, x), id="alias"),
    pytest.param(lambda b, x: b.call(aten.lift_fresh_copy, x), id="lift_fresh_copy"),
    pytest.param(lambda b, x: b.call(aten._to_copy, x, dtype=F32), id="to_copy-same-dtype"),
    pytest.param(lambda b, x: b.call(aten.mul.Tensor, x, 1), id="mul-1"),
    pytest.param(lambda b, x: b.call(aten.mul.Tensor, x, 1.0), id="mul-1.0"),
    pytest.param(lambda b, x: b.call(aten.div.Tensor, x, 1), id="div-1"),
    pytest.param(lambda b, x: b.call(aten.add.Tensor, x, 0), id="add-0"),
    pytest.param(lambda b, x: b.call(aten.add.Tensor, x, 0.0, alpha=3), id="add-0-alpha"),
    pytest.param(lambda b, x: b.call(aten.sub.Tensor, x, 0), id="sub-0"),
    pytest.param(lambda b, x: b.call(aten.mul.Scalar, x, 1), id="mul.Scalar-1"),
    pytest.param(lambda b, x: b.call(aten.add.Scalar, x, 0), id="add.Scalar-0"),
    pytest.param(lambda b, x: b.call(aten.slice.Tensor, x, 1, 0, INT64_MAX), id="full-slice-int64max"),
    pytest.param(lambda b, x: b.call(aten.slice.Tensor, x, 2), id="full-slice-defaults"),
    pytest.param(lambda b, x: b.call(aten.slice.Tensor, x, 0, None, None), id="full-slice-none"),
    pytest.param(lambda b, x: b.call(aten.slice.Tensor, x, -1, 0, 4, 1), id="full-slice-exact-end"),
    pytest.param(lambda b, x: b.call(aten.slice.Tensor, x, 1, 0, 100), id="full-slice-past-end"),
    pytest.param(lambda b, x: b.call(aten.slice.Tensor, x, dim=1, start=0, end=3), id="full-slice-kwargs"),
]


@pytest.mark.parametrize("make", REMOVED)
def test_removes_no_op(make):
    g = single(make)
    assert len(g.nodes) == 2
    assert canonicalize(g, inputs_for(g)) == 1
    assert ops(g) == ["aten.abs"]
    assert g.nodes[0].input(0) is g.inputs[0]


def test_removes_chains_of_no_ops():
    def make(b, x):
        v = b.call(aten.clone, x)
        v = b.call(aten.mul.Tensor, v, 1)
        v = b.call(aten.permute, v, [0, 1, 2])
        v = b.call(aten.view, v, [2, 3, 4])
        return b.call(aten.add.Tensor, v, 0)

    g = single(make)
    assert canonicalize(g, inputs_for(g)) == 5
    assert ops(g) == ["aten.abs"]


def test_collapses_view_of_view():
    def make(b, x):
        return b.call(aten.view, b.call(aten.view, x, [6, 4]), [4, 6])

    g = single(make)
    canonicalize(g, inputs_for(g))
    assert ops(g) == ["aten.view", "aten.abs"]
    view = g.nodes[0]
    assert view.input(0) is g.inputs[0] and view.args[1] == [4, 6]


def test_removes_symbolic_full_slice():
    g = Graph("sym")
    x = g.add_input(TensorType((sym("s0"), 3), F32), "x")
    b = Builder(g)
    g.set_outputs([b.call(aten.neg, b.call(aten.slice.Tensor, x, 0, 0, INT64_MAX))])
    assert canonicalize(g, (torch.randn(5, 3),)) == 1
    assert ops(g) == ["aten.neg"]


KEPT = [
    pytest.param(lambda b, x: b.call(aten.mul.Tensor, x, 2), id="mul-2"),
    pytest.param(lambda b, x: b.call(aten.mul.Tensor, x, 0), id="mul-0"),
    pytest.param(lambda b, x: b.call(aten.add.Tensor, x, 1), id="add-1"),
    pytest.param(lambda b, x: b.call(aten.div.Tensor, x, 0.5), id="div-0.5"),
    pytest.param(lambda b, x: b.call(aten.mul.Tensor, x, x), id="mul-by-value"),
    pytest.param(lambda b, x: b.call(aten.mul.Tensor, x, True), id="mul-True"),
    pytest.param(lambda b, x: b.call(aten.div.Tensor_mode, x, 1, rounding_mode="floor"), id="floor-div-1"),
    pytest.param(lambda b, x: b.call(aten.view, x, [6, 4]), id="view-other-shape"),
    pytest.param(lambda b, x: b.call(aten.expand, x, [5, 2, 3, 4]), id="expand-grows"),
    pytest.param(lambda b, x: b.call(aten.permute, x, [0, 2, 1]), id="permute"),
    pytest.param(lambda b, x: b.call(aten.slice.Tensor, x, 1, 1), id="slice-start-1"),
    pytest.param(lambda b, x: b.call(aten.slice.Tensor, x, 1, 0, 2), id="slice-short-end"),
    pytest.param(lambda b, x: b.call(aten.slice.Tensor, x, 1, 0, -1), id="slice-negative-end"),
    pytest.param(lambda b, x: b.call(aten.slice.Tensor, x, 1, 0, INT64_MAX, 2), id="slice-step-2"),
    pytest.param(lambda b, x: b.call(aten._to_copy, x, dtype=torch.float64), id="to_copy-cast"),
    pytest.param(lambda b, x: b.call(aten._to_copy, x, dtype=F32, device=torch.device("cpu")), id="to_copy-device"),
    pytest.param(lambda b, x: b.call(aten.clone, x, memory_format=torch.contiguous_format), id="clone-format"),
]


@pytest.mark.parametrize("make", KEPT)
def test_keeps_ops_that_do_something(make):
    g = single(make)
    text = str(g)
    assert canonicalize(g, inputs_for(g)) == 0
    assert str(g) == text


@pytest.mark.parametrize("make, dtype", [
    (lambda b, x: b.call(aten.mul.Tensor, x, 1.0), torch.int64),   # i64 * 1.0 -> f32
    (lambda b, x: b.call(aten.div.Tensor, x, 1), torch.int64),     # true division -> f32
    (lambda b, x: b.call(aten.add.Tensor, x, 0), torch.bool),      # bool + 0 -> i64
    (lambda b, x: b.call(aten._to_copy, x, dtype=F32), torch.float16),
])
def test_keeps_identities_that_change_the_dtype(make, dtype):
    g = single(make, dtype=dtype)
    assert canonicalize(g, inputs_for(g)) == 0
    assert len(g.nodes) == 2


def test_keeps_clone_whose_result_is_a_graph_output():
    g = Graph("out")
    x = g.add_input(TensorType((3,), F32), "x")
    b = Builder(g)
    c = b.call(aten.clone, x)
    v = b.call(aten.view, x, [3])
    m = b.call(aten.mul.Tensor, x, 1)
    g.set_outputs([c, v, m])
    assert canonicalize(g, (torch.randn(3),)) == 0
    assert ops(g) == ["aten.clone", "aten.view", "aten.mul.Tensor"]
    xin = torch.randn(3)
    outs = to_fx(g)(xin)
    assert all(o.data_ptr() != xin.data_ptr() for o in (outs[0], outs[2]))


def test_keeps_clone_of_permuted_tensor_before_a_view():
    g = Graph("layout")
    x = g.add_input(TensorType((2, 3, 4), F32), "x")
    b = Builder(g)
    p = b.call(aten.permute, x, [0, 2, 1])
    c = b.call(aten.clone, p, memory_format=torch.contiguous_format)
    c2 = b.call(aten.clone, p)  # preserve_format keeps the permuted strides: the type says strided
    v = b.call(aten.view, b.call(aten.clone, c2, memory_format=torch.contiguous_format), [2, 12])
    g.set_outputs([b.call(aten.view, c, [24]), v])
    assert p.type.layout == "strided" and c.type.layout == "contiguous"
    canonicalize(g, (torch.randn(2, 3, 4),))
    assert len(g.find(aten.clone)) >= 2
    for view in g.find(aten.view):
        assert view.input(0).producer.is_a(aten.clone)
        assert view.input(0).type.layout == "contiguous"


def test_keeps_clone_that_protects_a_value_from_an_in_place_op():
    g = Graph("mutation")
    x = g.add_input(TensorType((4,), F32), "x")
    b = Builder(g)
    c = b.call(aten.clone, x)
    a = b.call(aten.add_.Tensor, c, 1.0)
    g.set_outputs([b.call(aten.mul.Tensor, a, 2.0)])
    assert canonicalize(g, (torch.zeros(4),)) == 0
    xin = torch.zeros(4)
    (out,) = to_fx(g)(xin)
    assert torch.equal(xin, torch.zeros(4)), "the caller's input was mutated"
    assert torch.equal(out, torch.full((4,), 2.0))


def test_canonicalize_exported_model():
    class Noisy(torch.nn.Module):
        def forward(self, x):
            y = x.clone().reshape(x.shape) * 1 + 0
            return y.permute(0, 1).contiguous()[:, :].relu()

    from kiln.frontend.export import from_export

    xin = torch.randn(3, 5)
    g = from_export(Noisy(), (xin,))
    assert ops(g) == ["aten.clone", "aten.view", "aten.mul.Tensor", "aten.add.Tensor", "aten.permute",
                      "aten.alias", "aten.relu"]
    assert canonicalize(g, (xin,)) == 6
    assert ops(g) == ["aten.relu"] and g.nodes[0].input(0) is g.inputs[0]
    assert_match(to_fx(g)(xin)[0], Noisy()(xin))
