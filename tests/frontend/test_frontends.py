"""The capture frontends on small models: ``from_export`` and ``from_symbolic_trace`` (types, weight
names, output structure, numerics through the fx oracle), symbolic batch dims from
``torch.export.Dim``, and AOTAutograd graphs with SymInt inputs from ``torch.compile(dynamic=True)``.
"""

from __future__ import annotations

import pytest
import sympy
import torch
import torch.nn.functional as F

import kiln
from kiln.errors import UnsupportedError
from kiln.frontend.export import from_export, from_symbolic_trace
from kiln.ir.parser import parse_graph
from kiln.ir.to_fx import to_fx
from kiln.ir.types import ScalarType, TensorType
from kiln.ir.verifier import verify
from kiln.numerics import assert_match

FRONTENDS = {"export": from_export, "symbolic_trace": from_symbolic_trace}


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class LinearGeluNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 16)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(F.gelu(self.fc(x)))


class ConvBnRelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(6, 10)
        self.cls = torch.nn.Linear(10, 3)
        self.reg = torch.nn.Linear(10, 1)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.cls(h).log_softmax(-1), self.reg(h).squeeze(-1)


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def _seeded(factory):
    torch.manual_seed(0)
    model = factory().eval()
    if isinstance(model, ConvBnRelu):  # non-trivial running statistics, so eval() BN really normalizes
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def _run(graph, *inputs):
    """Run a kiln graph through the fx oracle (kiln.ir.to_fx)."""
    outs = to_fx(graph)(*inputs)
    return outs[0] if len(outs) == 1 else outs


def _ops(graph) -> list[str]:
    return [n.op.name for n in graph.nodes if n.op.name != "kiln.weight"]


def _weights(graph) -> dict[str, torch.Tensor]:
    return {n.attrs["name"]: graph.weights[n.attrs["name"]] for n in graph.nodes if n.op.name == "kiln.weight"}


# -- from_export / from_symbolic_trace ------------------------------------------------------------------

@pytest.mark.parametrize("frontend", sorted(FRONTENDS))
def test_linear_gelu_layernorm(frontend):
    model, x = _seeded(LinearGeluNorm), torch.randn(4, 8)
    g = FRONTENDS[frontend](model, (x,))
    verify(g)
    assert [v.type for v in g.inputs] == [TensorType((4, 8), torch.float32)]
    assert [v.type for v in g.outputs] == [TensorType((4, 16), torch.float32)]
    assert {"aten.addmm", "aten.gelu", "aten.native_layer_norm"} <= set(_ops(g))
    weights = _weights(g)
    assert set(weights) == {"fc.weight", "fc.bias", "norm.weight", "norm.bias"}  # fully qualified names
    for name, t in model.state_dict().items():
        assert torch.equal(weights[name], t), name
    assert_match(_run(g, x), model(x))
    assert_match(_run(parse_graph(str(g), weights=g.weights), x), model(x))  # the text form round-trips


@pytest.mark.parametrize("frontend", sorted(FRONTENDS))
def test_conv_bn_relu_eval(frontend):
    model, x = _seeded(ConvBnRelu), torch.randn(2, 3, 10, 10)
    g = FRONTENDS[frontend](model, (x,))
    verify(g)
    assert g.outputs[0].type == TensorType((2, 8, 10, 10), torch.float32)
    ops = set(_ops(g))
    assert "aten.convolution" in ops and "aten.relu" in ops
    assert any("batch_norm" in op for op in ops), ops  # eval BN: inference batch norm, no buffer writes
    assert {"bn.running_mean", "bn.running_var"} <= set(_weights(g))
    assert_match(_run(g, x), model(x))


def test_conv_bn_train_mode_export_is_unsupported():
    model = _seeded(ConvBnRelu).train()
    with pytest.raises(UnsupportedError, match=r"mutates state .*call model\.eval\(\)"):
        from_export(model, (torch.randn(2, 3, 10, 10),))


