"""Lowering onto real integer kernels: every kernel candidate agrees with kiln's exact reference op on real
activations (or is reported and never chosen), the choice is a measured one, the residual is accumulated
in place only when that is safe, and whole lowered graphs compute what their reference computes."""

from __future__ import annotations

import pytest
import torch

from examples.models import resnet
from kiln.frontend.export import from_export
from kiln.ir import quant_ops as Q
from kiln.ir.builder import Builder
from kiln.ir.clone import clone_graph
from kiln.ir.graph import Graph
from kiln.ir.ops import aten, get_op
from kiln.ir.to_fx import to_fx
from kiln.ir.types import TensorType
from kiln.ir.verifier import verify
from kiln.passes.quantize import quantize_graph
from kiln.passes.quantize.lower import LOWERINGS, choose, lower_graph
from kiln.passes.quantize.weights import quantize_per_channel, quantize_per_group


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _qlinear_graph(kind: str) -> tuple[Graph, torch.Tensor]:
    g = Graph(kind)
    x = g.add_input(TensorType((32, 64), torch.float32), "x")
    b = Builder(g)
    w = torch.randn(48, 64, generator=_gen(1)) * 0.1
    bias = b.weight("b", torch.randn(48, generator=_gen(2)))
    if kind == "wq4":
        qw = quantize_per_group(w, 32)
        y = b.call(Q.WQ_LINEAR, x, b.weight("q", qw.q), b.weight("s", qw.scales), b.weight("z", qw.zero_points), 32,
                   bias)
    elif kind == "wq8":
        qw = quantize_per_channel(w)
        y = b.call(Q.WQ_LINEAR, x, b.weight("q", qw.q), b.weight("s", qw.scales.reshape(-1, 1)),
                   b.weight("z", qw.zero_points.reshape(-1, 1)), 64, bias)
    else:
        qw = quantize_per_channel(w)
        qv, sv, zv = b.weight("q", qw.q), b.weight("s", qw.scales), b.weight("z", qw.zero_points)
        if kind == "dynamic":
            y = b.call(Q.DYNAMIC_QLINEAR, x, qv, sv, zv, bias)
        else:
            qx = b.call(Q.QUANTIZE, x, 0.03, 120, 0, 255, torch.uint8)
            out_dtype = torch.uint8 if kind == "static-u8" else torch.float32
            y = b.call(Q.QLINEAR, qx, 0.03, 120, qv, sv, zv, bias, 0.05, 10, out_dtype, "relu", None, 1.0, 0)
    g.set_outputs([y])
    return g, torch.randn(32, 64, generator=_gen(3))


def test_every_linear_kernel_matches_the_reference():
    chosen = {}
    for kind in ("static-u8", "static-f32", "dynamic", "wq4", "wq8"):
        g, x = _qlinear_graph(kind)
        node = g.outputs[0].producer
        inputs = [to_fx(_prefix(g, node))(x)[0]] if node.op is Q.QLINEAR else [x]
        cand, row = choose(node, inputs, rounds=2, reps=1)
        chosen[kind] = cand.name
        wrong = {k: v for k, v in row.items() if isinstance(v, str) and v.startswith(("wrong", "failed"))}
        # two candidates compute something else on purpose and are reported as such: the float path of the
        # dynamic op skips activation quantization, the bf16 int4 kernel rounds activations to bf16
        allowed = {"dynamic": {"fp32-dequant"}, "wq4": {"int4pack-bf16"}}.get(kind, set())
        assert set(wrong) <= allowed, (kind, wrong)
        assert cand.name != "reference"
        assert all(isinstance(row[c.name], float) for c in LOWERINGS[node.op] if c.name == cand.name)
    # the 8-bit weight is not uint4: the int4 kernel says so instead of being tried
    g, _ = _qlinear_graph("wq8")
    _, row = choose(g.outputs[0].producer, None)
    assert row["int4pack"].startswith("n/a")


def _prefix(g: Graph, node) -> Graph:
    """The graph up to ``node``'s activation input (to capture it)."""
    p = clone_graph(g)
    p.set_outputs([p.nodes[[n.output.name for n in g.nodes].index(node.args[0].name)].output])
    return p


def test_whole_lowered_graph_matches_reference_and_reports_paths(digits_graph, digits_calib, digits_cnn):
    quantize_graph(digits_graph, "int8", digits_calib)
    ref = to_fx(clone_graph(digits_graph))
    x = digits_cnn[1].x_test[:64]
    report = lower_graph(digits_graph, (x,), rounds=2, reps=1)
    verify(digits_graph)
    names = {n.op.name for n in digits_graph.nodes}
    assert not any(n.startswith("kiln.q") or n in ("kiln.quantize", "kiln.dequantize") for n in names)
    assert {r["op"] for r in report.rows} == {"kiln.quantize", "kiln.qconv2d", "kiln.qlinear"}
    assert all(r["chosen"] != "reference" for r in report.rows)
    assert sum(report.paths().values()) == len(report.rows) == 6
    with torch.no_grad():
        a, b = to_fx(digits_graph)(x)[0], ref(x)[0]
    # kernels may round a requantization differently (one step); the logits agree closely, the labels too
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.98
    # a dynamic batch: the lowered graph runs at other batch sizes
    assert to_fx(digits_graph)(x[:5])[0].shape == (5, 10)


