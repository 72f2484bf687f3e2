"""Typed rewrite patterns, the greedy fixpoint walker, the Builder's insertion points, and to_fx of built
graphs (the execution oracle)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import kiln.passes.base as passes_base
from kiln.errors import KilnError
from kiln.ir.builder import Builder
from kiln.ir.graph import Graph, Node
from kiln.ir.ops import FUSED, WEIGHT, aten
from kiln.ir.rewrite import Rewriter, apply_patterns, collect_patterns, is_dead, pattern
from kiln.ir.to_fx import to_fx
from kiln.ir.types import TensorType, sym
from kiln.ir.verifier import verify
from kiln.numerics import assert_match
from kiln.passes.base import PassContext, RewritePass, get_pass, register_pass

F32 = torch.float32


@dataclass(frozen=True)
class FoldDoubleNeg(RewritePass):
    """-(-x) -> x. Runs to a fixpoint; safe for every dtype."""

    @pattern(aten.neg)
    def rewrite(self, node: Node, rw: Rewriter) -> bool:
        inner = node.input(0).producer
        if inner is None or not inner.is_a(aten.neg):
            return False
        rw.replace_all_uses(node.output, inner.input(0))
        return True


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the pass registry, so test passes do not leak into other tests."""
    passes_base.registered_passes()  # load the built-in passes first
    monkeypatch.setattr(passes_base, "_PASSES", dict(passes_base._PASSES))
    return passes_base._PASSES


def neg_chain(n: int, shape=(2, 3)) -> Graph:
    g = Graph(f"neg{n}")
    v = g.add_input(TensorType(shape, F32), "x")
    b = Builder(g)
    for _ in range(n):
        v = b.call(aten.neg, v)
    g.set_outputs([v])
    return g


def run_graph(g: Graph, *inputs):
    with torch.no_grad():
        return to_fx(g)(*inputs)


def check_rewritten(before: Graph, after: Graph, inputs: tuple) -> None:
    verify(after)
    assert_match(run_graph(after, *inputs), run_graph(before, *inputs), "rewritten graph")


# -- a RewritePass registered by name ----------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_fold_double_neg_reaches_fixpoint(registry, n):
    register_pass("fold-double-neg")(FoldDoubleNeg)
    p = get_pass("fold-double-neg")
    assert isinstance(p, FoldDoubleNeg) and p.name == "fold-double-neg"
    g = neg_chain(n)
    reference = neg_chain(n)
    result = p.run(g, PassContext())
    assert len(g.find(aten.neg)) == n % 2
    assert len(g.nodes) == n % 2  # the walker erased every dead neg
    assert result.changed == (n >= 2)
    assert result.stats["rewrites"] == n // 2
    x = torch.randn(2, 3)
    check_rewritten(reference, g, (x,))
    if n % 2 == 0:
        assert g.outputs == g.inputs
    again = p.run(g, PassContext())  # a fixpoint: nothing more to do
    assert not again.changed and again.stats["rewrites"] == 0


def test_fold_double_neg_five_times_leaves_one_neg(registry):
    register_pass("fold-double-neg")(FoldDoubleNeg)
    g = neg_chain(5)
    get_pass("fold-double-neg").run(g, PassContext())
    assert str(g) == "\n".join(["graph @neg5(%x: f32[2, 3]) -> (f32[2, 3]) {",
                                "  %4 = aten.neg(%x) : f32[2, 3]",
                                "  return %4",
                                "}"])


def test_fold_keeps_inner_neg_with_other_users(registry):
    g = Graph("shared")
    x = g.add_input(TensorType((4,), F32), "x")
    b = Builder(g)
    n1 = b.call(aten.neg, x, name="n1")
    n2 = b.call(aten.neg, n1, name="n2")
    r = b.call(aten.relu, n2, name="r")
    g.set_outputs([r, n1])
    apply_patterns(g, collect_patterns(FoldDoubleNeg()))
    assert [n.results[0].name for n in g.nodes] == ["n1", "r"]
    assert g.find(aten.relu)[0].input(0) is x
    verify(g)


