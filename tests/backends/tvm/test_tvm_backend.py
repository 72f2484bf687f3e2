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
from kiln.passes.manager import PassManager, context_for, parse_pipeline  # noqa: E402


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


def _exe(compiled):
    (exe,) = [m.fn for m in compiled.module.modules() if hasattr(m, "fn")]
    return exe


class _GatedCell(torch.nn.Module):
    """An LSTM-like gate block: the pointwise group reads four column slices of one tensor."""

    def forward(self, x, c):
        i, f, g, o = x.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c)


def test_kernel_reads_through_a_split_instead_of_copying_its_slices():
    x, c = torch.randn(8, 64), torch.randn(8, 16)
    graph = from_export(_GatedCell(), (x, c))
    PassManager(parse_pipeline("O2")).run(graph, context_for("tvm"))
    compiled = _check(graph, (x, c))
    tvm_kernels = [p for p in _exe(compiled).kernel_paths if p["path"] == "tvm"]
    assert len(tvm_kernels) == 1 and "aten.split_with_sizes" in tvm_kernels[0]["ops"]
    assert not [p for p in _exe(compiled).kernel_paths if p["path"] == "torch"]


def test_wide_cat_runs_in_pytorch_and_matches():
    class Stack(torch.nn.Module):
        def forward(self, x):
            return torch.stack([torch.tanh(x) * k for k in range(8)], dim=1)

    x = torch.randn(4, 16)
    graph = from_export(Stack(), (x,))
    PassManager(parse_pipeline("O1")).run(graph, PassContext())
    compiled = _check(graph, (x,))
    assert any(p["path"] == "torch" and p["ops"] == ["aten.cat"] for p in _exe(compiled).kernel_paths)


def test_gemm_weights_become_row_major_only_where_every_reader_is_a_gemm():
    from kiln.backends.tvm.backend import _gemm_weights_row_major
    from kiln.ir.builder import Builder
    from kiln.ir.graph import Graph
    from kiln.ir.types import TensorType

    g = Graph("t")
    b = Builder(g)
    x = g.add_input(TensorType((8, 16), torch.float32), "x")
    w_gemm = b.weight("w_gemm", torch.randn(32, 16).t())  # [16, 32] as a transposed view, like a linear's
    w_other = b.weight("w_other", torch.randn(32, 16).t())
    bias = b.weight("bias", torch.randn(32))
    y = b.call(aten.addmm, bias, x, w_gemm)
    z = b.call(aten.add.Tensor, b.call(aten.mm, x, w_other), b.call(aten.sum.dim_IntList, w_other, [0]))
    g.set_outputs([y, z])
    originals = dict(g.weights)
    _gemm_weights_row_major(g, {})
    assert g.weights["w_gemm"].is_contiguous() and torch.equal(g.weights["w_gemm"], originals["w_gemm"])
    assert g.weights["w_other"] is originals["w_other"]  # also read by sum: left as it is
    assert not originals["w_gemm"].is_contiguous()  # the tensor itself is not changed


class _LSTMStep(torch.nn.Module):
    """One LSTM step: the gates are a GEMM plus the input projection (an epilogue group, 4H wide), read as
    four column slices by the cell update (a pointwise group, H wide)."""

    def __init__(self, hidden=16):
        super().__init__()
        self.hh = torch.nn.Linear(hidden, 4 * hidden)

    def forward(self, gates_x, h, c):
        i, f, g, o = (gates_x + self.hh(h)).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


def test_extern_gemm_epilogue_joins_the_group_that_reads_it():
    inputs = (torch.randn(4, 64), torch.randn(4, 16), torch.randn(4, 16))
    graph = from_export(_LSTMStep().eval(), inputs)
    PassManager(parse_pipeline("O2")).run(graph, context_for("tvm"))
    groups = [n.attrs["kind"] for n in graph.nodes if n.op is FUSED]
    assert sorted(groups) == ["epilogue", "pointwise"]  # fusion keeps them apart: 4H against H elements
    compiled = _check(graph, inputs)
    kernels = _exe(compiled).kernel_paths
    tvm_kernels = [p for p in kernels if p["path"] == "tvm"]
    # one kernel: the gate add, the slices and the cell update; the 4H-wide gates are never written
    assert len(tvm_kernels) == 1 and {"aten.add.Tensor", "aten.sigmoid"} <= set(tvm_kernels[0]["ops"])
    assert [p["ops"] for p in kernels if p["path"] == "torch"] == [["mkl._mkl_linear"]]


def test_epilogue_read_outside_its_consumer_group_is_not_merged():
    from kiln.backends.tvm.backend import _merge_extern_epilogues

    class TwoReaders(_LSTMStep):
        def forward(self, gates_x, h, c):
            gates = gates_x + self.hh(h)
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), gates

    inputs = (torch.randn(4, 64), torch.randn(4, 16), torch.randn(4, 16))
    graph = from_export(TwoReaders().eval(), inputs)
    PassManager(parse_pipeline("O2")).run(graph, context_for("tvm"))
    assert _merge_extern_epilogues(graph) == 0  # the gates are a graph output
    _check(graph, inputs)


