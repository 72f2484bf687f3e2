"""Shared checks for the fusion tests: run ``fuse`` and prove the result is still the same program."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import kiln.passes.fusion  # noqa: F401  (registers "fuse"; kiln.passes.builtin imports it too)
from kiln.ir.clone import clone_graph
from kiln.ir.graph import Graph
from kiln.ir.ops import FUSED, WEIGHT
from kiln.ir.parser import parse_graph
from kiln.ir.printer import print_graph
from kiln.ir.to_fx import to_fx
from kiln.ir.types import TensorType
from kiln.ir.verifier import verify
from kiln.numerics import assert_match
from kiln.passes.analysis import is_kernel
from kiln.passes.base import PassContext, PassResult, get_pass


@dataclass(frozen=True)
class Fused:
    """A ``kiln.fused`` node after the pass: its attrs, and the names of the kernels inside it."""

    attrs: dict
    kernels: frozenset[str]
    ops: tuple[str, ...]

    @property
    def kind(self) -> str:
        return self.attrs["kind"]


def example_inputs(graph: Graph, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for v in graph.inputs:
        t = v.type
        assert isinstance(t, TensorType)
        if t.dtype.is_floating_point:
            out.append(torch.randn(*t.shape, generator=gen, dtype=t.dtype))
        else:
            out.append(torch.randint(0, 4, tuple(t.shape), generator=gen, dtype=t.dtype))
    return tuple(out)


def fused_nodes(graph: Graph) -> list[Fused]:
    out = []
    for node in graph.nodes:
        if node.op is FUSED and node.subgraph is not None:
            inner = [n for n in node.subgraph.nodes if is_kernel(n)]
            out.append(Fused(dict(node.attrs), frozenset(n.results[0].name for n in inner),
                             tuple(n.op.name for n in inner)))
    return out


def run_fuse(graph: Graph, inputs: tuple | None = None, **options) -> tuple[list[Fused], PassResult]:
    """Fuse in place; check verifier, print->parse->print and numerics against the unfused graph."""
    before = clone_graph(graph)
    result = get_pass("fuse", **options).run(graph, PassContext())
    verify(graph)
    text = print_graph(graph)
    reparsed = parse_graph(text, graph.weights)
    assert print_graph(reparsed) == text
    verify(reparsed)
    inputs = example_inputs(graph) if inputs is None else inputs
    with torch.no_grad():
        assert_match(list(to_fx(graph)(*inputs)), list(to_fx(before)(*inputs)), "after fuse")
        assert_match(list(to_fx(reparsed)(*inputs)), list(to_fx(before)(*inputs)), "after fuse, reparsed")
    assert result.changed == (result.stats["groups"] > 0)
    assert not any(n.op is WEIGHT and not n.output.uses for n in graph.nodes)
    return fused_nodes(graph), result


@pytest.fixture
def fuse():
    return run_fuse