def test_pattern_does_not_fire_on_other_ops():
    g = Graph("other")
    x = g.add_input(TensorType((4,), F32), "x")
    b = Builder(g)
    v = b.call(aten.relu, x)
    v = b.call(aten.abs, v)
    v = b.call(aten.neg, v)  # neg(abs(...)): a neg, but not of a neg
    v = b.call(aten.sigmoid, v)
    g.set_outputs([v])
    text = str(g)
    calls = []

    class Spy(FoldDoubleNeg):
        @pattern(aten.neg)
        def rewrite(self, node, rw):
            calls.append(node.op.name)
            return super().rewrite(node, rw)

    assert apply_patterns(g, collect_patterns(Spy())) == 0
    assert str(g) == text
    assert calls == ["aten.neg"]  # only called on the matching op


def test_overload_pattern_matches_only_that_overload():
    g = Graph("ov")
    x = g.add_input(TensorType((4,), F32), "x")
    b = Builder(g)
    t = b.call(aten.add.Tensor, x, x)
    s = b.call(aten.add.Scalar, x, 2)
    g.set_outputs([t, s])
    seen = []

    class Watch:
        @pattern(aten.add.Scalar)
        def scalar(self, node, rw):
            seen.append(node.op.name)
            return False

    apply_patterns(g, collect_patterns(Watch()))
    assert seen == ["aten.add.Scalar"]
    (bp,) = collect_patterns(Watch())
    assert bp.matches(g.nodes[1]) and not bp.matches(g.nodes[0])
    assert bp.name == "Watch.scalar"


def test_pattern_needs_an_op():
    with pytest.raises(TypeError, match="at least one op"):
        pattern()


def test_collect_patterns_in_definition_order():
    class Many:
        @pattern(aten.relu)
        def zeta(self, node, rw):
            return False

        @pattern(aten.neg, aten.abs)
        def alpha(self, node, rw):
            return False

        def not_a_pattern(self):
            pass

    names = [p.name for p in collect_patterns(Many())]
    assert names == ["Many.zeta", "Many.alpha"]


# -- the walker --------------------------------------------------------------------------------------------

class Expand:
    """sub(a, b) -> add(a, neg(b)): creates nodes with rw.call that other patterns then see."""

    @pattern(aten.sub.Tensor)
    def sub_to_add(self, node, rw):
        if node.kwargs or len(node.args) != 2:
            return False
        neg = rw.call(aten.neg, node.args[1])
        rw.replace_node(node, [rw.call(aten.add.Tensor, node.args[0], neg)])
        return True


def test_new_nodes_are_revisited_by_other_patterns():
    g = Graph("sub")
    x = g.add_input(TensorType((3,), F32), "x")
    y = g.add_input(TensorType((3,), F32), "y")
    b = Builder(g)
    ny = b.call(aten.neg, y)
    d = b.call(aten.sub.Tensor, x, ny)  # x - (-y) -> x + (-(-y)) -> x + y
    g.set_outputs([d])
    reference = Graph("ref")
    rx, ry = reference.add_input(x.type, "x"), reference.add_input(y.type, "y")
    reference.set_outputs([Builder(reference).call(aten.add.Tensor, rx, ry)])
    n = apply_patterns(g, collect_patterns(Expand()) + collect_patterns(FoldDoubleNeg()))
    assert n == 2
    assert [node.op.name for node in g.nodes] == ["aten.add.Tensor"]
    assert g.nodes[0].args == (x, y)
    check_rewritten(reference, g, (torch.randn(3), torch.randn(3)))


def test_rw_call_inserts_before_the_rewritten_node():
    g = Graph("order")
    x = g.add_input(TensorType((3,), F32), "x")
    b = Builder(g)
    a = b.call(aten.relu, x, name="a")
    d = b.call(aten.sub.Tensor, a, x, name="d")
    e = b.call(aten.abs, d, name="e")
    g.set_outputs([e])
    apply_patterns(g, collect_patterns(Expand()))
    assert [n.op.name for n in g.nodes] == ["aten.relu", "aten.neg", "aten.add.Tensor", "aten.abs"]
    verify(g)