class _Attention(torch.nn.Module):
    """Hand-written multi-head attention, as torch.export writes it: bmm, softmax, bmm (optionally causal
    through a lower-triangular buffer, or masked by a mask operand)."""

    def __init__(self, causal=False, seq=16):
        super().__init__()
        self.causal = causal
        self.register_buffer("tril", torch.ones(seq, seq, dtype=torch.bool).tril())

    def forward(self, q, k, v, keep=None):
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        if self.causal:
            scores = scores.masked_fill(~self.tril, float("-inf"))
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


def _attention_graph(model, inputs):
    graph = from_export(model, inputs)
    PassManager(parse_pipeline("O2")).run(graph, context_for("tvm"))
    assert [n.attrs["kind"] for n in graph.nodes if n.op is FUSED].count("attention") == 1
    return graph


@pytest.mark.parametrize("causal", [False, True])
def test_attention_group_runs_pytorch_fused_attention(causal):
    qkv = tuple(torch.randn(2, 4, 16, 8) for _ in range(3))
    model = _Attention(causal).eval()
    graph = _attention_graph(model, qkv)
    compiled = _check(graph, qkv)
    assert_match(compiled(*qkv)[0], model(*qkv))
    paths = _exe(compiled).kernel_paths
    assert ["aten.scaled_dot_product_attention"] in [p["ops"] for p in paths if p["path"] == "torch"]
    assert not any("aten.bmm" in p["ops"] for p in paths)  # no scores materialised


def test_attention_with_a_mask_operand_keeps_its_decomposed_lowering():
    qkv = tuple(torch.randn(2, 4, 16, 8) for _ in range(3))
    keep = torch.rand(16, 16) > 0.3
    keep[:, 0] = True  # no fully masked row
    model = _Attention().eval()
    graph = _attention_graph(model, (*qkv, keep))
    compiled = _check(graph, (*qkv, keep))
    assert not any(p["ops"] == ["aten.scaled_dot_product_attention"] for p in _exe(compiled).kernel_paths)


class _Scan(torch.nn.Module):
    """Mamba's selective scan, small: dA = exp(delta * A) for every step at once, read one step at a time."""

    def __init__(self, d=4, n=2):
        super().__init__()
        self.A = torch.nn.Parameter(-torch.rand(d, n))

    def forward(self, delta, bu):
        dA = torch.exp(delta.unsqueeze(-1) * self.A)  # (b, l, d, n)
        dBu = delta.unsqueeze(-1) * bu.unsqueeze(2)
        h = delta.new_zeros(delta.shape[0], delta.shape[2], self.A.shape[1])
        ys = []
        for t in range(delta.shape[1]):
            h = dA[:, t] * h + dBu[:, t]
            ys.append(h.sum(dim=-1))
        return torch.stack(ys, dim=1)


def test_sliced_producer_is_computed_inside_the_groups_that_read_its_steps():
    from kiln.backends.tvm.backend import _merge_sliced_producers
    from kiln.ir.clone import clone_graph

    inputs = (torch.rand(1, 100, 4), torch.randn(1, 100, 2))  # 300 ops: fusion (256 at most) cuts the scan
    graph = from_export(_Scan().eval(), inputs)
    PassManager(parse_pipeline("O2")).run(graph, context_for("tvm"))
    readers = [n for n in graph.nodes if n.op is FUSED and n.attrs["kind"] == "reduction"]
    assert len(readers) >= 2  # the producer is read by several chunks: each gets its own copy
    assert _merge_sliced_producers(clone_graph(graph)) == len(readers)
    compiled = _check(graph, inputs)
    kernels = _exe(compiled).kernel_paths
    # exp(delta * A) is computed inside the scan kernels, step by step: no kernel writes it whole
    assert [p["ops"] for p in kernels if p["path"] == "tvm" and "aten.exp" in p["ops"]] == \
        [p["ops"] for p in kernels if p["path"] == "tvm" and "aten.sum.dim_IntList" in p["ops"]]
    assert len([p for p in kernels if p["path"] == "tvm"]) == len(readers)


def test_attention_reading_transposed_views_gets_its_own_operands():
    class HeadsLast(torch.nn.Module):  # q, k, v arrive as [B, L, H, E]: the heads transpose feeds the group
        def forward(self, q, k, v):
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            return torch.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-1) @ v

    qkv = tuple(torch.randn(2, 16, 4, 8) for _ in range(3))
    model = HeadsLast().eval()
    graph = _attention_graph(model, qkv)
    compiled = _check(graph, qkv)
    assert_match(compiled(*qkv)[0], model(*qkv))
    paths = _exe(compiled).kernel_paths
    assert ["aten.scaled_dot_product_attention"] in [p["ops"] for p in paths]
