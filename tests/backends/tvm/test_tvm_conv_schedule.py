"""kiln's convolution template (``kiln/backends/tvm/conv_schedule.py``): where it applies, where it refuses,
and that templated kernels compute what PyTorch computes, in NCHW and channels-last layouts."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import te, topi  # noqa: E402
from tvm.s_tir import Schedule  # noqa: E402

from kiln.backends.tvm.conv_schedule import apply_conv_template, conv_tile  # noqa: E402
from kiln.backends.tvm.kernel import build_kernel  # noqa: E402
from kiln.backends.tvm.schedule import _outputs  # noqa: E402
from kiln.ir.builder import Builder  # noqa: E402
from kiln.ir.graph import Graph  # noqa: E402
from kiln.ir.ops import aten  # noqa: E402
from kiln.ir.to_fx import to_fx  # noqa: E402
from kiln.ir.types import TensorType  # noqa: E402
from kiln.numerics import assert_match  # noqa: E402

F32 = torch.float32


def _templated(tensors) -> bool:
    sch = Schedule(tvm.IRModule({"main": te.create_prim_func(tensors)}))
    return apply_conv_template(sch, _outputs(sch))


def test_conv_tile_divides_the_output_row():
    assert conv_tile(56, 64) == (8, 32)
    assert conv_tile(7, 512) == (7, 32)
    assert conv_tile(28, 16) == (7, 16)
    assert conv_tile(5, 48) == (1, 16)


def test_template_takes_a_convolution_and_refuses_what_it_does_not_tile():
    x, w = te.placeholder((1, 8, 10, 10), name="x"), te.placeholder((32, 8, 3, 3), name="w")
    conv = topi.nn.conv2d_nchw(x, w, 1, 1, 1)
    assert _templated([x, w, conv])
    assert _templated([x, w, topi.nn.relu(conv)])
    w12 = te.placeholder((12, 8, 3, 3), name="w12")  # C_out not a multiple of the 16 vector lanes
    assert not _templated([x, w12, topi.nn.conv2d_nchw(x, w12, 1, 1, 1)])
    wg = te.placeholder((32, 4, 3, 3), name="wg")  # grouped: topi's other block, same template
    assert _templated([x, wg, topi.nn.group_conv2d_nchw(x, wg, 1, 1, 1, 2)])
    assert not _templated([x, w, conv, topi.nn.relu(conv)])  # the convolution is an output and has a reader


def _conv(b, x, w, bias, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1):
    return b.call(aten.convolution, x, w, bias, list(stride), list(padding), list(dilation), False, [0, 0], groups)


def _graph(types, build):
    g = Graph("conv")
    b = Builder(g)
    xs = [g.add_input(t, f"x{i}") for i, t in enumerate(types)]
    out = build(b, *xs)
    g.set_outputs([out])
    return g, out


def _t(*shape, layout="contiguous"):
    return TensorType(tuple(shape), F32, layout)


CASES = [  # (name, input types, build): padding, stride, dilation, 1x1, tails (MR = 1, 7), a fused epilogue
    ("pad_bias", [_t(2, 8, 9, 9), _t(16, 8, 3, 3), _t(16)], lambda b, x, w, c: _conv(b, x, w, c)),
    ("stride2_nopad", [_t(1, 4, 12, 12), _t(32, 4, 3, 3)],
     lambda b, x, w: _conv(b, x, w, None, stride=(2, 2), padding=(0, 0))),
    ("dilated", [_t(1, 3, 16, 16), _t(16, 3, 3, 3)],
     lambda b, x, w: _conv(b, x, w, None, padding=(2, 2), dilation=(2, 2))),
    ("1x1", [_t(1, 16, 7, 7), _t(32, 16, 1, 1)], lambda b, x, w: _conv(b, x, w, None, padding=(0, 0))),
    ("relu_epilogue", [_t(1, 8, 8, 8), _t(48, 8, 3, 3), _t(48)],
     lambda b, x, w, c: b.call(aten.relu, _conv(b, x, w, c))),
    ("grouped", [_t(1, 8, 8, 8), _t(32, 4, 3, 3)], lambda b, x, w: _conv(b, x, w, None, groups=2)),
    ("depthwise", [_t(2, 16, 9, 9), _t(16, 1, 3, 3), _t(16)], lambda b, x, w, c: _conv(b, x, w, c, groups=16)),
    ("depthwise_x2_stride2", [_t(1, 16, 12, 12), _t(32, 1, 3, 3)],
     lambda b, x, w: _conv(b, x, w, None, stride=(2, 2), groups=16)),
]


@pytest.mark.parametrize("name,types,build", CASES, ids=[c[0] for c in CASES])
def test_templated_convolution_matches_pytorch(name, types, build):
    graph, _ = _graph(types, build)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(t.shape, generator=gen) for t in types]
    kernel = build_kernel(graph)
    assert 'scope="local"' in kernel.source  # the tile's accumulators: the template ran
    assert_match(kernel(*inputs), to_fx(graph)(*inputs))


def test_channels_last_convolution_reads_and_writes_nhwc():
    types = [_t(2, 16, 14, 14, layout="channels_last"), _t(32, 16, 3, 3, layout="channels_last"), _t(32)]
    graph, out = _graph(types, lambda b, x, w, c: b.call(aten.relu, _conv(b, x, w, c)))
    out.type = _t(2, 32, 14, 14, layout="channels_last")  # what the layout pass records for a conv net
    kernel = build_kernel(graph)
    assert 'scope="local"' in kernel.source
    gen = torch.Generator().manual_seed(0)
    x, w, c = (torch.randn(t.shape, generator=gen) for t in types)
    (got,) = kernel(x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last), c)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_match(got, torch.relu(torch.nn.functional.conv2d(x, w, c, padding=1)))
