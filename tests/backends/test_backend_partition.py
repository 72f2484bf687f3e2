"""The partitioner (convex, maximal regions; outlining keeps semantics), compile_graph's fallback report,
and an unsupported custom op in a model compiled through kiln.compile and torch.compile(backend="kiln")."""

from __future__ import annotations

import logging

import networkx as nx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kiln
import kiln.backends.base as backends_base
from kiln.backends.base import Backend, get_backend
from kiln.backends.driver import compile_graph
from kiln.backends.partition import node_dag, outline, partition
from kiln.errors import KilnInputError, UnsupportedError
from kiln.ir.builder import Builder
from kiln.ir.clone import clone_graph
from kiln.ir.graph import Graph, Node
from kiln.ir.ops import PARTITION, WEIGHT, aten
from kiln.ir.printer import print_graph
from kiln.ir.to_fx import to_fx
from kiln.ir.types import TensorType
from kiln.ir.verifier import verify
from kiln.numerics import assert_match

F32 = torch.float32


def marked(node: Node) -> bool:
    """The test predicate: a node is supported unless the test marked it."""
    return node.meta.get("supported", True)


def unsupported(v) -> None:
    v.producer.meta["supported"] = False


def run(g: Graph, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(to_fx(g)(*inputs))


def assert_convex(g: Graph, regions: list[list[Node]]) -> None:
    """No path leaves a region and comes back."""
    dag = node_dag(g)
    for region in regions:
        members = set(region)
        below = set().union(*(nx.descendants(dag, n) for n in region)) - members
        above = set().union(*(nx.ancestors(dag, n) for n in region)) - members
        assert not (below & above), f"path leaves and re-enters a region through {below & above}"


def assert_partition_ok(g: Graph, regions: list[list[Node]], supports) -> None:
    seen: dict[Node, int] = {}
    for i, region in enumerate(regions):
        assert region, "empty region"
        for n in region:
            assert n not in seen, f"{n} is in two regions"
            seen[n] = i
            assert n.op is not WEIGHT and supports(n)
        order = [g.index_of(n) for n in region]
        assert order == sorted(order), "a region lists its nodes in program order"
    for n in g.nodes:
        if n.op is not WEIGHT and supports(n):
            assert n in seen, f"supported {n} is in no region"
    assert_convex(g, regions)


def check_outline(g: Graph, supports, inputs: tuple, target: str = "test") -> list[Node]:
    expected = run(g, inputs)
    regions = partition(g, supports)
    assert_partition_ok(g, regions, supports)
    outlined = clone_graph(g)
    regions_copy = partition(outlined, supports)
    parts = outline(outlined, regions_copy, target)
    verify(outlined)
    assert len(parts) == len(regions)
    for p in parts:
        assert p.op is PARTITION and p.attrs == {"target": target} and p.subgraph is not None
        verify(p.subgraph)
    for n in outlined.nodes:  # what is left outside the partitions is what is unsupported (and weights)
        assert n.op in (PARTITION, WEIGHT) or not supports(n)
    assert_match(run(outlined, inputs), expected, "outlined graph")
    text = print_graph(outlined)
    from kiln.ir.parser import parse_graph

    weights = dict(outlined.weights)
    for p in parts:
        weights.update(p.subgraph.weights)
    assert print_graph(parse_graph(text, weights=weights)) == text
    return parts


# -- hand-made graphs -------------------------------------------------------------------------------------

def test_chain_splits_around_unsupported_node():
    g = Graph("chain")
    x = g.add_input(TensorType((4,), F32), "x")
    b = Builder(g)
    a = b.call(aten.neg, x)
    c = b.call(aten.relu, a)
    u = b.call(aten.sigmoid, c)
    unsupported(u)
    d = b.call(aten.add.Tensor, u, a)
    e = b.call(aten.neg, d)
    g.set_outputs([e])
    regions = partition(g, marked)
    assert [[n.op.name for n in r] for r in regions] == [["aten.neg", "aten.relu"], ["aten.add.Tensor", "aten.neg"]]
    parts = check_outline(g, marked, (torch.randn(4),))
    assert [len(p.subgraph.nodes) for p in parts] == [2, 2]
    # the first partition exports two values: %relu's result for the sigmoid and %neg's for the add
    assert len(parts[0].results) == 2


def test_parallel_branch_joins_the_earliest_region():
    g = Graph("diamond")
    x = g.add_input(TensorType((4,), F32), "x")
    b = Builder(g)
    a = b.call(aten.neg, x, name="a")
    u = b.call(aten.sigmoid, a, name="u")
    unsupported(u)
    d = b.call(aten.relu, x, name="d")  # independent of u: stays with a
    c = b.call(aten.add.Tensor, u, d, name="c")
    g.set_outputs([c])
    regions = partition(g, marked)
    assert [[n.results[0].name for n in r] for r in regions] == [["a", "d"], ["c"]]
    check_outline(g, marked, (torch.randn(4),))


def test_all_supported_is_one_region_and_none_supported_is_none():
    g = Graph("all")
    x = g.add_input(TensorType((4,), F32), "x")
    b = Builder(g)
    g.set_outputs([b.call(aten.add.Tensor, b.call(aten.neg, x), b.call(aten.relu, x))])
    assert len(partition(g, marked)) == 1
    assert partition(g, lambda n: False) == []
    (part,) = check_outline(g, marked, (torch.randn(4),))
    assert len(part.subgraph.nodes) == 3


def test_convexity_check_detects_a_path_through_the_outside():
    g = Graph("nonconvex")
    x = g.add_input(TensorType((4,), F32), "x")
    b = Builder(g)
    a = b.call(aten.neg, x)
    u = b.call(aten.sigmoid, a)
    c = b.call(aten.add.Tensor, u, a)
    g.set_outputs([c])
    with pytest.raises(AssertionError, match="re-enters"):
        assert_convex(g, [[a.producer, c.producer]])
    unsupported(u)
    assert [len(r) for r in partition(g, marked)] == [1, 1]


def test_weights_travel_with_the_regions_that_read_them():
    torch.manual_seed(0)
    w = torch.randn(4)
    g = Graph("weights")
    x = g.add_input(TensorType((4,), F32), "x")
    b = Builder(g)
    wv = b.weight("w", w)
    a = b.call(aten.mul.Tensor, x, wv)
    u = b.call(aten.sigmoid, a)
    unsupported(u)
    c = b.call(aten.add.Tensor, u, wv)
    g.set_outputs([c])
    regions = partition(g, marked)
    assert all(n.op is not WEIGHT for r in regions for n in r)
    parts = check_outline(g, marked, (torch.randn(4),))
    for p in parts:  # both regions read w: each carries its own weight node
        assert p.subgraph.weights == {"w": w}
        assert len(p.subgraph.find(WEIGHT)) == 1


def test_graph_outputs_inside_regions_escape():
    g = Graph("outs")
    x = g.add_input(TensorType((4,), F32), "x")
    b = Builder(g)
    a = b.call(aten.neg, x)
    r = b.call(aten.relu, a)
    g.set_outputs([a, r, x, a])
    (part,) = check_outline(g, marked, (torch.randn(4),))
    assert len(part.results) == 2


def test_multi_result_nodes_in_regions():
    g = Graph("multi")
    x = g.add_input(TensorType((3, 5), F32), "x")
    b = Builder(g)
    values, indices = b.call(aten.max.dim, x, 1)
    u = b.call(aten.sigmoid, values)
    unsupported(u)
    g.set_outputs([b.call(aten.add.Tensor, u, 1.0), indices])
    check_outline(g, marked, (torch.randn(3, 5),))


# -- random DAGs --------------------------------------------------------------------------------------------

OPS = ["add", "neg", "relu"]


@st.composite
def random_dags(draw):
    g = Graph("dag")
    vals = [g.add_input(TensorType((3,), F32), f"in{i}") for i in range(draw(st.integers(1, 3)))]
    b = Builder(g)
    n_nodes = draw(st.integers(1, 14))
    for _ in range(n_nodes):
        kind = draw(st.sampled_from(OPS))
        a = draw(st.sampled_from(vals))
        if kind == "add":
            v = b.call(aten.add.Tensor, a, draw(st.sampled_from(vals)))
        else:
            v = b.call(aten.neg if kind == "neg" else aten.relu, a)
        v.producer.meta["supported"] = draw(st.booleans())
        vals.append(v)
    computed = vals[-n_nodes:]
    outs = draw(st.lists(st.sampled_from(computed), min_size=1, max_size=4))
    g.set_outputs(outs)
    return g


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_dags())
def test_random_dags_partition_into_convex_regions(g):
    gen = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(3, generator=gen) for _ in g.inputs)
    check_outline(g, marked, inputs)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_dags())
