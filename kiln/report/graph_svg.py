"""Draw a kiln graph as inline SVG: layered top to bottom by topological generation (networkx).

Contract: ``graph_svg(graph, label="") -> str`` (one ``<svg>`` element) or, for a graph with more than
``max_nodes`` drawable nodes, a ``<p class="note">`` saying so. Drawn: graph inputs, every node except
``kiln.weight`` (a node reading weights says ``+k w``), and one output sink. Layer = topological
generation (``nx.topological_generations``: longest path from an input); order within a layer by
barycenter sweeps (a few passes of the standard crossing-reduction heuristic), starting from program
order. Boxes are coloured by category (``category(node)``): ``gemm``/``conv`` heavy kernels, ``reduce``
(norms, reductions, softmax), ``view`` (no kernel), ``pointwise``, ``fused`` (coloured by its ``kind``
attr), ``partition``. Hovering a box shows its IR statement (a fused group: its kind and members);
hovering an edge shows the value's name and type; edge width grows with the tensor's bytes.
``layout(graph)`` returns the positions without drawing (tests check them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.ops import FUSED, PARTITION, WEIGHT
from kiln.ir.printer import format_node, format_type
from kiln.ir.types import TensorType
from kiln.passes.analysis import VIEW_OPS
from kiln.report.svg import Svg, color_for, esc

BOX_W, BOX_H, GAP_X, ROW_H, MARGIN = 150, 34, 14, 58, 12

GEMM_OPS = frozenset({"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.matmul", "aten.linear",
                      "aten.convolution", "aten.convolution_backward",
                      "aten._scaled_dot_product_flash_attention_for_cpu",
                      "aten._scaled_dot_product_efficient_attention", "aten._scaled_dot_product_flash_attention"})
REDUCE_PREFIXES = ("aten.sum", "aten.mean", "aten.amax", "aten.amin", "aten.max", "aten.min", "aten.var",
                   "aten.native_layer_norm", "aten._native_batch_norm", "aten.native_batch_norm",
                   "aten._softmax", "aten._log_softmax", "aten.softmax", "aten.cumsum", "aten.argmax",
                   "aten.prod", "aten.native_group_norm", "aten.any", "aten.all")
COLORS = {"gemm": "#f3a6a0", "reduce": "#a8dca8", "view": "#e6e6e6", "pointwise": "#aac9f2",
          "partition": "#ffe08a", "io": "#ffffff", "other": "#d9c7f0"}


def category(node: Node) -> str:
    if node.op is FUSED:
        return "fused"
    if node.op is PARTITION:
        return "partition"
    name = node.op.name
    if name in GEMM_OPS:
        return "gemm"
    if name in VIEW_OPS or node.op.namespace == "sym":
        return "view"
    if name.startswith(REDUCE_PREFIXES):
        return "reduce"
    if node.op.is_torch_op:
        return "pointwise"
    return "other"


def _label(node: Node) -> str:
    if node.subgraph is not None:
        tag = node.attrs.get("kind") or node.attrs.get("target") or "?"
        return f"{node.op.name.split('.', 1)[1]}:{tag}"
    name = node.op.name
    return name.split(".", 1)[1] if name.startswith("aten.") else name


def _short_type(node: Node) -> str:
    types = [format_type(r.type) for r in node.results]
    text = types[0] if len(types) == 1 else f"{len(types)} results"
    return text.split(" #{")[0]


def _fit(text: str, chars: int = 24) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"


@dataclass
class Layout:
    positions: dict[object, tuple[float, float]]  # key -> (x, y) top-left of its box
    layers: list[list[object]]
    width: float
    height: float
    dag: nx.DiGraph


def _dag(graph: Graph) -> tuple[nx.DiGraph, dict[Value, object]]:
    """Drawable keys: ("in", i) for inputs, nodes, "out"; edges carry the value they move."""
    dag = nx.DiGraph()
    key_of: dict[Value, object] = {}
    for i, v in enumerate(graph.inputs):
        dag.add_node(("in", i))
        key_of[v] = ("in", i)
    for node in graph.nodes:
        if node.op is WEIGHT:
            continue
        dag.add_node(node)
        for r in node.results:
            key_of[r] = node
        for v in node.inputs:
            src = key_of.get(v)
            if src is not None:
                dag.add_edge(src, node, value=v)
    dag.add_node("out")
    for v in graph.outputs:
        src = key_of.get(v)
        if src is not None:
            dag.add_edge(src, "out", value=v)
    return dag, key_of


def layout(graph: Graph, sweeps: int = 4) -> Layout:
    dag, _ = _dag(graph)
    program = {k: i for i, k in enumerate(dag.nodes)}
    layers = [sorted(gen, key=program.__getitem__) for gen in nx.topological_generations(dag)]
    index = {k: i for layer in layers for i, k in enumerate(layer)}

    def centred(k) -> float:
        return index[k] - (len(layers[layer_of[k]]) - 1) / 2

    layer_of = {k: li for li, layer in enumerate(layers) for k in layer}
    for sweep in range(sweeps):
        down = sweep % 2 == 0
        order = range(1, len(layers)) if down else range(len(layers) - 2, -1, -1)
        for li in order:
            def bary(k, down=down):
                nbrs = list(dag.predecessors(k) if down else dag.successors(k))
                return sum(centred(n) for n in nbrs) / len(nbrs) if nbrs else centred(k)
            layers[li] = sorted(layers[li], key=lambda k: (bary(k), index[k]))
            index.update({k: i for i, k in enumerate(layers[li])})
    widest = max((len(layer) for layer in layers), default=1)
    inner = widest * (BOX_W + GAP_X) - GAP_X
    positions = {}
    for li, layer in enumerate(layers):
        x0 = MARGIN + (inner - (len(layer) * (BOX_W + GAP_X) - GAP_X)) / 2
        for i, k in enumerate(layer):
            positions[k] = (x0 + i * (BOX_W + GAP_X), MARGIN + li * ROW_H)
    return Layout(positions, layers, inner + 2 * MARGIN, len(layers) * ROW_H - (ROW_H - BOX_H) + 2 * MARGIN, dag)


def _edge_width(v: Value) -> float:
    t = v.type
    if not isinstance(t, TensorType):
        return 0.8
    n = t.nbytes()
    if not isinstance(n, int) or n <= 0:
        return 1.2
    return min(0.8 + math.log10(n) / 2.0, 4.5)


def _tooltip(node: Node) -> str:
    if node.subgraph is not None:
        members = [n.op.name for n in node.subgraph.nodes if n.op is not WEIGHT]
        head = f"{node.op.name} {node.attrs}"
        return f"{head}\n{len(members)} ops: " + ", ".join(members)
    text = format_node(node, indent="").splitlines()[0]
    return text if len(text) <= 400 else text[:399] + "…"


def graph_svg(graph: Graph, label: str = "", max_nodes: int = 2500) -> str:
    drawn = len(graph.inputs) + sum(1 for n in graph.nodes if n.op is not WEIGHT) + 1
    if drawn > max_nodes:
        return (f'<p class="note">graph @{esc(graph.name)} has {drawn} nodes to draw, more than '
                f'{max_nodes}: not drawn (see the IR text below).</p>')
    lay = layout(graph)
    svg = Svg(lay.width, lay.height, label=label or f"graph @{graph.name}", cls="graph")
    pos = lay.positions
    for src, dst, data in lay.dag.edges(data=True):
        (x1, y1), (x2, y2) = pos[src], pos[dst]
        x1, y1, x2 = x1 + BOX_W / 2, y1 + BOX_H, x2 + BOX_W / 2
        dy = max((y2 - y1) / 2, 10)
        v = data["value"]
        svg.path(f"M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + dy:.1f} {x2:.1f},{y2 - dy:.1f} {x2:.1f},{y2:.1f}",
                 stroke="#8a8f98", width=_edge_width(v), title=f"%{v.name}: {format_type(v.type)}", cls="edge",
                 stroke_opacity="0.75")
    for key, (x, y) in pos.items():
        if key == "out":
            outs = ", ".join(f"%{v.name}" for v in graph.outputs)
            svg.rect(x, y, BOX_W, BOX_H, fill=COLORS["io"], stroke="#333", rx=17, title=f"return {outs}", cls="io")
            svg.text(x + BOX_W / 2, y + 21, "output", anchor="middle", weight="bold")
            continue
        if isinstance(key, tuple):
            v = graph.inputs[key[1]]
            svg.rect(x, y, BOX_W, BOX_H, fill=COLORS["io"], stroke="#333", rx=17,
                     title=f"input %{v.name}: {format_type(v.type)}", cls="io")
            svg.text(x + BOX_W / 2, y + 14, _fit(f"%{v.name}"), anchor="middle", weight="bold")
            svg.text(x + BOX_W / 2, y + 27, _fit(format_type(v.type).split(" #{")[0], 28), anchor="middle", size=9)
            continue
        node: Node = key
        cat = category(node)
        fill = color_for(str(node.attrs.get("kind", "fused"))) if cat == "fused" else COLORS[cat]
        stroke, width = ("#5b2a86", "2.5") if cat == "fused" else ("#555", "1")
        weights = sum(1 for v in dict.fromkeys(node.inputs) if v.producer is not None and v.producer.op is WEIGHT)
        svg.rect(x, y, BOX_W, BOX_H, fill=fill, stroke=stroke, rx=4, title=_tooltip(node), cls=f"node {cat}",
                 stroke_width=width)
        svg.text(x + BOX_W / 2, y + 14, _fit(_label(node) + (f" +{weights}w" if weights else "")),
                 anchor="middle", weight="bold")
        svg.text(x + BOX_W / 2, y + 27, _fit(_short_type(node), 28), anchor="middle", size=9)
    return str(svg)


def legend_html() -> str:
    items = [("gemm", "GEMM / conv / attention"), ("reduce", "norm / reduction"), ("pointwise", "pointwise"),
             ("view", "view (no kernel)"), ("partition", "backend partition"), ("other", "other")]
    spans = "".join(f'<span class="key"><i style="background:{COLORS[c]}"></i>{esc(t)}</span>' for c, t in items)
    return spans + '<span class="key"><i class="fusedkey"></i>kiln.fused group (colour by kind)</span>'
