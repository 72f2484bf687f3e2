"""Reports about a model's compilation: ``kiln explain`` (one self-contained HTML page) and ``kiln bench``.

Contract: ``explain(graph, inputs, ...) -> ExplainData`` collects (``kiln.report.explain``),
``render_html(data) -> str`` renders (``kiln.report.html``). Drawing is kiln's own inline SVG
(``svg``, ``graph_svg``, ``memory``, ``roofline``): no graphviz, no plotting library, no network.
``kiln.report.bench`` holds the eager / Inductor / kiln benchmark shared by ``kiln bench`` and
``benchmarks/e2e.py``.
"""

from kiln.report.explain import ExplainData, explain
from kiln.report.html import render_html

__all__ = ["ExplainData", "explain", "render_html"]