def test_dead_pure_producers_are_erased_but_side_effects_kept():
    g = Graph("dead")
    x = g.add_input(TensorType((3,), F32), "x")
    b = Builder(g)
    n1 = b.call(aten.neg, x)
    n2 = b.call(aten.neg, n1)
    g.set_outputs([n2])
    apply_patterns(g, collect_patterns(FoldDoubleNeg()))
    assert g.nodes == [] and g.outputs == [x]
    pure = b.call(aten.relu, x)
    mut = b.call(aten.add_.Tensor, x, 1.0)
    assert is_dead(g, pure.producer) and not is_dead(g, mut.producer)


class NegToMul:
    @pattern(aten.neg)
    def neg_to_mul(self, node, rw):
        rw.replace_node(node, [rw.call(aten.mul.Tensor, node.input(0), -1)])
        return True


class MulToNeg:
    @pattern(aten.mul.Tensor)
    def mul_to_neg(self, node, rw):
        if node.args[1] != -1:
            return False
        rw.replace_node(node, [rw.call(aten.neg, node.args[0])])
        return True


def test_patterns_undoing_each_other_raise():
    g = neg_chain(1)
    pats = collect_patterns(NegToMul()) + collect_patterns(MulToNeg())
    with pytest.raises(KilnError, match="did not converge after 25 rewrites") as info:
        apply_patterns(g, pats, max_rewrites=25)
    assert "undo each other" in str(info.value)
    assert "NegToMul.neg_to_mul" in str(info.value) or "MulToNeg.mul_to_neg" in str(info.value)


def test_each_pattern_alone_converges():
    g = neg_chain(3)
    assert apply_patterns(g, collect_patterns(NegToMul()), max_rewrites=25) == 3
    assert len(g.find(aten.mul)) == 3
    assert apply_patterns(g, collect_patterns(MulToNeg()), max_rewrites=25) == 3
    assert len(g.find(aten.neg)) == 3 and len(g.nodes) == 3
    check_rewritten(neg_chain(3), g, (torch.randn(2, 3),))


def test_rewrite_pass_in_pass_manager(registry):
    from kiln.passes.manager import PassManager, VerifyInstrument

    register_pass("fold-double-neg")(FoldDoubleNeg)
    g = neg_chain(4)
    records = PassManager.from_pipeline("canonicalize,fold-double-neg,dce", [VerifyInstrument()]).run(g)
    assert [r.name for r in records] == ["canonicalize", "fold-double-neg", "dce"]
    assert records[1].changed and records[1].stats == {"rewrites": 2}
    assert g.nodes == []


# -- Builder ----------------------------------------------------------------------------------------------

def _names(g: Graph) -> list[str]:
    return [n.results[0].name for n in g.nodes]


def test_builder_appends_in_program_order():
    g = Graph("b")
    x = g.add_input(TensorType((2,), F32), "x")
    b = Builder(g)
    b.call(aten.neg, x, name="a")
    b.call(aten.relu, x, name="b")
    assert _names(g) == ["a", "b"]


def test_builder_before_and_after_keep_inserting_in_order():
    g = Graph("b")
    x = g.add_input(TensorType((2,), F32), "x")
    b = Builder(g)
    first = b.call(aten.neg, x, name="first")
    last = b.call(aten.relu, first, name="last")
    before = Builder.before(last.producer)
    before.call(aten.abs, first, name="b1")
    before.call(aten.abs, first, name="b2")
    after = Builder.after(first.producer)
    after.call(aten.sigmoid, first, name="a1")
    after.call(aten.sigmoid, first, name="a2")
    assert _names(g) == ["first", "a1", "a2", "b1", "b2", "last"]
    end = Builder.after(last.producer)
    end.call(aten.tanh, last, name="z")
    assert _names(g)[-1] == "z"
    verify(g)


