"""Every zoo model (size "small") after ``O1,fuse``: verified after each pass, numerics checked after each
pass against the unfused graph, print -> parse -> print stable, output equal to eager PyTorch, and fewer
kernels and less intermediate traffic than before fusion. Two models stay in the fast suite (an MLP with
epilogues and layer norms; a transformer with decomposed attention: softmax groups, bmm epilogues); the
rest are marked slow."""

from __future__ import annotations

import pytest
import torch

from examples.models import REGISTRY
from kiln.frontend.export import from_export
from kiln.ir.ops import FUSED
from kiln.ir.parser import parse_graph
from kiln.ir.printer import print_graph
from kiln.ir.to_fx import to_fx
from kiln.ir.verifier import verify
from kiln.numerics import assert_match
from kiln.passes.analysis import graph_cost
from kiln.passes.manager import NumericsInstrument, PassManager, VerifyInstrument

FAST = ("mlp", "transformer")
MODELS = [pytest.param(name, marks=() if name in FAST else pytest.mark.slow) for name in sorted(REGISTRY)]


@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_after_o1_and_fuse(name):
    model, inputs = REGISTRY[name](size="small")
    graph = from_export(model, inputs)
    PassManager.from_pipeline("O1").run(graph)
    before = graph_cost(graph)
    PassManager.from_pipeline("fuse", [VerifyInstrument(), NumericsInstrument(inputs)]).run(graph)
    after = graph_cost(graph)
    assert any(n.op is FUSED for n in graph.nodes)
    assert after.kernels < before.kernels and after.intermediate_bytes < before.intermediate_bytes
    verify(graph)
    text = print_graph(graph)
    reparsed = parse_graph(text, graph.weights)
    assert print_graph(reparsed) == text
    with torch.no_grad():
        expected = model(*inputs)
        assert_match(to_fx(graph)(*inputs)[0], expected, f"{name} after O1,fuse")
        assert_match(to_fx(reparsed)(*inputs)[0], expected, f"{name} after O1,fuse, reparsed")