def test_random_dags_regions_are_as_large_as_convexity_allows(g):
    """Regions are ordered along every edge, and a supported node whose producers are all supported joins
    the latest of their regions: only an unsupported node in between starts a new region."""
    regions = partition(g, marked)
    where = {n: i for i, r in enumerate(regions) for n in r}
    for n in g.nodes:
        producers = [v.producer for v in n.inputs if v.producer is not None]
        if not marked(n):
            continue
        for p in producers:
            if marked(p):
                assert where[p] <= where[n]
        if producers and all(marked(p) for p in producers):
            assert where[n] == max(where[p] for p in producers)
        if not producers:
            assert where[n] == 0


# -- compile_graph and its report ---------------------------------------------------------------------------

class NoRelu(Backend):
    """A backend that compiles everything except relu (through the reference path)."""

    compiled: list[Graph] = []

    def supports(self, node: Node) -> bool:
        return not node.is_a(aten.relu)

    def compile(self, graph: Graph, options):
        NoRelu.compiled.append(graph)
        gm = to_fx(graph)
        return lambda *args: gm(*args)


@pytest.fixture
def norelu(monkeypatch):
    NoRelu.compiled = []
    get_backend("reference")  # load the built-in backends first
    monkeypatch.setitem(backends_base._BACKENDS, "kilntest-norelu", NoRelu)
    return "kilntest-norelu"