def test_without_inputs_the_first_applicable_kernel_is_taken(digits_graph, digits_calib):
    quantize_graph(digits_graph, "int8", digits_calib)
    report = lower_graph(digits_graph, None)
    assert {r["chosen"] for r in report.rows if r["op"] in ("kiln.qconv2d", "kiln.qlinear")} == {"onednn"}


def test_residual_accumulates_in_place_only_when_dead():
    model, (x,) = resnet.make_resnet18("small")
    g = from_export(model, (x,))
    quantize_graph(g, "int8", [(x,)])
    ref = to_fx(clone_graph(g))
    lower_graph(g, None)
    binary = get_op("onednn.qconv2d_pointwise.binary")
    fused = [n for n in g.nodes if n.op is binary]
    assert len(fused) == 8
    cloned = [n for n in fused if n.args[6].producer is not None and n.args[6].producer.is_a(aten.clone)]
    # every residual is a oneDNN conv result (or a max pool of one) that no one reads afterwards:
    # all eight are accumulated in place, no copies
    assert cloned == []
    with torch.no_grad():
        for _ in range(2):  # in-place accumulation must not leak from one call into the next
            a = to_fx(g)(x)[0]
        b = ref(x)[0]
    assert float((a - b).norm() / b.norm()) < 0.02


def test_accumulator_that_is_also_the_input_is_copied():
    g = Graph("same")
    x = g.add_input(TensorType((2, 8, 6, 6), torch.float32), "x")
    b = Builder(g)
    qw = quantize_per_channel(torch.randn(8, 8, 3, 3, generator=_gen(4)) * 0.1)
    qv, sv, zv = b.weight("q", qw.q), b.weight("s", qw.scales), b.weight("z", qw.zero_points)
    q = b.call(Q.QUANTIZE, x, 0.05, 0, 0, 255, torch.uint8)
    c1 = b.call(Q.QCONV2D, q, 0.05, 0, qv, sv, zv, None, [1, 1], [1, 1], [1, 1], 1, 0.05, 0, torch.uint8, "relu")
    # conv(c1) + c1: the residual is the conv's own input, so it cannot be overwritten while read
    y = b.call(Q.QCONV2D, c1, 0.05, 0, qv, sv, zv, None, [1, 1], [1, 1], [1, 1], 1, 0.05, 0, torch.uint8, "relu",
               c1, 0.05, 0)
    g.set_outputs([b.call(Q.DEQUANTIZE, y, 0.05, 0)])
    ref = to_fx(clone_graph(g))
    xin = torch.rand(2, 8, 6, 6, generator=_gen(5)) * 3
    lower_graph(g, None)
    binary = [n for n in g.nodes if n.op is get_op("onednn.qconv2d_pointwise.binary")]
    assert len(binary) == 1 and binary[0].args[6].producer.is_a(aten.clone)
    with torch.no_grad():
        assert (to_fx(g)(xin)[0] - ref(xin)[0]).abs().max() <= 0.05 + 1e-6


# -- kiln's TVM int8 kernel (AVX-512 VNNI) as a measured candidate -----------------------------------------

def _skip_without_vnni():
    from kiln.passes.quantize.lower import _tvm_int8
    reason = _tvm_int8()[1]
    if reason is not None:
        pytest.skip(f"the TVM int8 kernel cannot run here: {reason}")


def test_tvm_vnni_candidate_is_measured_beside_onednn():
    _skip_without_vnni()
    for kind in ("static-u8", "static-f32", "dynamic"):
        g, x = _qlinear_graph(kind)
        node = g.outputs[0].producer
        inputs = [to_fx(_prefix(g, node))(x)[0]] if node.op is Q.QLINEAR else [x]
        cand, row = choose(node, inputs, rounds=2, reps=1)
        # both kernels are correct on these inputs and both are timed; the faster one is chosen
        assert isinstance(row["tvm-vnni"], float) and isinstance(row["onednn"], float), (kind, row)
        assert row[cand.name] == min(v for v in row.values() if isinstance(v, float))


def _only(monkeypatch, op, name: str) -> None:
    monkeypatch.setitem(LOWERINGS, op, [c for c in LOWERINGS[op] if c.name == name])


