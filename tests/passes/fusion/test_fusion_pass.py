"""The ``fuse`` pass as a whole: registration, text form, cost accounting, and seeded random graphs
(unary/binary ops with broadcasts, mm, cat, slices, row sums) that must stay correct and convex."""

from __future__ import annotations

import pytest
import torch

from kiln.ir import Builder, Graph, TensorType, aten, sym
from kiln.ir.clone import clone_graph
from kiln.ir.outline import cycle_witness
from kiln.ir.printer import print_graph
from kiln.passes.analysis import graph_cost, is_kernel
from kiln.passes.base import get_pass, registered_passes
from kiln.passes.fusion import Fuse, find_groups
from kiln.passes.fusion.fuse import _views_between
from kiln.scheduler.graphs import random_dag

F32 = torch.float32


def test_registered_as_fuse():
    assert registered_passes()["fuse"] is Fuse
    assert isinstance(get_pass("fuse"), Fuse)


def test_group_attrs_are_in_the_text_form(fuse):
    g = Graph("softmax")
    x = g.add_input(TensorType((4, 16), F32), "x")
    b = Builder(g)
    g.set_outputs([b.call(aten._softmax, b.call(aten.mul.Scalar, x, 2.0), -1, False)])
    fuse(g)
    text = print_graph(g)
    assert 'kiln.fused(%x) {kind = "reduction", structure = "online-softmax", pattern = "softmax", numel = 4, ' \
           'rnumel = 16}' in text


def test_region_cost_counts_the_weights_it_reads(fuse):
    g = Graph("linear")
    x = g.add_input(TensorType((4, 8), F32), "x")
    b = Builder(g)
    y = b.call(aten.addmm, b.weight("bias", torch.rand(16)), x, b.weight("w", torch.rand(8, 16)))
    g.set_outputs([b.call(aten.relu, y)])
    before = graph_cost(g)
    fuse(g)
    after = graph_cost(g)
    assert after.kernels == 1 and before.kernels == 2
    # x, bias and w are still read; only the addmm result's write and re-read are gone
    assert after.bytes_read == before.bytes_read - 4 * 16 * 4
    assert after.bytes_written == before.bytes_written - 4 * 16 * 4


@pytest.mark.parametrize("seed", range(6))
def test_random_graphs_stay_correct_and_convex(fuse, seed):
    g = random_dag(40, seed)
    planned = clone_graph(g)
    for group in find_groups(planned):
        region = set(group.members) | set(_views_between(planned, group.members))
        assert cycle_witness(region) is None
    before = graph_cost(g)
    fuse(g)
    after = graph_cost(g)
    assert after.kernels <= before.kernels and after.intermediate_bytes <= before.intermediate_bytes


@pytest.mark.slow
def test_a_thousand_node_graph(fuse):
    g = random_dag(1000, 3)
    kernels = sum(map(is_kernel, g.nodes))
    groups, result = fuse(g)
    assert kernels > 900 and result.stats["kernels_after"] < kernels / 2
    assert all(len(grp.kernels) <= 256 for grp in groups)


def test_symbolic_shapes_fuse_with_exact_sizes(fuse):
    g = Graph("dynamic")
    x = g.add_input(TensorType((sym("s0"), 16), F32), "x")
    b = Builder(g)
    e = b.call(aten.exp, b.call(aten.sub.Tensor, x, b.call(aten.amax, x, [-1], True, name="m"), name="d"), name="e")
    g.set_outputs([b.call(aten.div.Tensor, e, b.call(aten.sum.dim_IntList, e, [-1], True, name="s"), name="y")])
    groups, _ = fuse(g, inputs=(torch.randn(5, 16),))
    assert [grp.kernels for grp in groups] == [frozenset({"m", "d", "e", "s", "y"})]
    assert groups[0].attrs == {"kind": "reduction", "structure": "online-softmax", "pattern": "softmax",
                               "numel": "s0", "rnumel": 16}


def test_traffic_through_narrowing_views_counts_the_part_read():
    g = Graph("rows")
    x = g.add_input(TensorType((4, 8), F32), "x")
    b = Builder(g)
    r = b.call(aten.relu, x)
    rows = [b.call(aten.neg, b.call(aten.select.int, r, 0, i)) for i in range(4)]
    wide = b.call(aten.add.Tensor, b.call(aten.expand, b.call(aten.sum.dim_IntList, r, [0], True), [64, 8]), 1.0)
    g.set_outputs([*rows, wide])
    # relu's 128 bytes: written once, read 4 x 32 by the row kernels and 128 by the sum; the sum's 32
    # bytes are written once and read once through the expand (not 64 x 8 x 4)
    assert graph_cost(g).intermediate_bytes == (128 + 4 * 32 + 128) + (32 + 32)