@pytest.mark.parametrize("frontend", sorted(FRONTENDS))
def test_two_outputs_as_tuple(frontend):
    model, x = _seeded(TwoHeads), torch.randn(5, 6)
    g = FRONTENDS[frontend](model, (x,))
    verify(g)
    assert [v.type for v in g.outputs] == [TensorType((5, 3), torch.float32), TensorType((5,), torch.float32)]
    assert g.meta["out_spec"] is not None
    got = _run(g, x)
    assert isinstance(got, tuple) and len(got) == 2
    assert_match(got, model(x))


def test_two_outputs_keep_structure_through_kiln_compile():
    model, x = _seeded(TwoHeads), torch.randn(5, 6)
    cm = kiln.compile(model, (x,))
    out = cm(x)
    assert type(out) is tuple and len(out) == 2  # the model's own structure, not a flat list
    assert_match(out, model(x))


# -- symbolic dims from torch.export.Dim -----------------------------------------------------------------

def test_dynamic_batch_symbolic_dims():
    model, x = _seeded(LinearGeluNorm), torch.randn(4, 8)
    batch = torch.export.Dim("batch", min=2, max=256)
    g = from_export(model, (x,), dynamic_shapes=({0: batch},))
    verify(g)
    in_type = g.inputs[0].type
    b = in_type.shape[0]
    assert isinstance(b, sympy.Symbol), in_type
    assert in_type.shape[1:] == (8,)
    assert in_type.free_symbols() == {b}
    assert g.outputs[0].type == TensorType((b, 16), torch.float32)  # the same symbol flows to the output
    assert str(b) in str(g).splitlines()[0]  # and is printed in the signature
    g2 = parse_graph(str(g), weights=g.weights)  # symbolic types survive the text form
    assert g2.inputs[0].type == in_type
    for n in (2, 7, 33):
        xn = torch.randn(n, 8)
        assert_match(_run(g, xn), model(xn), f"batch {n}")


def test_dynamic_batch_kiln_compile_runs_other_batch_sizes():
    model, x = _seeded(TwoHeads), torch.randn(4, 6)
    batch = torch.export.Dim("batch", min=2, max=256)
    cm = kiln.compile(model, (x,), dynamic_shapes=({0: batch},))
    assert isinstance(cm.graph.inputs[0].type.shape[0], sympy.Symbol)
    for n in (3, 9, 64):
        xn = torch.randn(n, 6)
        out = cm(xn)
        assert out[0].shape == (n, 3) and out[1].shape == (n,)
        assert_match(out, model(xn), f"batch {n}")
    with pytest.raises(kiln.KilnInputError, match=r"input 0 .*expected f32\[\w+, 6\], got f32\[3, 5\]"):
        cm(torch.randn(3, 5))  # the static dim is still checked


# -- torch.compile(dynamic=True): AOTAutograd graphs with SymInt inputs ----------------------------------

def _graph_inputs_from_dump(directory) -> list[str]:
    """Input types of every graph kiln dumped (first dump of each graph), as printed."""
    sigs = []
    for d in sorted(p for p in directory.iterdir() if p.is_dir()):
        first = sorted(d.glob("*.kir"))[0]
        g = parse_graph(first.read_text(), source=str(first))
        sigs.append((d.name, [v.type for v in g.inputs]))
    return sigs


