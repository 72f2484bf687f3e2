"""Regions: outline_region and its inverse inline_region keep the graph's meaning, its weights and its
verifier invariants."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import KilnError
from kiln.ir.builder import Builder
from kiln.ir.graph import Graph
from kiln.ir.ops import FUSED, WEIGHT, aten
from kiln.ir.outline import inline_region, outline_region
from kiln.ir.to_fx import to_fx
from kiln.ir.types import TensorType
from kiln.ir.verifier import verify

F32 = torch.float32


def _graph():
    g = Graph("t")
    b = Builder(g)
    x = g.add_input(TensorType((4, 8), F32), "x")
    w = b.weight("w", torch.randn(8, 8))
    y = b.call(aten.relu, b.call(aten.mm, x, w))
    z = b.call(aten.add.Tensor, y, b.call(aten.tanh, x))
    g.set_outputs([z, y])
    return g, x


def test_inline_undoes_outline():
    g, x = _graph()
    xs = torch.randn(4, 8)
    before = to_fx(g)(xs)
    mm, relu = g.nodes[1], g.nodes[2]
    assert mm.is_a(aten.mm) and relu.is_a(aten.relu)
    group = outline_region(g, [g.nodes[0], mm, relu], FUSED, {"kind": "epilogue"}, "grp")
    assert not any(n.op is WEIGHT for n in g.nodes) and "w" in group.subgraph.weights
    verify(g)
    inlined = inline_region(g, group)
    verify(g)
    assert [n.op.name for n in inlined] == ["kiln.weight", "aten.mm", "aten.relu"]
    assert g.weights["w"] is group.subgraph.weights["w"]  # shared, not copied
    assert not any(n.op is FUSED for n in g.nodes)
    for got, ref in zip(to_fx(g)(xs), before):
        torch.testing.assert_close(got, ref)


def test_inlined_nodes_can_be_outlined_again_with_their_weights():
    g, _ = _graph()
    xs = torch.randn(4, 8)
    before = to_fx(g)(xs)
    group = outline_region(g, g.nodes[:3], FUSED, {"kind": "epilogue"}, "a")
    nodes = inline_region(g, group)  # the weight node is now a region member: its tensor must follow it
    again = outline_region(g, nodes, FUSED, {"kind": "epilogue"}, "b")
    assert again.subgraph.weights.keys() == {"w"}
    verify(g)
    for got, ref in zip(to_fx(g)(xs), before):
        torch.testing.assert_close(got, ref)


def test_inline_renames_a_weight_whose_name_is_taken_by_another_tensor():
    g, _ = _graph()
    group = outline_region(g, g.nodes[:3], FUSED, {"kind": "epilogue"}, "a")
    other = torch.randn(8, 8)
    g.weights["w"] = other  # the parent now names another tensor "w"
    inline_region(g, group)
    (wnode,) = [n for n in g.nodes if n.op is WEIGHT]
    assert wnode.attrs["name"] != "w" and g.weights[wnode.attrs["name"]] is group.subgraph.weights["w"]
    assert g.weights["w"] is other


def test_inline_of_a_plain_node_is_an_error():
    g, _ = _graph()
    with pytest.raises(KilnError, match="holds no subgraph"):
        inline_region(g, g.nodes[1])