def test_graph_lowered_onto_the_tvm_vnni_kernel_matches_the_reference_exactly(monkeypatch):
    """int8 activations, ragged K (30) and N (20), a fused uint8 residual, relu and requantization; and a
    dynamic linear: the lowered graph gives the reference's integers and floats bit for bit."""
    _skip_without_vnni()
    _only(monkeypatch, Q.QLINEAR, "tvm-vnni")
    _only(monkeypatch, Q.DYNAMIC_QLINEAR, "tvm-vnni")
    _only(monkeypatch, Q.QUANTIZE, "reference")
    _only(monkeypatch, Q.DEQUANTIZE, "reference")
    g = Graph("vnni")
    x = g.add_input(TensorType((6, 30), torch.float32), "x")
    r = g.add_input(TensorType((6, 20), torch.float32), "r")
    b = Builder(g)
    qw = quantize_per_channel(torch.randn(20, 30, generator=_gen(6)) * 0.1)
    qv, sv, zv = b.weight("q", qw.q), b.weight("s", qw.scales), b.weight("z", qw.zero_points)
    bias = b.weight("b", torch.randn(20, generator=_gen(7)))
    qx = b.call(Q.QUANTIZE, x, 0.02, -3, -128, 127, torch.int8)
    qr = b.call(Q.QUANTIZE, r, 0.05, 100, 0, 255, torch.uint8)
    y = b.call(Q.QLINEAR, qx, 0.02, -3, qv, sv, zv, bias, 0.04, 7, torch.uint8, "relu", qr, 0.05, 100)
    qw2 = quantize_per_channel(torch.randn(12, 20, generator=_gen(8)) * 0.1)
    d = b.call(Q.DYNAMIC_QLINEAR, b.call(Q.DEQUANTIZE, y, 0.04, 7), b.weight("q2", qw2.q),
               b.weight("s2", qw2.scales), b.weight("z2", qw2.zero_points), None)
    g.set_outputs([y, d])
    ref = to_fx(clone_graph(g))
    xs = (torch.randn(6, 30, generator=_gen(9)), torch.randn(6, 20, generator=_gen(10)))
    report = lower_graph(g, xs, rounds=1, reps=1)
    verify(g)
    chosen = {r["op"]: r for r in report.rows}
    assert chosen["kiln.qlinear"]["chosen"] == chosen["kiln.dynamic_qlinear"]["chosen"] == "tvm-vnni"
    assert isinstance(chosen["kiln.qlinear"]["candidates"]["tvm-vnni"], float)
    names = {n.op.name for n in g.nodes}
    assert {"kiln.tvm_vnni_qlinear", "kiln.tvm_vnni_dynamic_qlinear"} <= names
    with torch.no_grad():
        got, want = to_fx(g)(*xs), ref(*xs)
    assert len(torch.unique(want[0])) > 10  # the integers are not trivially saturated
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_tvm_vnni_refuses_what_it_does_not_handle():
    _skip_without_vnni()
    g, _ = _qlinear_graph("static-u8")
    node = g.outputs[0].producer
    zps = g.weights[node.args[5].producer.attrs["name"]]
    zps[0] = 3  # an asymmetric weight: the kernel handles symmetric ones only
    _, row = choose(node, None)
    assert row["tvm-vnni"] == "n/a: weight zero points must be 0"


# -- quantizing into channels-last, timing ------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3, 4, 8])
@pytest.mark.parametrize("already_channels_last", [False, True])
def test_channels_last_quantize_gives_the_reference_integers(channels, already_channels_last):
    from kiln.passes.quantize.lower import torch_quantize, torch_quantize_channels_last
    x = torch.randn(2, channels, 9, 7, generator=_gen(6)) * 4
    if already_channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for dtype, scale, zp, (lo, hi) in ((torch.uint8, 0.03, 131, (0, 255)), (torch.int8, 0.05, 0, (-128, 127))):
        q = torch_quantize_channels_last(x, scale, zp, lo, hi, dtype)
        assert q.dtype == dtype and q.is_contiguous(memory_format=torch.channels_last)
        # the same kernel's integers in the other layout, and within one step of kiln's reference quantize
        assert torch.equal(q, torch_quantize(x.contiguous(), scale, zp, lo, hi, dtype))
        assert int((q.to(torch.int32) - Q.quantize(x, scale, zp, lo, hi, dtype).to(torch.int32)).abs().max()) <= 1


def test_timing_interleaves_single_calls_and_keeps_each_candidates_fastest():
    from kiln.passes.quantize.lower import _time
    order = []
    fns = {"a": lambda t: order.append("a"), "b": lambda t: order.append("b")}
    times = _time(fns, [torch.zeros(1)], rounds=3, reps=2)
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    # one warm-up each, then 3 * 2 single calls per candidate, alternating call by call
    assert order == ["a", "b"] + ["a", "b"] * 6
