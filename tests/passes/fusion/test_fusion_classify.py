"""Op classification for fusion: the table's kinds, reduced dims and rows, and what is opaque."""

from __future__ import annotations

import pytest
import torch

from kiln.ir import FUSED, Builder, Graph, TensorType, aten
from kiln.passes.fusion.classify import OpKind, classify, iteration_numel, reduced_dims, rows

F32 = torch.float32


def graph_x(shape=(2, 3, 8)):
    g = Graph("c")
    x = g.add_input(TensorType(shape, F32), "x")
    return g, x, Builder(g)


def last(g: Graph):
    return g.nodes[-1]


@pytest.mark.parametrize("build", [
    lambda b, x: b.call(aten.relu, x),
    lambda b, x: b.call(aten.add.Tensor, x, x),
    lambda b, x: b.call(aten.mul.Scalar, x, 2.0),
    lambda b, x: b.call(aten.where.self, b.call(aten.gt.Scalar, x, 0.0), x, b.call(aten.neg, x)),
    lambda b, x: b.call(aten.clamp, x, -1.0, 1.0),
    lambda b, x: b.call(aten._to_copy, x, dtype=torch.float16),
    lambda b, x: b.call(aten.full_like, x, 0.5),
    lambda b, x: b.call(aten.cat, [x, x], -1),
])
def test_pointwise_ops(build):
    g, x, b = graph_x()
    build(b, x)
    assert classify(last(g)).kind is OpKind.POINTWISE


@pytest.mark.parametrize("build, combine, dims, rk", [
    (lambda b, x: b.call(aten.sum.dim_IntList, x, [-1], True), "sum", (2,), (6, 8)),
    (lambda b, x: b.call(aten.mean.dim, x, [1, 2]), "mean", (1, 2), (2, 24)),
    (lambda b, x: b.call(aten.amax, x, [-1], True), "max", (2,), (6, 8)),
    (lambda b, x: b.call(aten.sum, x), "sum", (0, 1, 2), (1, 48)),
    (lambda b, x: b.call(aten.var.correction, x, [0], correction=1), "var", (0,), (24, 2)),
    (lambda b, x: b.call(aten.any.dim, b.call(aten.gt.Scalar, x, 0.0), -1, True), "any", (2,), (6, 8)),
])
def test_reductions_know_their_dims(build, combine, dims, rk):
    g, x, b = graph_x()
    build(b, x)
    cls = classify(last(g))
    assert cls.kind is OpKind.REDUCTION and cls.combine == combine
    assert reduced_dims(last(g)) == dims
    assert rows(last(g)) == rk


def test_composite_norms():
    g, x, b = graph_x()
    b.call(aten._softmax, x, 1, False)
    assert classify(last(g)).kind is OpKind.NORM and reduced_dims(last(g)) == (1,) and rows(last(g)) == (16, 3)
    b.call(aten.native_layer_norm, x, [3, 8], None, None, 1e-5)
    assert classify(last(g)).combine == "layer_norm" and reduced_dims(last(g)) == (1, 2)
    assert iteration_numel(last(g)) == 48  # the normalised output, not the statistics


def test_inference_batch_norm_is_a_norm_without_reduction():
    g, x, b = graph_x((2, 4, 3, 3))
    c = torch.ones(4)
    w, bias, rm, rv = (b.weight(n, c) for n in ("w", "b", "rm", "rv"))
    b.call(aten._native_batch_norm_legit_no_training, x, w, bias, rm, rv, 0.1, 1e-5)
    cls = classify(last(g))
    assert cls.kind is OpKind.NORM and not cls.reduces and reduced_dims(last(g)) == ()


def test_anchors_name_their_operands():
    g = Graph("a")
    x = g.add_input(TensorType((4, 8), F32), "x")
    b = Builder(g)
    b.call(aten.addmm, b.weight("bias", torch.zeros(5)), x, b.weight("w", torch.zeros(8, 5)))
    cls = classify(last(g))
    assert cls.kind is OpKind.ANCHOR and cls.operand == 1 and cls.weight == 2


def test_views_weights_and_opaque_ops():
    g, x, b = graph_x()
    b.call(aten.view, x, [6, 8])
    assert classify(last(g)).kind is OpKind.VIEW
    b.weight("w", torch.zeros(3))
    assert classify(last(g)).kind is OpKind.VIEW           # not a kernel
    b.call(aten.cumsum, x, 0)
    assert classify(last(g)).kind is OpKind.OPAQUE         # not in the table
    b.call(aten.rand_like, x)
    assert classify(last(g)).kind is OpKind.OPAQUE         # seeded randomness
    b.call(aten.relu_, x)
    assert classify(last(g)).kind is OpKind.OPAQUE         # side effects (in place)


def test_region_nodes_are_opaque():
    sub = Graph("attention")
    a = sub.add_input(TensorType((4,), F32), "a")
    sub.set_outputs([Builder(sub).call(aten.relu, a)])
    g = Graph("main")
    x = g.add_input(TensorType((4,), F32), "x")
    g.create_node(FUSED, [x], attrs={"kind": "attention"}, subgraph=sub)
    assert classify(last(g)).kind is OpKind.OPAQUE
