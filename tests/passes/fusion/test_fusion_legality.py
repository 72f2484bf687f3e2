"""Near misses that must NOT fuse, and the legality rules one at a time (``plan_group`` on chosen sets).

Each near miss is checked twice: the rule itself (``plan_group`` says Illegal, naming why), and the pass
(no group holds the forbidden combination, and the fused graph still computes the same thing).
"""

from __future__ import annotations

import pytest
import torch

from kiln.errors import KilnInputError
from kiln.ir import FUSED, Builder, Graph, TensorType, aten
from kiln.ir.outline import cycle_witness
from kiln.passes.base import get_pass
from kiln.passes.fusion import Illegal, find_groups, plan_group
from kiln.passes.fusion.kernels import KernelGraph

F32 = torch.float32


def new_graph(*shapes):
    g = Graph("l")
    xs = [g.add_input(TensorType(s, F32), f"x{i}") for i, s in enumerate(shapes)]
    return g, xs, Builder(g)


def nodes(g: Graph, *names: str) -> frozenset:
    by_name = {n.results[0].name: n for n in g.nodes if n.results}
    return frozenset(by_name[n] for n in names)


def plan(g: Graph, *names: str):
    return plan_group(KernelGraph(g), nodes(g, *names))


def together(groups, *names: str) -> bool:
    return any({n for n in names} <= {m.results[0].name for m in grp.members} for grp in groups)


def test_merge_that_creates_a_cycle_is_refused(fuse):
    # r -> cumsum (opaque) -> a, and r -> a: {r, a} would be a region that feeds cumsum and reads it
    g, (x,), b = new_graph((4, 8))
    r = b.call(aten.relu, x, name="r")
    c = b.call(aten.cumsum, r, 1, name="c")
    a = b.call(aten.add.Tensor, r, c, name="a")
    g.set_outputs([a])
    assert cycle_witness(nodes(g, "r", "a")) is not None
    assert not isinstance(plan(g, "r", "a"), Illegal)      # legal as a set: only the cycle check refuses it
    assert not together(find_groups(g), "r", "a")
    groups, _ = fuse(g)
    assert groups == []


def test_cycle_through_another_group_is_refused(fuse):
    # p -> q -> cumsum (opaque) -> s -> t, plus p -> s and q -> t: p never joins s, q never joins t
    g, (x,), b = new_graph((4, 8))
    p = b.call(aten.exp, x, name="p")
    q = b.call(aten.neg, p, name="q")
    o = b.call(aten.cumsum, q, 1, name="o")
    s = b.call(aten.add.Tensor, p, o, name="s")
    g.set_outputs([b.call(aten.mul.Tensor, s, q, name="t")])
    assert cycle_witness(nodes(g, "p", "s")) is not None and cycle_witness(nodes(g, "q", "t")) is not None
    groups, _ = fuse(g)
    assert [grp.kernels for grp in groups] == [frozenset({"p", "q"}), frozenset({"s", "t"})]


def test_reduction_output_used_over_two_iteration_spaces(fuse):
    g, (x,), b = new_graph((8, 16))
    s = b.call(aten.sum.dim_IntList, x, [-1], True, name="s")
    y1 = b.call(aten.div.Tensor, x, s, name="y1")        # over the rows' elements (128)
    y2 = b.call(aten.mul.Scalar, s, 2.0, name="y2")      # over the reduced rows (8)
    g.set_outputs([y1, y2])
    verdict = plan(g, "s", "y1", "y2")
    assert isinstance(verdict, Illegal) and "different iteration spaces" in verdict.reason
    assert not isinstance(plan(g, "s", "y1"), Illegal) and not isinstance(plan(g, "s", "y2"), Illegal)
    groups, _ = fuse(g)
    assert not together(find_groups(g), "s", "y1", "y2")
    assert len(groups) == 1 and len(groups[0].kernels) == 2 and "s" in groups[0].kernels


def test_reduced_value_broadcast_back_across_a_non_row_structure():
    # a column reduction (dim 0) read back over the whole tensor: not a row kernel
    g, (x,), b = new_graph((8, 16))
    s = b.call(aten.sum.dim_IntList, x, [0], True, name="s")
    b.call(aten.div.Tensor, x, s, name="y")
    verdict = plan(g, "s", "y")
    assert isinstance(verdict, Illegal) and "non-row" in verdict.reason


def test_side_effects_never_fuse(fuse):
    g, (x,), b = new_graph((4, 8))
    r = b.call(aten.relu, x, name="r")
    m = b.call(aten.mul.Scalar, r, 3.0, name="m")
    inplace = b.call(aten.add_.Tensor, m, 1.0, name="inplace")   # mutates m: side effects
    out = b.call(aten.neg, inplace, name="out")
    g.set_outputs([out])
    verdict = plan(g, "m", "inplace")
    assert isinstance(verdict, Illegal) and "opaque" in verdict.reason
    groups, _ = fuse(g)
    assert all("inplace" not in grp.kernels for grp in groups)
    assert [grp.kernels for grp in groups] == [frozenset({"r", "m"})]


