"""Constant folding: nodes computed only from weights become weights (computed by PyTorch); nodes that
read a graph input, random ops, input-less ops and folds that would grow the artifact stay."""

from __future__ import annotations

import pytest
import torch

from kiln.ir.builder import Builder
from kiln.ir.clone import clone_graph
from kiln.ir.graph import Graph
from kiln.ir.ops import WEIGHT, aten
from kiln.ir.to_fx import to_fx
from kiln.ir.types import TensorType, sym
from kiln.ir.verifier import verify
from kiln.numerics import assert_match
from kiln.passes.base import PassContext, get_pass
from kiln.passes.constant_fold import fold_constants

F32 = torch.float32


def run_fold(g: Graph, inputs: tuple | None = None, **options) -> int:
    before = clone_graph(g)
    result = get_pass("constant-fold", **options).run(g, PassContext())
    verify(g)
    if inputs is not None:
        with torch.no_grad():
            assert_match(list(to_fx(g)(*inputs)), list(to_fx(before)(*inputs)), "after constant-fold")
    assert result.changed == (result.stats["folded"] > 0)
    return result.stats["folded"]


def compute_ops(g: Graph) -> list[str]:
    return [n.op.name for n in g.nodes if n.op is not WEIGHT]


def test_folds_permute_of_a_weight():
    torch.manual_seed(0)
    w = torch.randn(3, 4)
    g = Graph("cf")
    x = g.add_input(TensorType((2, 4), F32), "x")
    b = Builder(g)
    g.set_outputs([b.call(aten.mm, x, b.call(aten.permute, b.weight("fc.weight", w), [1, 0]))])
    assert run_fold(g, (torch.randn(2, 4),)) == 1
    assert compute_ops(g) == ["aten.mm"]
    folded = g.find(aten.mm)[0].args[1].producer
    assert folded.op is WEIGHT and folded.attrs["name"] == "fc.weight.permute.0"
    assert torch.equal(g.weights["fc.weight.permute.0"], w.permute(1, 0))
    assert folded.output.type == TensorType((4, 3), F32, "strided")  # the layout of what permute gives
    get_pass("dce").run(g, PassContext())
    assert set(g.weights) == {"fc.weight.permute.0"}
    verify(g)


def test_the_same_computation_on_a_weight_is_folded_once():
    # an unrolled RNN transposes its recurrent weight at every step: one folded copy, read by every step
    torch.manual_seed(0)
    g = Graph("cf")
    h = g.add_input(TensorType((2, 4), F32), "h")
    b = Builder(g)
    w = b.weight("hh.weight", torch.randn(4, 4))
    for _ in range(3):
        h = b.call(aten.tanh, b.call(aten.mm, h, b.call(aten.permute, w, [1, 0])))
    other = b.call(aten.mm, h, b.call(aten.permute, w, [0, 1]))  # another computation: its own weight
    g.set_outputs([other])
    assert run_fold(g, (torch.randn(2, 4),)) == 4
    get_pass("dce").run(g, PassContext())
    assert sorted(g.weights) == ["hh.weight.permute.0", "hh.weight.permute.1"]
    reads = [n.attrs["name"] for n in g.nodes if n.op is WEIGHT]
    assert reads.count("hh.weight.permute.0") == 3
    verify(g)


def test_folds_chains_of_weight_only_nodes_in_one_sweep():
    g = Graph("chain")
    x = g.add_input(TensorType((3,), F32), "x")
    b = Builder(g)
    w, s = torch.randn(3), torch.randn(3)
    scaled = b.call(aten.mul.Tensor, b.weight("w", w), b.weight("s", s))
    shifted = b.call(aten.add.Tensor, scaled, 1.0)
    g.set_outputs([b.call(aten.add.Tensor, x, shifted)])
    assert run_fold(g, (torch.randn(3),)) == 2
    assert compute_ops(g) == ["aten.add.Tensor"]
    torch.testing.assert_close(g.weights["w.mul.0.add.0"], w * s + 1.0, rtol=0, atol=0)


def test_folds_multi_result_node():
    g = Graph("multi")
    x = g.add_input(TensorType((4,), F32), "x")
    b = Builder(g)
    w = torch.randn(3, 4)
    values, indices = b.call(aten.max.dim, b.weight("w", w), 0)
    g.set_outputs([b.call(aten.add.Tensor, x, values), indices])
    assert run_fold(g, (torch.randn(4),)) == 1
    ev, ei = w.max(0)
    assert torch.equal(g.weights["w.max.0"], ev) and torch.equal(g.weights["w.max.1"], ei)
    assert g.outputs[1].producer.op is WEIGHT


