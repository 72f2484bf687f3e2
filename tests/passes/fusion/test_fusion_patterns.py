"""One test per fusion pattern: which kernels end up in which group, and the group's attributes.

Every case goes through ``run_fuse`` (conftest): the fused graph verifies, prints/parses to the same
text and computes what the unfused graph computed.
"""

from __future__ import annotations

import torch

from kiln.ir import Builder, Graph, TensorType, aten
from kiln.ir.ops import FUSED
from kiln.passes.analysis import graph_cost

F32 = torch.float32


def new_graph(*shapes, name="p"):
    g = Graph(name)
    xs = [g.add_input(TensorType(s, F32), f"x{i}") for i, s in enumerate(shapes)]
    return g, xs, Builder(g)


def by_kernels(groups):
    return {grp.kernels: grp for grp in groups}


def test_pointwise_chain(fuse):
    g, (x, y), b = new_graph((4, 8), (4, 8))
    r = b.call(aten.relu, x, name="r")
    m = b.call(aten.mul.Scalar, r, 2.0, name="m")
    a = b.call(aten.add.Tensor, m, y, name="a")
    g.set_outputs([a])
    before = graph_cost(g)
    groups, res = fuse(g)
    assert [grp.kernels for grp in groups] == [frozenset({"r", "m", "a"})]
    assert groups[0].attrs == {"kind": "pointwise", "numel": 32}
    after = graph_cost(g)
    assert (before.kernels, after.kernels) == (3, 1)
    assert before.intermediate_bytes == 4 * 32 * 4 and after.intermediate_bytes == 0
    assert res.stats["by_kind"] == {"pointwise": 1}


def test_pointwise_dag_with_broadcast_and_views(fuse):
    g, (x, bias), b = new_graph((4, 8), (8,))
    e = b.call(aten.exp, x, name="e")
    nb = b.call(aten.neg, bias, name="nb")                       # 8 elements, broadcast into the loop
    v = b.call(aten.view, e, [32], name="v")                     # a view inside the group
    s = b.call(aten.sigmoid, v, name="s")
    sv = b.call(aten.view, s, [4, 8], name="sv")
    a = b.call(aten.add.Tensor, sv, nb, name="a")
    t = b.call(aten.tanh, e, name="t")                           # a second consumer of e (a DAG)
    out = b.call(aten.mul.Tensor, a, t, name="out")
    g.set_outputs([out])
    groups, _ = fuse(g)
    assert [grp.kernels for grp in groups] == [frozenset({"e", "nb", "s", "a", "t", "out"})]
    assert groups[0].attrs["numel"] == 32
    fused = next(n for n in g.nodes if n.op is FUSED)
    assert [n.op.name for n in fused.subgraph.nodes].count("aten.view") == 2
    assert len([n for n in g.nodes if n.op is not FUSED]) == 0   # the views went inside


def test_view_read_outside_is_duplicated_not_written(fuse):
    g, (x,), b = new_graph((4, 8))
    r = b.call(aten.relu, x, name="r")
    v = b.call(aten.view, r, [32], name="v")
    s = b.call(aten.sigmoid, v, name="s")
    g.set_outputs([s, v])                                        # the view is also a graph output
    groups, _ = fuse(g)
    assert [grp.kernels for grp in groups] == [frozenset({"r", "s"})]
    fused = next(n for n in g.nodes if n.op is FUSED)
    # the group writes relu's result (the outside view reads it) and sigmoid's, never a copy of the view
    assert [str(r.type.shape) for r in fused.results] == ["(4, 8)", "(32,)"]
    assert g.outputs[1].producer.op.name == "aten.view"


def test_reduction_with_pointwise_producers(fuse):
    g, (x, y), b = new_graph((6, 16), (6, 16))
    d = b.call(aten.sub.Tensor, x, y, name="d")
    sq = b.call(aten.mul.Tensor, d, d, name="sq")
    s = b.call(aten.sum.dim_IntList, sq, [-1], name="s")
    g.set_outputs([s])
    groups, _ = fuse(g)
    assert [grp.kernels for grp in groups] == [frozenset({"d", "sq", "s"})]
    assert groups[0].attrs == {"kind": "reduction", "structure": "single-pass", "numel": 6, "rnumel": 16}


def test_explicit_softmax_is_one_online_softmax_group(fuse):
    g, (x,), b = new_graph((2, 4, 16))
    m = b.call(aten.amax, x, [-1], True, name="m")
    d = b.call(aten.sub.Tensor, x, m, name="d")
    e = b.call(aten.exp, d, name="e")
    s = b.call(aten.sum.dim_IntList, e, [-1], True, name="s")
    y = b.call(aten.div.Tensor, e, s, name="y")
    g.set_outputs([y])
    groups, _ = fuse(g)
    assert [grp.kernels for grp in groups] == [frozenset({"m", "d", "e", "s", "y"})]
    assert groups[0].attrs == {"kind": "reduction", "structure": "online-softmax", "pattern": "softmax",
                               "numel": 8, "rnumel": 16}