def test_torch_compile_dynamic_mlp_inference(tmp_path):
    model = _seeded(mlp)
    n = len(kiln.fallback_reports())
    compiled = torch.compile(model, backend="kiln", dynamic=True,
                             options={"verify": True, "debug_dir": str(tmp_path)})
    with torch.no_grad():
        for b in (3, 5, 7):
            x = torch.randn(b, 8)
            assert_match(compiled(x), model(x), f"batch {b}")
    reports = kiln.fallback_reports()[n:]
    assert len(reports) == 1, reports  # one symbolic graph serves every batch size: no recompiles
    assert reports[0]["reason"] is None, reports  # kiln compiled it (no whole-graph fallback) ...
    assert reports[0]["fallback_ops"] == {}, reports  # ... and every op in it
    [(name, types)] = _graph_inputs_from_dump(tmp_path)
    assert name.startswith("inference")
    symints = [t for t in types if isinstance(t, ScalarType) and t.kind == "symint"]
    assert len(symints) == 1, types  # AOTAutograd passes the batch size as a SymInt input ...
    batch = symints[0].expr
    assert isinstance(batch, sympy.Symbol)
    dynamic = [t for t in types if isinstance(t, TensorType) and not t.is_static]
    assert dynamic == [TensorType((batch, 8), torch.float32)], types  # ... and the activation's batch dim


def test_torch_compile_dynamic_mlp_training():
    model = _seeded(mlp)
    ref = _seeded(mlp)
    n = len(kiln.fallback_reports())
    compiled = torch.compile(model, backend="kiln", dynamic=True)
    for b in (3, 5, 7):
        x = torch.randn(b, 8)
        compiled(x).square().mean().backward()
        ref(x).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_match(p.grad, q.grad, f"grad of {name}")
    reports = kiln.fallback_reports()[n:]
    assert sorted(r["graph"].rstrip("0123456789") for r in reports) == ["backward", "forward"], reports
    assert all(r["reason"] is None and not r["fallback_ops"] for r in reports), reports


# -- torch.compile: AOT graphs kiln used to hand back to eager (regressions found by the OpInfo sweep) ----

def test_torch_compile_graph_with_tensor_constant_compiles():
    """A tensor made inside the function becomes a real constant (get_attr) in the AOT graph, and
    AOTAutograd calls kiln with Dynamo's fake mode active: kiln must read the constant outside it."""

    def f(x):
        return torch.where(x > 0, x, torch.tensor(float("-inf"))).amax(0)

    x = torch.randn(3, 4)
    n = len(kiln.fallback_reports())
    assert_match(torch.compile(f, backend="kiln")(x), f(x))
    reports = kiln.fallback_reports()[n:]
    assert reports and all(r["reason"] is None for r in reports), reports


def test_torch_compile_float_arguments_compile_after_restart():
    """Float arguments that change between calls make Dynamo re-trace with them as tensors (it raises
    TensorifyScalarRestartAnalysis from inside AOTAutograd); kiln must let that through, not fall back."""

    def f(x, lo, hi):
        return F.hardtanh(x, lo, hi) * lo

    compiled = torch.compile(f, backend="kiln")
    x = torch.randn(10)
    n = len(kiln.fallback_reports())
    for lo, hi in [(-0.5, 0.5), (-0.25, 0.75), (-0.1, 0.2)]:
        assert_match(compiled(x, lo, hi), f(x, lo, hi), f"hardtanh({lo}, {hi})")
    reports = kiln.fallback_reports()[n:]
    assert len(reports) >= 2 and all(r["reason"] is None for r in reports), reports


class _DataDependent(torch.nn.Module):
    def forward(self, x):
        scale = x.sum().item()
        return x * scale, torch.nonzero(x > 0)


def test_data_dependent_ops_verify_roundtrip_and_run():
    """.item() and nonzero give unbacked dims (u0) and runtime asserts; all of it survives the round trip."""
    from kiln.ir.printer import print_graph
    from kiln.ir.verifier import verify

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    graph = from_export(_DataDependent(), (x,))
    verify(graph)
    text = print_graph(graph)
    assert "i64[u0, 2]" in text and "aten._assert_scalar" in text
    again = parse_graph(text, graph.weights)
    verify(again)
    assert print_graph(again) == text
    cm = kiln.compile(_DataDependent(), (x,), verify=True)
    for got, want in zip(cm(x), _DataDependent()(x)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