def relu_sandwich() -> Graph:
    torch.manual_seed(0)
    g = Graph("sandwich")
    x = g.add_input(TensorType((2, 4), F32), "x")
    b = Builder(g)
    h = b.call(aten.mm, x, b.weight("w", torch.randn(4, 4)))
    h = b.call(aten.relu, h)
    h = b.call(aten.add.Tensor, h, 1.0)
    h = b.call(aten.relu, h)
    g.set_outputs([b.call(aten.neg, h)])
    return g


def test_compile_graph_report_counts(norelu, caplog):
    g = relu_sandwich()
    text = print_graph(g)
    xin = torch.randn(2, 4)
    with caplog.at_level(logging.WARNING, logger="kiln"):
        compiled = compile_graph(g, norelu)
    assert print_graph(g) == text, "compile_graph must not modify its input"
    r = compiled.report
    assert (r.graph, r.target, r.nodes, r.compiled_nodes, r.partitions) == ("sandwich", norelu, 5, 3, 3)
    assert r.fallback_ops == {"aten.relu": 2} and r.fell_back and r.reason is None
    assert r.to_dict() == {"graph": "sandwich", "target": norelu, "nodes": 5, "compiled_nodes": 3,
                           "partitions": 3, "fallback_ops": {"aten.relu": 2}, "reason": None}
    assert len(NoRelu.compiled) == 3
    assert_match(list(compiled(xin)), run(g, (xin,)))
    (record,) = [rec for rec in caplog.records if rec.name == "kiln"]
    assert record.levelno == logging.WARNING
    assert "2 of 5 node(s) of graph 'sandwich' fell back to eager" in record.getMessage()
    assert "aten.relu x2" in record.getMessage()
    verify(compiled.graph)
    assert len(compiled.graph.find(PARTITION)) == 3