def test_random_ops_never_fuse(fuse):
    g, (x,), b = new_graph((4, 8))
    noise = b.call(aten.rand_like, x, name="noise")
    g.set_outputs([b.call(aten.mul.Tensor, b.call(aten.relu, x, name="r"), noise, name="out")])
    assert isinstance(plan(g, "noise", "out"), Illegal)
    assert all("noise" not in grp.members for grp in find_groups(g))


def test_opaque_ops_split_chains(fuse):
    g, (x,), b = new_graph((4, 8))
    a = b.call(aten.exp, x, name="a")
    srt = b.call(aten.sort, a, 1)[0]
    z = b.call(aten.tanh, b.call(aten.neg, srt, name="n"), name="z")
    g.set_outputs([z])
    groups, _ = fuse(g, inputs=None)
    assert [grp.kernels for grp in groups] == [frozenset({"n", "z"})]


def test_existing_region_is_not_extended(fuse):
    sub = Graph("attention")
    a = sub.add_input(TensorType((4, 8), F32), "a")
    sub.set_outputs([Builder(sub).call(aten.softmax.int, a, -1)])
    g, (x,), b = new_graph((4, 8))
    pre = b.call(aten.mul.Scalar, x, 0.5, name="pre")
    region = g.create_node(FUSED, [pre], attrs={"kind": "attention"}, subgraph=sub, names=["attn"])
    post = b.call(aten.relu, region.output, name="post")
    g.set_outputs([b.call(aten.add.Tensor, post, x, name="out")])
    groups, _ = fuse(g)
    kinds = [n.attrs["kind"] for n in g.nodes if n.op is FUSED]
    assert kinds.count("attention") == 1 and [grp.kernels for grp in groups if grp.kind != "attention"] == [
        frozenset({"post", "out"})]
    attention = next(n for n in g.nodes if n.op is FUSED and n.attrs["kind"] == "attention")
    assert [n.op.name for n in attention.subgraph.nodes] == ["aten.softmax.int"]


def test_epilogue_rules():
    g, (x, y), b = new_graph((8, 16), (8, 16))
    w = b.weight("w", torch.rand(16, 16))
    pre = b.call(aten.relu, x, name="pre")
    mm1 = b.call(aten.mm, pre, w, name="mm1")
    act = b.call(aten.gelu, mm1, name="act")
    mm2 = b.call(aten.mm, act, w, name="mm2")
    b.call(aten.sum.dim_IntList, mm2, [-1], name="red")
    b.call(aten.relu, y, name="side")
    assert "prologue" in plan(g, "pre", "mm1").reason
    assert "two extern anchors" in plan(g, "mm1", "act", "mm2").reason
    assert "cannot join the epilogue" in plan(g, "mm2", "red").reason
    assert "cannot mix extern anchors" in plan(g, "mm1", "side").reason
    ok = plan(g, "mm1", "act")
    assert ok.kind == "epilogue" and ok.attrs == {"kind": "epilogue", "anchor": "aten.mm", "numel": 128}


def test_iteration_space_rules():
    g, (x, v), b = new_graph((8, 16), (16,))
    r = b.call(aten.relu, x, name="r")
    rows = b.call(aten.sum.dim_IntList, r, [-1], name="rows")
    cols = b.call(aten.sum.dim_IntList, r, [0], name="cols")
    nv = b.call(aten.neg, v, name="nv")
    c = b.call(aten.add.Tensor, r, nv, name="c")
    g.set_outputs([rows, cols, nv, c])
    assert "reductions over different iteration spaces" in plan(g, "r", "rows", "cols").reason
    assert "horizontal parts run over different loops" in plan(g, "rows", "cols").reason
    assert "pointwise outputs over different iteration spaces" in plan(g, "nv", "c").reason
    assert plan(g, "r", "rows").attrs["structure"] == "single-pass"
    # nv is read only inside the group: computed where the loop needs it (a broadcast operand)
    g.set_outputs([rows, cols, c])
    assert plan(g, "nv", "c").attrs == {"kind": "pointwise", "numel": 128}


def test_horizontal_gemms_need_the_same_activation_and_concatenable_weights():
    g, (x, y), b = new_graph((8, 16), (8, 16))
    b.call(aten.mm, x, b.weight("wa", torch.rand(16, 4)), name="a")
    b.call(aten.mm, y, b.weight("wb", torch.rand(16, 4)), name="other_input")
    b.call(aten.mm, x, b.weight("wc", torch.rand(16, 12)), name="c")
    assert "same activation operand" in plan(g, "a", "other_input").reason
    ok = plan(g, "a", "c")
    assert ok.attrs["schedule"] == "concat-gemm" and ok.parts == ("epilogue", "epilogue")


def test_kinds_option_and_unknown_kinds(fuse):
    g, (x, res), b = new_graph((8, 16), (8, 32))
    mm = b.call(aten.mm, x, b.weight("w", torch.rand(16, 32)), name="mm")
    out = b.call(aten.relu, b.call(aten.add.Tensor, mm, res, name="add"), name="out")
    g.set_outputs([out])
    groups, _ = fuse(g, kinds=("pointwise",))
    assert [(grp.kind, grp.kernels) for grp in groups] == [("pointwise", frozenset({"add", "out"}))]
    with pytest.raises(KilnInputError, match="unknown fusion kind"):
        find_groups(g, kinds=("vertical",))
    with pytest.raises(KilnInputError, match="no option"):
        get_pass("fuse", max_group=3)
