"""Cost analyses: FLOPs from torch's formulas, bytes, kernel count, intermediate traffic."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import KilnError
from kiln.ir import FUSED, Builder, Graph, TensorType, aten, sym
from kiln.passes.analysis import graph_cost, node_cost


def _chain():
    g = Graph("chain")
    x = g.add_input(TensorType((8, 16), torch.float32), "x")
    w = g.add_input(TensorType((16, 4), torch.float32), "w")
    b = Builder(g)
    h = b.call(aten.mm, x, w)               # 2*8*16*4 flops; reads x, w; writes h
    v = b.call(aten.view, h, [32])           # a view: no kernel, no traffic
    r = b.call(aten.relu, v)                 # 32 flops
    g.set_outputs([r])
    return g


def test_matmul_flops_and_bytes():
    g = _chain()
    mm = g.nodes[0]
    c = node_cost(mm)
    assert c.flops == 2 * 8 * 16 * 4
    assert c.bytes_read == (8 * 16 + 16 * 4) * 4 and c.bytes_written == 8 * 4 * 4
    assert node_cost(g.nodes[1]).is_kernel is False and node_cost(g.nodes[1]).bytes == 0


def test_graph_totals_and_intermediate_traffic_through_views():
    cost = graph_cost(_chain())
    assert cost.kernels == 2
    assert cost.flops == 2 * 8 * 16 * 4 + 32
    # h is written by mm and read (through the view) by relu: 128 bytes twice
    assert cost.intermediate_bytes == 2 * 32 * 4


def test_fused_region_is_one_kernel_without_intermediates():
    sub = Graph("ew")
    a = sub.add_input(TensorType((64,), torch.float32), "a")
    sb = Builder(sub)
    sub.set_outputs([sb.call(aten.relu, sb.call(aten.neg, a))])
    g = Graph("main")
    x = g.add_input(TensorType((64,), torch.float32), "x")
    node = g.create_node(FUSED, [x], subgraph=sub)
    g.set_outputs(node.results)
    c = graph_cost(g)
    assert c.kernels == 1 and c.flops == 128 and c.intermediate_bytes == 0
    assert c.bytes_read == 256 and c.bytes_written == 256
    assert graph_cost(sub).intermediate_bytes == 2 * 256  # unfused, neg's output goes through memory


def test_symbolic_shapes_are_rejected_clearly():
    g = Graph("sym")
    x = g.add_input(TensorType((sym("s0"), 4), torch.float32), "x")
    g.set_outputs([Builder(g).call(aten.relu, x)])
    with pytest.raises(KilnError, match="static shapes; %x"):
        graph_cost(g)