def test_weight_names_do_not_collide():
    g = Graph("names")
    b = Builder(g)
    g.weights["w.neg.0"] = torch.zeros(2)  # already taken
    g.set_outputs([b.call(aten.neg, b.weight("w", torch.ones(2)))])
    assert run_fold(g, ()) == 1
    assert g.outputs[0].producer.attrs["name"] == "w.neg.1"
    assert torch.equal(g.weights["w.neg.1"], -torch.ones(2))


def test_does_not_fold_ops_reading_a_graph_input():
    g = Graph("input")
    x = g.add_input(TensorType((3,), F32), "x")
    b = Builder(g)
    g.set_outputs([b.call(aten.mul.Tensor, x, b.weight("w", torch.randn(3))), b.call(aten.neg, x)])
    assert run_fold(g, (torch.randn(3),)) == 0
    assert compute_ops(g) == ["aten.mul.Tensor", "aten.neg"]


def test_does_not_fold_expand_that_would_grow():
    g = Graph("grow")
    x = g.add_input(TensorType((64, 8), F32), "x")
    b = Builder(g)
    e = b.call(aten.expand, b.weight("bias", torch.randn(1, 8)), [64, 8])
    g.set_outputs([b.call(aten.add.Tensor, x, e)])
    xin = torch.randn(64, 8)
    assert run_fold(g, (xin,)) == 0
    assert compute_ops(g) == ["aten.expand", "aten.add.Tensor"]
    assert run_fold(g, (xin,), max_growth=32.0) == 0  # 64x bigger: still too much
    assert run_fold(g, (xin,), max_growth=64.0) == 1
    assert compute_ops(g) == ["aten.add.Tensor"]


def test_same_size_result_folds_at_default_growth():
    g = Graph("same")
    b = Builder(g)
    w = torch.randn(2, 6)
    g.set_outputs([b.call(aten.view, b.weight("w", w), [3, 4])])
    assert run_fold(g, ()) == 1
    assert torch.equal(g.weights["w.view.0"], w.view(3, 4))


def test_does_not_fold_nondeterministic_or_input_less_ops():
    g = Graph("rand")
    b = Builder(g)
    w = b.weight("w", torch.rand(4))
    g.set_outputs([b.call(aten.bernoulli, w), b.call(aten.rand_like, w), b.call(aten.full, [4], 2.0),
                   b.call(aten.arange, 4)])
    assert run_fold(g) == 0
    assert compute_ops(g) == ["aten.bernoulli", "aten.rand_like", "aten.full", "aten.arange"]


def test_does_not_fold_side_effecting_ops():
    g = Graph("effects")
    b = Builder(g)
    w = b.weight("w", torch.zeros(3))
    b.call(aten.add_.Tensor, w, 1.0)
    g.set_outputs([w])
    assert run_fold(g) == 0
    assert compute_ops(g) == ["aten.add_.Tensor"]


def test_does_not_fold_symbolic_results():
    g = Graph("sym")
    x = g.add_input(TensorType((sym("s0"), 3), F32), "x")
    b = Builder(g)
    w = b.weight("w", torch.randn(1, 3))
    size = b.call(aten.sym_size.int, x, 0)
    g.set_outputs([b.call(aten.expand, w, [size, 3])])
    assert run_fold(g, max_growth=1e9) == 0


def test_layout_of_folded_weight_matches_declared_type():
    g = Graph("layout")
    b = Builder(g)
    w = torch.randn(1, 2, 3, 4)
    cl = b.call(aten.clone, b.weight("w", w), memory_format=torch.channels_last)
    g.set_outputs([cl])
    assert cl.type.layout == "channels_last"
    assert run_fold(g, ()) == 1
    folded = g.outputs[0].producer
    assert folded.output.type.layout == "channels_last"
    assert g.weights[folded.attrs["name"]].is_contiguous(memory_format=torch.channels_last)


def test_exported_linear_weights_fold():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    from kiln.frontend.export import from_export

    xin = torch.randn(3, 4)
    g = from_export(model, (xin,))
    assert run_fold(g, (xin,)) == 2  # both weight transposes
    assert compute_ops(g) == ["aten.addmm", "aten.relu", "aten.addmm"]
    with torch.no_grad():
        assert_match(to_fx(g)(xin)[0], model(xin))
    assert fold_constants(g) == 0


@pytest.mark.parametrize("bad", [{"max_grow": 2.0}, {"threshold": 1}])
def test_unknown_option_is_rejected(bad):
    from kiln.errors import KilnInputError

    with pytest.raises(KilnInputError, match="max_growth"):
        get_pass("constant-fold", **bad)
