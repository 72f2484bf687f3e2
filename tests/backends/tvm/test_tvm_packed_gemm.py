"""Linear layers on MKL-packed weights inside tvm partitions: rewritten where legal, equal to addmm."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from kiln.backends.driver import compile_graph  # noqa: E402
from kiln.backends.tvm.packed_gemm import MKL_LINEAR, pack_linear_weights  # noqa: E402
from kiln.frontend.export import from_export  # noqa: E402
from kiln.ir.builder import Builder  # noqa: E402
from kiln.ir.graph import Graph  # noqa: E402
from kiln.ir.ops import aten  # noqa: E402
from kiln.ir.to_fx import to_fx  # noqa: E402
from kiln.ir.types import TensorType  # noqa: E402
from kiln.numerics import assert_match  # noqa: E402
from kiln.passes.manager import PassManager, context_for, parse_pipeline  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="PyTorch without MKL")
F32 = torch.float32


def test_rewrites_linear_gemms_and_leaves_the_others():
    torch.manual_seed(0)
    g = Graph("t")
    b = Builder(g)
    x = g.add_input(TensorType((8, 16), F32), "x")
    w = b.weight("fc.weight", torch.randn(32, 16).t())  # [K, N] as a linear layer's transposed view
    y = b.call(aten.addmm, b.weight("fc.bias", torch.randn(32)), x, w)
    z = b.call(aten.mm, y, b.weight("proj", torch.randn(32, 4)))
    wide_bias = b.call(aten.addmm, b.weight("bias2d", torch.randn(8, 4)), y, b.weight("p2", torch.randn(32, 4)))
    scaled = b.call(aten.addmm, b.weight("b3", torch.randn(4)), y, b.weight("p3", torch.randn(32, 4)), beta=0.5)
    g.set_outputs([z, wide_bias, scaled])
    inputs = (torch.randn(8, 16),)
    ref = to_fx(g)(*inputs)
    assert pack_linear_weights(g, {}) == 2  # addmm with a 1-d bias, and mm; not the [M, N] bias nor beta
    assert [n.op.name for n in g.nodes if n.op.name != "kiln.weight"] == [MKL_LINEAR, MKL_LINEAR, "aten.addmm",
                                                                          "aten.addmm"]
    for got, want in zip(to_fx(g)(*inputs), ref):
        assert_match(got, want)


def test_mlp_on_the_tvm_target_runs_packed_linears():
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).eval()
    x = torch.randn(4, 16)
    graph = from_export(model, (x,))
    PassManager(parse_pipeline("O2")).run(graph, context_for("tvm"))
    compiled = compile_graph(graph, "tvm")
    (exe,) = [m.fn for m in compiled.module.modules() if hasattr(m, "fn")]
    assert sum(MKL_LINEAR in p["ops"] for p in exe.kernel_paths) == 2
    with torch.no_grad():
        assert_match(compiled(x)[0], model(x))