def test_compile_graph_reference_compiles_everything(caplog):
    g = relu_sandwich()
    xin = torch.randn(2, 4)
    with caplog.at_level(logging.WARNING, logger="kiln"):
        compiled = compile_graph(g, "reference")
    r = compiled.report
    assert (r.nodes, r.compiled_nodes, r.partitions, r.fallback_ops) == (5, 5, 1, {})
    assert not r.fell_back
    assert not [rec for rec in caplog.records if rec.name == "kiln"]
    assert_match(list(compiled(xin)), run(g, (xin,)))


def test_unknown_and_planned_targets():
    with pytest.raises(KilnInputError, match="known targets: .*reference"):
        compile_graph(relu_sandwich(), "no-such-target")
    with pytest.raises(UnsupportedError, match="not implemented yet"):
        compile_graph(relu_sandwich(), "fpga")


# -- an unsupported custom op end to end -------------------------------------------------------------------

@torch.library.custom_op("kilntest::mysin", mutates_args=())
def mysin(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x)


@mysin.register_fake
def _mysin_fake(x):
    return torch.empty_like(x)


def _mysin_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _mysin_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * torch.cos(x)


mysin.register_autograd(_mysin_backward, setup_context=_mysin_setup)


class WithCustomOp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(mysin(self.fc1(x)).relu())


@pytest.fixture
def model_and_input():
    torch.manual_seed(0)
    return WithCustomOp().eval(), torch.randn(5, 4)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    kiln.reset_reports()
    yield
    torch._dynamo.reset()
    kiln.reset_reports()


def test_custom_op_via_kiln_compile(model_and_input, caplog):
    model, xin = model_and_input
    with caplog.at_level(logging.WARNING, logger="kiln"):
        cm = kiln.compile(model, (xin,))
    assert [n.op.name for n in cm.graph.find(kiln.ir.ops.get_op("kilntest.mysin"))] == ["kilntest.mysin"]
    report = cm.report.to_dict()
    assert report["fallback_ops"] == {"kilntest.mysin": 1}
    assert report["partitions"] == 2 and report["compiled_nodes"] == report["nodes"] - 1
    messages = [rec.getMessage() for rec in caplog.records if rec.name == "kiln"]
    assert len(messages) == 1 and "kilntest.mysin x1" in messages[0]
    with torch.no_grad():
        expected = model(xin)
        assert_match(cm(xin), expected)
        other = torch.randn(5, 4)
        assert_match(cm(other), model(other))


def test_custom_op_via_torch_compile_inference(model_and_input, fresh_dynamo, caplog):
    model, xin = model_and_input
    compiled = torch.compile(model, backend="kiln")
    with caplog.at_level(logging.WARNING, logger="kiln"), torch.no_grad():
        out = compiled(xin)
        expected = model(xin)
    assert_match(out, expected)
    reports = kiln.fallback_reports()
    assert reports, "torch.compile did not go through kiln"
    assert any(r["fallback_ops"].get("kilntest.mysin") == 1 and r["reason"] is None for r in reports), reports
    assert any("kilntest.mysin" in rec.getMessage() and rec.levelno == logging.WARNING
               for rec in caplog.records if rec.name == "kiln")


def test_custom_op_via_torch_compile_training(model_and_input, fresh_dynamo):
    model, xin = model_and_input
    model.train()
    compiled = torch.compile(model, backend="kiln")
    out = compiled(xin)
    out.square().sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    expected = model(xin)
    expected.square().sum().backward()
    assert_match(out.detach(), expected.detach())
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-5, msg=k)
    reports = kiln.fallback_reports()
    forward = [r for r in reports if r["fallback_ops"].get("kilntest.mysin")]
    assert forward and all(r["reason"] is None for r in reports), reports
