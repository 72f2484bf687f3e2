"""The tvm target end to end: zoo graphs compiled with TVM kernels + PyTorch externs equal the reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from examples.models import REGISTRY  # noqa: E402
from kiln.backends.base import get_backend  # noqa: E402
from kiln.backends.driver import compile_graph  # noqa: E402
from kiln.frontend.export import from_export  # noqa: E402
from kiln.ir.ops import FUSED, aten  # noqa: E402
from kiln.ir.outline import outline_region  # noqa: E402
from kiln.ir.to_fx import to_fx  # noqa: E402
from kiln.numerics import assert_match  # noqa: E402
from kiln.passes.base import PassContext  # noqa: E402
from kiln.passes.manager import PassManager, parse_pipeline  # noqa: E402


def _zoo_graph(name):
    model, inputs = REGISTRY[name]()
    graph = from_export(model, inputs)
    PassManager(parse_pipeline("O1")).run(graph, PassContext())
    return graph, inputs


def _check(graph, inputs):
    compiled = compile_graph(graph, "tvm")
    ref = to_fx(graph)(*inputs)
    got = compiled(*inputs)
    for o, r in zip(got, ref):
        assert_match(o, r)
    return compiled


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_zoo_model_matches_reference(name):
    graph, inputs = _zoo_graph(name)
    compiled = _check(graph, inputs)
    assert not compiled.report.fell_back
    (exe,) = [m.fn for m in compiled.module.modules() if hasattr(m, "fn")]
    paths = {p["path"] for p in exe.kernel_paths}
    assert paths == {"tvm", "torch"}  # pointwise ops in TVM, GEMMs through PyTorch's kernels


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_zoo_model_matches_reference(name):
    _check(*_zoo_graph(name))


def test_fused_group_becomes_one_kernel_around_the_extern_gemm():
    graph, inputs = _zoo_graph("mlp")
    user = graph.find(aten.gelu)[0]
    addmm = user.input(0).producer
    assert addmm.is_a(aten.addmm) and addmm.output.users == [user]
    group = outline_region(graph, [addmm, user], FUSED, {"kind": "epilogue"}, "epi")
    compiled = _check(graph, inputs)
    (exe,) = [m.fn for m in compiled.module.modules() if hasattr(m, "fn")]
    inside = [p for p in exe.kernel_paths if p["kernel"].startswith("epi")]
    assert [p["path"] for p in inside] == ["tvm"] and inside[0]["ops"] == ["aten.gelu"]
    assert group.subgraph is not None


def test_target_is_registered_and_supports_what_it_lowers():
    backend = get_backend("tvm")
    graph, _ = _zoo_graph("mlp")
    by_op = {n.op.name: backend.supports(n) for n in graph.nodes if n.op.name != "kiln.weight"}
    assert by_op["aten.addmm"] and by_op.get("aten.relu", by_op.get("aten.gelu"))


def test_unsupported_op_falls_back_to_eager():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(torch.fft.fft(x).real)

    x = torch.randn(4, 8)
    graph = from_export(M(), (x,))
    compiled = compile_graph(graph, "tvm")
    assert compiled.report.fell_back
    assert_match(compiled(x)[0], M()(x))
