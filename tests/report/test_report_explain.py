"""``kiln.report``: what ``kiln explain`` collects (passes, fused groups of any kind, memory timeline,
roofline) and how it renders (self-contained HTML, escaped text, drawable SVG layouts)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch

from kiln.frontend.export import from_export
from kiln.ir.ops import FUSED, WEIGHT, aten
from kiln.ir.outline import outline_region
from kiln.passes.analysis import is_kernel, node_cost
from kiln.passes.base import Pass, PassResult, register_pass
from kiln.passes.manager import parse_pipeline
from kiln.report import explain, render_html
from kiln.report.graph_svg import BOX_H, BOX_W, graph_svg, layout
from kiln.report.memory import live_bytes
from kiln.report.roofline import REFERENCE_PEAKS
from kiln.report.svg import esc, nice_ticks
from kiln.scheduler.buffers import Buffer
from kiln.scheduler.liveness import compute_nodes, peak_memory


@register_pass("test-report-fuse-relu-add")
@dataclass(frozen=True)
class FuseReluAdd(Pass):
    """Outlines every relu whose only user is an add into a kiln.fused group of a made-up kind."""

    def run(self, graph, ctx):
        n = 0
        for relu in graph.find(aten.relu):
            users = relu.output.users
            if len(users) == 1 and users[0].is_a(aten.add):
                outline_region(graph, [relu, users[0]], FUSED, {"kind": "test-kind"}, f"g{n}")
                n += 1
        return PassResult(changed=n > 0, stats={"groups": n})


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(torch.relu(self.lin(x)) + x).sum(-1)


PIPELINE = "O1,test-report-fuse-relu-add"


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Net().eval(), (torch.randn(4, 16),)


@pytest.fixture(scope="module")
def data(net):
    model, inputs = net
    return explain(from_export(model, inputs), inputs, pipeline=PIPELINE, measure=False, title="<b>net</b>")


def test_records_every_pass_in_order(data):
    assert [r.name for r in data.records] == parse_pipeline(PIPELINE)
    (rec,) = [r for r in data.records if r.name == "test-report-fuse-relu-add"]
    assert rec.changed and rec.stats == {"groups": 1} and rec.nodes_after == rec.nodes_before - 1
    assert data.numerics is None  # the compiled graph still matches the pre-pipeline reference


def test_fused_groups_are_listed_generically(data):
    (g,) = data.fused_groups
    assert g.kind == "test-kind" and g.members == ["aten.relu", "aten.add.Tensor"] and g.depth == 0
    assert g.outputs == ["f32[4, 16]"]
    assert "test-kind" in render_html(data)


def test_memory_timeline_matches_the_scheduler(data):
    m = data.memory
    assert m.steps == compute_nodes(data.after)
    assert m.peak == peak_memory(data.after, m.steps) == m.plan.lower_bound
    assert m.plan.size >= m.peak and m.plan.method == "best-fit"
    assert len(m.live) == len(m.steps)


def test_roofline_rows_one_per_kernel(data):
    kernels = [n for n in data.after.nodes if is_kernel(n)]
    assert [r.node for r in data.kernels] == kernels
    fused = next(r for r in data.kernels if r.node.op is FUSED)
    members = [n for n in fused.node.subgraph.nodes if n.op is not WEIGHT]
    assert fused.flops == sum(node_cost(n).flops for n in members) and fused.op == "kiln.fused:test-kind"
    for r in data.kernels:
        expect = max(r.flops / REFERENCE_PEAKS.flops_per_s, r.bytes / REFERENCE_PEAKS.bytes_per_s)
        assert r.roofline_s == pytest.approx(expect) and r.measured_s is None
        assert r.bound == ("compute" if r.flops / REFERENCE_PEAKS.flops_per_s >= r.bytes / REFERENCE_PEAKS.bytes_per_s
                           else "memory")
    assert data.peaks is REFERENCE_PEAKS


def test_html_is_self_contained_escaped_and_complete(data):
    html = render_html(data)
    ids = re.findall(r'<section id="([a-z]+)"', html)
    assert ids == ["summary", "passes", "graphs", "fusion", "memory", "roofline", "fallbacks", "quant"]
    assert "&lt;b&gt;net&lt;/b&gt;" in html and "<b>net</b>" not in html
    urls = set(re.findall(r"https?://[^\s\"'<>]+", html))
    assert urls == {"http://www.w3.org/2000/svg"}  # the SVG namespace name, never fetched
    assert not re.search(r"\bsrc=|@import|<link(?! rel=\"icon\" href=\"data:,\")", html)
    for r in data.records:
        assert f"<td>{r.name}</td>" in html
    assert "constants, not measured in this run" in html
    assert "quantization: not run (add the <code>quantize</code> pass" in html
    assert html.count("<svg") == 4  # before, after, memory, roofline


def test_measured_run_times_every_kernel(net):
    model, inputs = net
    data = explain(from_export(model, inputs), inputs, pipeline="O1", measure=True)
    assert data.peaks.source.startswith("measured in this run")
    assert data.peaks.flops_per_s > 0 and data.peaks.bytes_per_s > 0
    assert data.kernels and all(r.measured_s is not None and r.measured_s > 0 for r in data.kernels)
    assert "kernel-times" not in data.notes


def test_symbolic_shapes_leave_a_note_instead_of_failing(net):
    model, inputs = net
    x = torch.randn(5, 16)
    graph = from_export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    data = explain(graph, (x,), pipeline="O1", measure=False)
    assert data.memory is None and "symbolic" in data.notes["memory"]
    assert "symbolic" in data.notes["roofline"]
    html = render_html(data)
    assert html.count("not available:") == 2 and 'id="notes"' in html


def test_graph_layout_is_layered_and_drawn_without_overlap(data):
    for g in (data.before, data.after):
        lay = layout(g)
        layer_of = {k: i for i, layer in enumerate(lay.layers) for k in layer}
        assert all(layer_of[u] < layer_of[v] for u, v in lay.dag.edges)  # every edge points down
        drawn = [k for k in lay.positions if not isinstance(k, (tuple, str))]
        assert sorted(map(id, drawn)) == sorted(id(n) for n in g.nodes if n.op is not WEIGHT)
        for layer in lay.layers:
            xs = sorted(lay.positions[k][0] for k in layer)
            assert all(b - a >= BOX_W for a, b in zip(xs, xs[1:]))
        assert all(0 <= x <= lay.width - BOX_W and 0 <= y <= lay.height - BOX_H for x, y in lay.positions.values())
        svg = graph_svg(g)
        assert svg.count('class="node ') == len(drawn) and svg.count('class="edge"') == lay.dag.number_of_edges()
    assert "kiln.fused" in graph_svg(data.after) and "test-kind" in graph_svg(data.after)
    assert 'class="note"' in graph_svg(data.after, max_nodes=3)


def test_live_bytes_and_helpers():
    bufs = [Buffer("a", 10, 0, 1), Buffer("b", 5, 1, 3), Buffer("c", 0, 2, 2), Buffer("d", 7, 3, 3)]
    assert live_bytes(bufs, 4) == [10, 15, 5, 12]
    assert nice_ticks(0, 1000, 4) == [0, 250, 500, 750, 1000]
    assert esc('<a href="x">&') == "&lt;a href=&quot;x&quot;&gt;&amp;"
