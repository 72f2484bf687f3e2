"""kiln's register-tiled GEMM template (``gemm_schedule.py``): where it applies, that what it builds computes the
same as PyTorch, and that it steps aside (the generic schedule runs) where it does not apply."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import te, topi  # noqa: E402
from tvm.s_tir import Schedule  # noqa: E402

from kiln.backends.driver import compile_graph  # noqa: E402
from kiln.backends.tvm import backend as tvm_backend  # noqa: E402
from kiln.backends.tvm.gemm_schedule import apply_gemm_template, stream_width, tile_shape  # noqa: E402
from kiln.backends.tvm.kernel import build_kernel  # noqa: E402
from kiln.backends.tvm.schedule import _inline_spatial, _outputs  # noqa: E402
from kiln.ir.builder import Builder  # noqa: E402
from kiln.ir.graph import Graph  # noqa: E402
from kiln.ir.ops import FUSED, aten  # noqa: E402
from kiln.ir.outline import outline_region  # noqa: E402
from kiln.ir.to_fx import to_fx  # noqa: E402
from kiln.ir.types import TensorType  # noqa: E402
from kiln.numerics import assert_match  # noqa: E402


def _templated(tensors) -> bool:
    sch = Schedule(tvm.IRModule({"main": te.create_prim_func(tensors)}))
    outputs = _outputs(sch)
    _inline_spatial(sch, outputs)
    return apply_gemm_template(sch, outputs)


def test_tile_shape_divides_the_output():
    assert tile_shape(512, 512) == (8, 32)
    assert tile_shape(24, 48) == (8, 16)
    assert tile_shape(20, 32) == (4, 32)
    assert tile_shape(7, 64) == (1, 32)
    assert tile_shape(1, 4096) == (1, 32)


def test_only_long_gemvs_stream_b():
    assert stream_width(1, 4096, 4096) == 1024
    assert stream_width(4, 2048, 2048) == 1024
    assert stream_width(8, 4096, 4096) is None  # enough rows for register tiles
    assert stream_width(1, 1024, 4096) is None  # short K: a register tile's panel stays within the TLB
    assert stream_width(1, 4096, 1024) is None  # one tile: nothing to spread over the threads


def test_template_takes_matmul_with_or_without_an_epilogue():
    a, b, bias = te.placeholder((64, 32), name="a"), te.placeholder((32, 48), name="b"), te.placeholder((48,), name="c")
    assert _templated([a, b, topi.nn.matmul(a, b)])
    assert _templated([a, b, bias, topi.nn.relu(topi.add(topi.nn.matmul(a, b), bias))])
    x, y = te.placeholder((3, 16, 8), name="x"), te.placeholder((3, 8, 32), name="y")
    assert _templated([x, y, topi.nn.batch_matmul(x, y, transpose_b=False)])


def _scheduled(tensors) -> str:
    sch = Schedule(tvm.IRModule({"main": te.create_prim_func(tensors)}))
    outputs = _outputs(sch)
    _inline_spatial(sch, outputs)
    assert apply_gemm_template(sch, outputs)
    return sch.mod.script()


def test_template_packs_panels_of_b_only_where_they_are_shared_and_read_in_place():
    a, b = te.placeholder((64, 32), name="a"), te.placeholder((32, 64), name="b")
    packed = _scheduled([a, b, topi.nn.matmul(a, b)])
    assert "b_global = T.sblock_alloc_buffer((2, 32, 32))" in packed  # [N / NR, K, NR]
    x, y = te.placeholder((3, 16, 8), name="x"), te.placeholder((3, 8, 32), name="y")
    assert "y_global = T.sblock_alloc_buffer((3, 1, 8, 32))" in _scheduled(
        [x, y, topi.nn.batch_matmul(x, y, transpose_b=False)])
    row = te.placeholder((8, 32), name="row")  # one row tile: nothing shares the panel
    assert "_global" not in _scheduled([row, b, topi.nn.matmul(row, b)])
    bt = te.placeholder((64, 32), name="bt")  # B read through an inlined transpose: not packed
    b_view = te.compute((32, 64), lambda k, j: bt[j, k], name="transpose")
    assert "_global" not in _scheduled([a, bt, topi.nn.matmul(a, b_view)])


def test_template_refuses_what_it_does_not_tile():
    a, b = te.placeholder((64, 32), name="a"), te.placeholder((32, 12), name="b")
    assert not _templated([a, b, topi.nn.matmul(a, b)])  # N not a multiple of the 16 vector lanes
    a2, b2 = te.placeholder((64, 32), name="a2"), te.placeholder((32, 32), name="b2")
    mm = topi.nn.matmul(a2, b2)
    assert not _templated([a2, b2, mm, topi.nn.relu(mm)])  # the matmul is an output and has a reader
    c = te.placeholder((32, 16), name="c")
    assert not _templated([a2, b2, c, topi.nn.matmul(topi.nn.matmul(a2, b2), c)])  # two matmuls


def _graph(shapes, build, name="g"):
    g = Graph(name)
    bld = Builder(g)
    xs = [g.add_input(TensorType(tuple(s), torch.float32), f"x{i}") for i, s in enumerate(shapes)]
    g.set_outputs([build(bld, *xs)])
    return g


CASES = [  # (name, input shapes, build): M not a multiple of the tile, M = 1, N = 16, batch, fused epilogue
    ("mm_m7", [(7, 40), (40, 64)], lambda b, x, w: b.call(aten.mm, x, w)),
    ("mm_m1", [(1, 256), (256, 96)], lambda b, x, w: b.call(aten.mm, x, w)),
    ("mm_n16", [(48, 20), (20, 16)], lambda b, x, w: b.call(aten.mm, x, w)),
    ("mm_big_parallel", [(128, 256), (256, 128)], lambda b, x, w: b.call(aten.mm, x, w)),
    ("addmm_relu", [(64,), (24, 32), (32, 64)], lambda b, c, x, w: b.call(aten.relu, b.call(aten.addmm, c, x, w))),
    ("addmm_beta_alpha", [(16, 32), (16, 8), (8, 32)],
     lambda b, c, x, w: b.call(aten.addmm, c, x, w, beta=0.5, alpha=2.0)),
    ("bmm", [(3, 20, 24), (3, 24, 32)], lambda b, x, w: b.call(aten.bmm, x, w)),
    ("gemv_streamed", [(3, 2048), (2048, 2048)], lambda b, x, w: b.call(aten.mm, x, w)),
    ("gemv_streamed_relu", [(2048,), (1, 2048), (2048, 2048)],
     lambda b, c, x, w: b.call(aten.relu, b.call(aten.addmm, c, x, w))),
]


@pytest.mark.parametrize("name,shapes,build", CASES, ids=[c[0] for c in CASES])
def test_templated_kernel_matches_pytorch(name, shapes, build):
    graph = _graph(shapes, build)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(s, generator=gen) for s in shapes]
    kernel = build_kernel(graph)
    assert 'scope="local"' in kernel.source  # the tile's accumulators: the template ran
    # the streamed cases sum 2048 products in another order than MKL: outputs ~45 in size, errors ~5e-5
    assert_match(kernel(*inputs), to_fx(graph)(*inputs), scale=10.0 if name.startswith("gemv") else 1.0)


def test_untuned_compile_runs_gemm_in_tir_when_asked(tmp_path):
    graph = _graph([(16, 32)], lambda b, x: b.call(aten.relu, b.call(aten.mm, x, b.weight("w", torch.randn(32, 48)))))
    mm, relu = [n for n in graph.nodes if n.op.name in ("aten.mm", "aten.relu")]
    outline_region(graph, [mm, relu], FUSED, {"kind": "epilogue"}, "epi")
    tvm_backend._KERNEL_CACHE.clear()
    compiled = compile_graph(graph, "tvm", {"gemm": "tvm", "cache_dir": tmp_path})
    (exe,) = [m.fn for m in compiled.module.modules() if hasattr(m, "fn")]
    (entry,) = [p for p in exe.kernel_paths if "aten.mm" in p["ops"]]
    assert entry["path"] == "tvm" and exe.tuning is None
    x = torch.randn(16, 32)
    assert_match(compiled(x), to_fx(graph)(x))


def test_template_refuses_an_epilogue_over_another_output_space():
    a, b = te.placeholder((64, 32), name="a"), te.placeholder((32, 48), name="b")
    mm = topi.nn.matmul(a, b)
    assert not _templated([a, b, topi.transpose(mm)])  # [48, 64]: not the matmul's tiles