def test_builder_weight_reuse_and_placement():
    g = Graph("w")
    x = g.add_input(TensorType((3,), F32), "x")
    b = Builder(g)
    t = torch.randn(3)
    n = b.call(aten.neg, x, name="n")
    w1 = b.weight("w", t)
    assert b.weight("w", t) is w1  # same name, same tensor: reused
    w2 = Builder.before(n.producer).weight("v", torch.randn(3))
    assert g.nodes[0].op is WEIGHT and g.nodes[0].output is w2  # weights go to the top
    other = b.weight("w2", t)
    assert other is not w1 and g.weights["w2"] is t
    b.call(aten.add.Tensor, n, w1)
    verify(g)


def test_builder_name_collisions_get_fresh_names():
    g = Graph("names")
    x = g.add_input(TensorType((2,), F32), "x")
    b = Builder(g)
    a = b.call(aten.neg, x, name="x")
    c = b.call(aten.neg, a, name="weird name!")
    assert a.name != "x" and a.name.startswith("x")
    assert c.name == "weird_name_"
    verify(g)


def test_builder_multi_result_and_explicit_node():
    g = Graph("m")
    x = g.add_input(TensorType((2, 5), F32), "x")
    b = Builder(g)
    values, indices = b.call(aten.max.dim, x, 1)
    assert indices.type == TensorType((2,), torch.int64)
    node = b.node(aten.relu, (values,), attrs={"note": "explicit"}, names=["r"])
    assert node.output.name == "r" and node.attrs == {"note": "explicit"}
    g.set_outputs([node.output, indices])
    verify(g)


# -- to_fx of built graphs matches eager -------------------------------------------------------------------

def test_to_fx_of_built_mlp_matches_eager():
    torch.manual_seed(0)
    w1, b1, w2 = torch.randn(8, 4), torch.randn(8), torch.randn(3, 8)
    g = Graph("mlp")
    x = g.add_input(TensorType((sym("s0"), 4), F32), "x")
    b = Builder(g)
    h = b.call(aten.addmm, b.weight("b1", b1), x, b.call(aten.permute, b.weight("w1", w1), [1, 0]))
    h = b.call(aten.gelu, h, approximate="tanh")
    y = b.call(aten.mm, h, b.call(aten.t, b.weight("w2", w2)))
    values, indices = b.call(aten.max.dim, y, 1)
    sm = b.call(aten._softmax, y, -1, False)
    g.set_outputs([sm, values, indices])
    verify(g)
    gm = to_fx(g)
    for batch in (1, 5):
        xin = torch.randn(batch, 4)
        ey = torch.nn.functional.gelu(xin @ w1.t() + b1, approximate="tanh") @ w2.t()
        ev, ei = ey.max(1)
        out = gm(xin)
        assert_match(list(out), [ey.softmax(-1), ev, ei], f"batch {batch}")


def test_to_fx_of_fused_region_and_names_that_are_not_python_identifiers():
    sub = Graph("region")
    a = sub.add_input(TensorType((3,), F32))  # named %0
    sub.set_outputs([Builder(sub).call(aten.mul.Tensor, a, 2.0)])
    g = Graph("outer")
    inputs = [g.add_input(TensorType((3,), F32), name) for name in ("self", "0", "torch", "def")]
    b = Builder(g)
    s = b.call(aten.add.Tensor, inputs[0], inputs[1])
    s = b.call(aten.sub.Tensor, s, inputs[2])
    s = b.call(aten.mul.Tensor, s, inputs[3])
    fused = g.create_node(FUSED, [s], subgraph=sub)
    g.set_outputs([fused.output])
    verify(g)
    xs = [torch.randn(3) for _ in inputs]
    (out,) = to_fx(g)(*xs)
    assert_match(out, ((xs[0] + xs[1] - xs[2]) * xs[3]) * 2.0)


def test_to_fx_weight_without_tensor_raises():
    g = Graph("w")
    g.set_outputs([g.create_node(WEIGHT, (), {}, [TensorType((2,), F32)], attrs={"name": "missing"}).output])
    with pytest.raises(KilnError, match="weight 'missing'"):
        to_fx(g)
