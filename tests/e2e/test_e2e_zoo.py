"""Every zoo model end to end: export -> kiln IR -> print -> parse -> print (identical), verifier,
IR -> fx -> run == eager, O1 pipeline keeps numerics, and torch.compile(backend="kiln") == eager for
inference and for one training step (loss and every gradient).

Tolerances: float32 rtol 1e-4 / atol 1e-5 (kiln.numerics.TOLERANCES). Gradients use atol widened to
rtol x the model's largest gradient element (kiln.numerics docstring explains why: eager float32 itself
is that far from float64 on these randomly initialised nets).
"""

from __future__ import annotations

import copy

import pytest
import torch

import kiln
from examples.models import REGISTRY
from kiln.frontend.export import from_export
from kiln.ir.parser import parse_graph
from kiln.ir.printer import print_graph
from kiln.ir.to_fx import to_fx
from kiln.ir.verifier import verify
from kiln.numerics import assert_match
from kiln.passes.manager import NumericsInstrument, PassManager, VerifyInstrument

MODELS = sorted(REGISTRY)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    kiln.reset_reports()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", MODELS)
def test_export_roundtrip_verify_and_run(name):
    model, inputs = REGISTRY[name]()
    graph = from_export(model, inputs)
    verify(graph)
    text = print_graph(graph)
    reparsed = parse_graph(text, graph.weights)
    assert print_graph(reparsed) == text
    verify(reparsed)
    with torch.no_grad():
        expected = model(*inputs)
    assert_match(to_fx(reparsed)(*inputs)[0], expected, f"{name} IR->fx")
    # the O1 pipeline, verified and numerically checked after every pass
    PassManager.from_pipeline("O1", [VerifyInstrument(), NumericsInstrument(inputs)]).run(reparsed)
    assert_match(to_fx(reparsed)(*inputs)[0], expected, f"{name} after O1")


@pytest.mark.parametrize("name", MODELS)
def test_torch_compile_inference(name):
    model, inputs = REGISTRY[name]()
    compiled = torch.compile(model, backend="kiln")
    with torch.no_grad():
        assert_match(compiled(*inputs), model(*inputs), f"{name} torch.compile")
    reports = kiln.fallback_reports()
    assert reports and all(not r["fallback_ops"] and r["reason"] is None for r in reports), reports


def _loss(out) -> torch.Tensor:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return sum(o.float().pow(2).mean() for o in outs)


@pytest.mark.parametrize("name", MODELS)
def test_torch_compile_training_step(name):
    model, inputs = REGISTRY[name]()
    eager = copy.deepcopy(model).train()
    compiled_model = copy.deepcopy(model).train()
    compiled = torch.compile(compiled_model, backend="kiln")

    loss_eager = _loss(eager(*inputs))
    loss_eager.backward()
    loss_kiln = _loss(compiled(*inputs))
    loss_kiln.backward()

    assert_match(loss_kiln, loss_eager, f"{name} loss")
    grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    magnitude = max(float(g.abs().max()) for g in grads.values())
    for (n, p) in compiled_model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: no gradient for {n}"
            assert_match(p.grad, grads[n], f"{name} grad {n}", magnitude=magnitude)
    for (n, b), (_, b_eager) in zip(compiled_model.named_buffers(), eager.named_buffers()):
        assert_match(b, b_eager, f"{name} buffer {n}")
    kinds = {r["graph"].rstrip("0123456789") for r in kiln.fallback_reports()}
    assert {"forward", "backward"} <= kinds, kiln.fallback_reports()
    assert all(r["reason"] is None and not r["fallback_ops"] for r in kiln.fallback_reports())
