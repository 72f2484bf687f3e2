"""Every ATen lowering in the TVM table, compiled with kiln's default CPU schedule, equals PyTorch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from kiln.backends.tvm.kernel import build_kernel  # noqa: E402
from kiln.backends.tvm.te_ops import CAT_MAX_INPUTS, GEMM_OPS, LOWERINGS, can_lower  # noqa: E402
from kiln.errors import KilnInputError, UnsupportedError  # noqa: E402
from kiln.ir.builder import Builder  # noqa: E402
from kiln.ir.graph import Graph  # noqa: E402
from kiln.ir.ops import aten  # noqa: E402
from kiln.ir.to_fx import to_fx  # noqa: E402
from kiln.ir.types import TensorType  # noqa: E402
from kiln.numerics import assert_match  # noqa: E402

F32 = torch.float32


def _graph(shapes, build, dtypes=None):
    g = Graph("t")
    b = Builder(g)
    dtypes = dtypes or [F32] * len(shapes)
    xs = [g.add_input(TensorType(tuple(s), d), f"x{i}") for i, (s, d) in enumerate(zip(shapes, dtypes))]
    out = build(b, *xs)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    g.set_outputs([o for o in outs if o is not None])
    return g


def _inputs(shapes, dtypes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s, d in zip(shapes, dtypes or [F32] * len(shapes)):
        if d == torch.bool:
            out.append(torch.rand(s, generator=gen) > 0.5)
        elif d.is_floating_point:
            out.append(torch.randn(s, generator=gen, dtype=torch.float32).to(d))
        else:
            out.append(torch.randint(-5, 6, s, generator=gen, dtype=d))
    return out


# (name, input shapes, builder, dtypes)
CASES = [
    ("add_broadcast_alpha", [(4, 8), (8,)], lambda b, x, y: b.call(aten.add.Tensor, x, y, alpha=2.0)),
    ("add_scalar", [(4, 8)], lambda b, x: b.call(aten.add.Tensor, x, 3.0)),
    ("sub", [(4, 8), (4, 1)], lambda b, x, y: b.call(aten.sub.Tensor, x, y)),
    ("mul_scalar", [(4, 8)], lambda b, x: b.call(aten.mul.Scalar, x, 0.5)),
    ("div", [(4, 8), (4, 8)], lambda b, x, y: b.call(aten.div.Tensor, x, y)),
    ("maximum", [(4, 8), (8,)], lambda b, x, y: b.call(aten.maximum, x, y)),
    ("relu", [(3, 5, 7)], lambda b, x: b.call(aten.relu, x)),
    ("sigmoid", [(64, 33)], lambda b, x: b.call(aten.sigmoid, x)),
    ("tanh", [(64, 32)], lambda b, x: b.call(aten.tanh, x)),
    ("exp", [(64, 32)], lambda b, x: b.call(aten.exp, x)),
    ("log1p_abs", [(64, 32)], lambda b, x: b.call(aten.log1p, b.call(aten.abs, x))),
    ("rsqrt", [(8, 32)], lambda b, x: b.call(aten.rsqrt, b.call(aten.add.Tensor, b.call(aten.abs, x), 1.0))),
    ("neg_sin_cos", [(8, 32)], lambda b, x: b.call(aten.sin, b.call(aten.cos, b.call(aten.neg, x)))),
    ("gelu", [(16, 64)], lambda b, x: b.call(aten.gelu, x)),
    ("gelu_tanh", [(16, 64)], lambda b, x: b.call(aten.gelu, x, approximate="tanh")),
    ("silu", [(16, 64)], lambda b, x: b.call(aten.silu, x)),
    ("hardtanh", [(16, 64)], lambda b, x: b.call(aten.hardtanh, x, 0.0, 6.0)),
    ("clamp", [(16, 64)], lambda b, x: b.call(aten.clamp, x, -0.5, 0.5)),
    ("pow2", [(16, 64)], lambda b, x: b.call(aten.pow.Tensor_Scalar, x, 2)),
    ("pow3", [(16, 64)], lambda b, x: b.call(aten.pow.Tensor_Scalar, x, 3.0)),
    ("where_gt", [(16, 64), (16, 64)],
     lambda b, x, y: b.call(aten.where.self, b.call(aten.gt.Scalar, x, 0.0), x, y)),
    ("eq_ne_logical", [(16, 64), (16, 64)],
     lambda b, x, y: b.call(aten.logical_and, b.call(aten.le.Tensor, x, y),
                            b.call(aten.logical_not, b.call(aten.eq.Scalar, x, 0.0)))),
    ("bitwise_not_bool_int", [(16, 64), (16, 64)],
     lambda b, x, y: (b.call(aten.bitwise_not, b.call(aten.gt.Scalar, x, 0.0)),
                      b.call(aten.bitwise_not, b.call(aten._to_copy, y, dtype=torch.int32)))),
    ("to_copy_int", [(16, 64)], lambda b, x: b.call(aten._to_copy, x, dtype=torch.int32)),
    ("view_permute", [(2, 3, 4, 5)],
     lambda b, x: b.call(aten.relu, b.call(aten.permute, b.call(aten.view, x, [6, 4, 5]), [2, 0, 1]))),
    ("transpose_t", [(6, 4)], lambda b, x: b.call(aten.t, b.call(aten.transpose.int, b.call(aten.t, x), 0, 1))),
    ("expand_unsqueeze", [(4,)],
     lambda b, x: b.call(aten.exp, b.call(aten.expand, b.call(aten.unsqueeze, x, 0), [3, 4]))),
    ("squeeze", [(4, 1, 3)], lambda b, x: b.call(aten.neg, b.call(aten.squeeze.dim, x, 1))),
    ("slice_step", [(10, 8)], lambda b, x: b.call(aten.neg, b.call(aten.slice.Tensor, x, 0, 1, 9, 2))),
    ("slice_neg", [(10, 8)], lambda b, x: b.call(aten.neg, b.call(aten.slice.Tensor, x, 1, -3))),
    ("select", [(5, 6, 7)], lambda b, x: b.call(aten.neg, b.call(aten.select.int, x, 1, -2))),
    ("full_as_a_state", [(4, 8)], lambda b, x: b.call(aten.add.Tensor, x, b.call(
        aten.full, [4, 8], 0.5, dtype=torch.float32, layout=torch.strided, device=torch.device("cpu"),
        pin_memory=False))),
    ("cat", [(2, 3), (2, 5)], lambda b, x, y: b.call(aten.cat, [x, b.call(aten.neg, y)], 1)),
    ("split_with_sizes", [(4, 10)], lambda b, x: [b.call(aten.neg, p)
                                                   for p in b.call(aten.split_with_sizes, x, [3, 7], 1)]),
    ("split_tensor_uneven", [(6, 4)], lambda b, x: [b.call(aten.exp, p) for p in b.call(aten.split.Tensor, x, 4)]),
    ("sum", [(8, 48)], lambda b, x: b.call(aten.sum.dim_IntList, x, [1])),
    ("sum_keepdim_first", [(48, 8)], lambda b, x: b.call(aten.sum.dim_IntList, x, [0], True)),
    ("mean_multi", [(2, 3, 32, 32)], lambda b, x: b.call(aten.mean.dim, x, [-1, -2], True)),
    ("amax_amin", [(8, 64)], lambda b, x: (b.call(aten.amax, x, [1]), b.call(aten.amin, x, [0]))),
    ("any", [(8, 64)], lambda b, x: b.call(aten.any.dim, b.call(aten.gt.Scalar, x, 2.0), 1)),
    ("softmax", [(8, 64)], lambda b, x: b.call(aten._softmax, x, -1, False)),
    ("softmax_dim0", [(64, 8)], lambda b, x: b.call(aten._softmax, x, 0, False)),
    ("log_softmax", [(8, 64)], lambda b, x: b.call(aten._log_softmax, x, 1, False)),
    ("layer_norm", [(4, 8, 64), (64,), (64,)],
     lambda b, x, w, bias: b.call(aten.native_layer_norm, x, [64], w, bias, 1e-5)),
    ("batch_norm_inference", [(2, 4, 5, 5), (4,), (4,), (4,), (4,)],
     lambda b, x, w, bias, m, v: b.call(aten._native_batch_norm_legit_no_training, x, w, bias, m,
                                        b.call(aten.abs, v), 0.1, 1e-5)[0]),
]


@pytest.mark.parametrize("name,shapes,build", CASES, ids=[c[0] for c in CASES])
def test_lowering_matches_pytorch(name, shapes, build):
    graph = _graph(shapes, build)
    assert all(can_lower(n) for n in graph.nodes), [n.op.name for n in graph.nodes if not can_lower(n)]
    inputs = _inputs(shapes, None)
    ref = to_fx(graph)(*inputs)
    got = build_kernel(graph)(*inputs)
    assert len(got) == len(ref)
    for r, o in zip(ref, got):
        assert o.dtype == r.dtype and o.shape == r.shape
        assert_match(o, r)


def test_every_table_entry_is_exercised():
    graphs = [_graph(shapes, build) for _, shapes, build in CASES]
    used = {n.op.name for g in graphs for n in g.nodes}
    missing = sorted(set(LOWERINGS) - used - GEMM_OPS - {  # GEMM/conv: test_tvm_tune.py
        # spellings that share an entry with a tested one
        "aten.add.Scalar", "aten.sub.Scalar", "aten.div.Scalar", "aten.mul.Tensor", "aten.minimum",
        "aten.log", "aten.sqrt", "aten.erf", "aten.floor", "aten.ceil", "aten.reciprocal",
        "aten.ne.Tensor", "aten.ne.Scalar", "aten.lt.Tensor", "aten.lt.Scalar", "aten.le.Scalar",
        "aten.gt.Tensor", "aten.ge.Tensor", "aten.ge.Scalar", "aten.eq.Tensor", "aten.logical_or",
        "aten.clamp_min", "aten.clamp_max", "aten.clone", "aten.alias", "aten.detach", "aten.lift_fresh_copy",
        "aten._unsafe_view", "aten.reshape", "aten.squeeze.dims", "aten.squeeze", "aten.any.dims",
    })
    assert not missing, f"lowerings without a test case: {missing}"


def test_wide_cat_is_left_to_pytorch():
    narrow = _graph([(2, 3)] * CAT_MAX_INPUTS, lambda b, *xs: b.call(aten.cat, list(xs), 1))
    wide = _graph([(2, 3)] * (CAT_MAX_INPUTS + 1), lambda b, *xs: b.call(aten.cat, list(xs), 1))
    assert can_lower(narrow.nodes[0]) and not can_lower(wide.nodes[0])


def test_refuses_what_it_cannot_lower_exactly():
    g = _graph([(4, 8), (4, 8)], lambda b, x, y: b.call(aten.div.Tensor_mode, x, y, rounding_mode="floor"))
    (node,) = g.nodes
    assert not can_lower(node)
    with pytest.raises(UnsupportedError, match="aten.div.Tensor_mode"):
        build_kernel(g)


def test_kernel_checks_input_shapes():
    kernel = build_kernel(_graph([(4, 8)], lambda b, x: b.call(aten.relu, x)))
    with pytest.raises(KilnInputError, match="expected"):
        kernel(torch.randn(4, 9))


def test_strided_inputs_are_read_in_place_with_their_row_strides(monkeypatch):
    import kiln.backends.tvm.kernel as kernel_module

    g = Graph("t")
    b = Builder(g)
    x = g.add_input(TensorType((8, 16), F32, "strided"), "x")  # e.g. one time step x[:, t] of a sequence
    y = g.add_input(TensorType((8, 16), F32), "y")
    g.set_outputs([b.call(aten.mul.Tensor, b.call(aten.sigmoid, x), y)])
    kernel = build_kernel(g)
    seq, y_in = torch.randn(8, 5, 16), torch.randn(8, 16)
    copies = []
    real_aligned = kernel_module.aligned
    monkeypatch.setattr(kernel_module, "aligned", lambda t: copies.append(t.shape) or real_aligned(t))
    for t in range(5):
        step = seq[:, t]  # row stride 80, not 16
        (got,) = kernel(step, y_in)
        assert_match(got, torch.sigmoid(step) * y_in)
    assert copies == []  # read through its strides, never copied
    (got,) = kernel(seq[:, 1].contiguous(), y_in)  # a compact tensor fits the same function
    assert_match(got, torch.sigmoid(seq[:, 1]) * y_in)
    transposed = torch.randn(16, 8).t()  # last dim not contiguous: copied, still right
    (got,) = kernel(transposed, y_in)
    assert_match(got, torch.sigmoid(transposed) * y_in)
    assert copies == [(8, 16)]


def test_channels_last_values_are_nhwc_buffers():
    cl = TensorType((2, 3, 4, 5), F32, "channels_last")
    g = Graph("t")
    b = Builder(g)
    x = g.add_input(cl, "x")
    y = g.add_input(TensorType((2, 3, 4, 5), F32), "y")  # a contiguous operand beside it
    out = b.call(aten.relu, b.call(aten.add.Tensor, x, y))
    out.type = cl  # what the layout pass records for a result PyTorch would give channels-last
    g.set_outputs([out])
    kernel = build_kernel(g)
    xs = _inputs([(2, 3, 4, 5)] * 2, None)
    for x_in in (xs[0].to(memory_format=torch.channels_last), xs[0]):  # the second is copied to NHWC
        (got,) = kernel(x_in, xs[1])
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert_match(got, torch.relu(xs[0] + xs[1]))