def test_explicit_log_softmax(fuse):
    g, (x,), b = new_graph((3, 10))
    m = b.call(aten.amax, x, [1], True, name="m")
    d = b.call(aten.sub.Tensor, x, m, name="d")
    s = b.call(aten.sum.dim_IntList, b.call(aten.exp, d, name="e"), [1], True, name="s")
    y = b.call(aten.sub.Tensor, d, b.call(aten.log, s, name="l"), name="y")
    g.set_outputs([y])
    groups, _ = fuse(g)
    assert [grp.kernels for grp in groups] == [frozenset({"m", "d", "e", "s", "l", "y"})]
    assert groups[0].attrs["pattern"] == "log-softmax" and groups[0].attrs["structure"] == "online-softmax"


def test_explicit_layer_norm_is_one_welford_group(fuse):
    g, (x,), b = new_graph((4, 32))
    w, bias = b.weight("ln.weight", torch.rand(32)), b.weight("ln.bias", torch.rand(32))
    mu = b.call(aten.mean.dim, x, [-1], True, name="mu")
    d = b.call(aten.sub.Tensor, x, mu, name="d")
    var = b.call(aten.mean.dim, b.call(aten.mul.Tensor, d, d, name="sq"), [-1], True, name="var")
    r = b.call(aten.rsqrt, b.call(aten.add.Tensor, var, 1e-5, name="ve"), name="r")
    y = b.call(aten.add.Tensor, b.call(aten.mul.Tensor, b.call(aten.mul.Tensor, d, r, name="n"), w, name="nw"),
               bias, name="y")
    g.set_outputs([y])
    groups, _ = fuse(g)
    assert [grp.kernels for grp in groups] == [frozenset({"mu", "d", "sq", "var", "ve", "r", "n", "nw", "y"})]
    assert groups[0].attrs == {"kind": "reduction", "structure": "welford", "pattern": "layer-norm",
                               "numel": 4, "rnumel": 32}


def test_rms_norm_is_one_two_pass_group(fuse):
    g, (x,), b = new_graph((2, 8, 16))
    w = b.weight("norm.weight", torch.rand(16))
    p = b.call(aten.pow.Tensor_Scalar, x, 2, name="p")
    ms = b.call(aten.mean.dim, p, [-1], True, name="ms")
    r = b.call(aten.rsqrt, b.call(aten.add.Tensor, ms, 1e-5, name="eps"), name="r")
    y = b.call(aten.mul.Tensor, b.call(aten.mul.Tensor, x, r, name="n"), w, name="y")
    g.set_outputs([y])
    groups, _ = fuse(g)
    assert [grp.kernels for grp in groups] == [frozenset({"p", "ms", "eps", "r", "n", "y"})]
    assert groups[0].attrs == {"kind": "reduction", "structure": "two-pass", "pattern": "rms-norm",
                               "numel": 16, "rnumel": 16}


def test_composite_softmax_takes_its_prologue(fuse):
    g, (x,), b = new_graph((2, 4, 16, 16))
    sc = b.call(aten.mul.Scalar, x, 0.125, name="sc")
    sm = b.call(aten._softmax, sc, -1, False, name="sm")
    g.set_outputs([sm])
    groups, _ = fuse(g)
    assert [grp.kernels for grp in groups] == [frozenset({"sc", "sm"})]
    assert groups[0].attrs["structure"] == "online-softmax" and groups[0].attrs["pattern"] == "softmax"


def test_composite_layer_norm_with_residual_add(fuse):
    g, (x, res), b = new_graph((2, 8, 32), (2, 8, 32))
    h = b.call(aten.add.Tensor, x, res, name="h")
    ln = b.call(aten.native_layer_norm, h, [32], b.weight("w", torch.rand(32)), b.weight("b", torch.rand(32)),
                1e-5)
    g.set_outputs([ln[0], h])                                   # the residual stream goes on
    groups, _ = fuse(g)
    assert len(groups) == 1 and groups[0].kernels == {"h", ln[0].name}
    assert groups[0].attrs == {"kind": "reduction", "structure": "welford", "pattern": "layer-norm",
                               "numel": 16, "rnumel": 32}


def test_linear_epilogue_bias_activation_residual(fuse):
    g, (x, res), b = new_graph((8, 16), (8, 32))
    mm = b.call(aten.addmm, b.weight("fc.bias", torch.rand(32)), x, b.weight("fc.weight", torch.rand(16, 32)),
                name="mm")
    act = b.call(aten.gelu, mm, name="act")
    out = b.call(aten.add.Tensor, act, res, name="out")
    g.set_outputs([out])
    groups, _ = fuse(g)
    assert [grp.kernels for grp in groups] == [frozenset({"mm", "act", "out"})]
    assert groups[0].attrs == {"kind": "epilogue", "anchor": "aten.addmm", "numel": 256}


def test_conv_batchnorm_relu_residual_epilogue(fuse):
    g, (x, skip), b = new_graph((2, 3, 8, 8), (2, 4, 8, 8))
    gen = torch.Generator().manual_seed(0)
    conv = b.call(aten.convolution, x, b.weight("conv.weight", torch.randn(4, 3, 3, 3, generator=gen)),
                  b.weight("conv.bias", torch.randn(4, generator=gen)), [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                  name="conv")
    stats = [b.weight(f"bn.{k}", torch.rand(4, generator=gen) + 0.5) for k in ("weight", "bias", "mean", "var")]
    bn = b.call(aten._native_batch_norm_legit_no_training, conv, *stats, 0.1, 1e-5)
    add = b.call(aten.add.Tensor, bn[0], skip, name="add")
    out = b.call(aten.relu, add, name="out")
    g.set_outputs([out])
    groups, _ = fuse(g)
    assert [grp.kernels for grp in groups] == [frozenset({"conv", bn[0].name, "add", "out"})]
    assert groups[0].attrs == {"kind": "epilogue", "anchor": "aten.convolution", "numel": 512}


def test_qkv_projections_fuse_horizontally_into_one_gemm(fuse):
    g, (x,), b = new_graph((16, 32))
    gen = torch.Generator().manual_seed(0)
    outs = []
    for p in "qkv":
        w = b.weight(f"{p}.weight", torch.randn(32, 32, generator=gen))
        outs.append(b.call(aten.mm, x, w, name=p))
    g.set_outputs(outs)
    before = graph_cost(g)
    groups, _ = fuse(g)
    assert [grp.kernels for grp in groups] == [frozenset({"q", "k", "v"})]
    assert groups[0].attrs == {"kind": "horizontal", "schedule": "concat-gemm",
                               "parts": ["epilogue", "epilogue", "epilogue"], "anchor": "aten.mm"}
    assert graph_cost(g).kernels == 1 and graph_cost(g).bytes_read == before.bytes_read - 2 * 16 * 32 * 4


def test_qkv_projections_with_epilogues(fuse):
    g, (x,), b = new_graph((16, 32))
    gen = torch.Generator().manual_seed(1)
    outs = []
    for p in "qk":
        mm = b.call(aten.addmm, b.weight(f"{p}.bias", torch.randn(8, generator=gen)), x,
                    b.weight(f"{p}.weight", torch.randn(32, 8, generator=gen)), name=p)
        outs.append(b.call(aten.mul.Scalar, mm, 0.5, name=f"{p}_scaled"))
    g.set_outputs(outs)
    groups, _ = fuse(g)
    assert [grp.kernels for grp in groups] == [frozenset({"q", "q_scaled", "k", "k_scaled"})]
    assert groups[0].attrs["schedule"] == "concat-gemm"


def test_sibling_pointwise_ops_share_one_loop(fuse):
    g, (x,), b = new_graph((64, 64))
    r = b.call(aten.relu, x, name="r")
    s = b.call(aten.sigmoid, x, name="s")
    g.set_outputs([r, s])
    groups, _ = fuse(g)
    assert [grp.kernels for grp in groups] == [frozenset({"r", "s"})]
    assert groups[0].attrs == {"kind": "horizontal", "schedule": "shared-loop", "parts": ["pointwise", "pointwise"],
                               "numel": 4096}


def test_siblings_that_share_nothing_stay_apart(fuse):
    g, (x, y), b = new_graph((64, 64), (64, 64))
    g.set_outputs([b.call(aten.relu, x, name="r"), b.call(aten.sigmoid, y, name="s")])
    groups, res = fuse(g)
    assert groups == [] and not res.changed


def test_mixed_sizes_through_slices_stay_one_loop(fuse):
    # an LSTM cell: one wide pre-activation, split into gates that run over a quarter of it
    g, (gates, c), b = new_graph((2, 32), (2, 8))
    pre = b.call(aten.mul.Scalar, gates, 1.0, name="pre")
    i, f, gg, o = b.call(aten.split_with_sizes, pre, [8, 8, 8, 8], 1)
    c2 = b.call(aten.add.Tensor, b.call(aten.mul.Tensor, b.call(aten.sigmoid, f, name="sf"), c, name="fc"),
                b.call(aten.mul.Tensor, b.call(aten.sigmoid, i, name="si"), b.call(aten.tanh, gg, name="tg"),
                       name="ig"), name="c2")
    h = b.call(aten.mul.Tensor, b.call(aten.sigmoid, o, name="so"), b.call(aten.tanh, c2, name="tc"), name="h")
    g.set_outputs([h, c2])
    groups, _ = fuse(g)
    assert [grp.kernels for grp in groups] == [frozenset({"pre", "sf", "fc", "si", "tg", "ig", "c2", "so", "tc",
                                                          "h"})]
    assert groups[0].attrs == {"kind": "pointwise", "numel": 16}
