"""Render ``ExplainData`` as one self-contained HTML page: inline CSS, inline SVG, a few lines of inline JS
(click a table header to sort), no external resource of any kind (no network, no fonts, no images).

Contract: ``render_html(data) -> str``. Sections (ids in parentheses): summary (``summary``), passes
(``passes``: one row per PassRecord, in order: ms, changed, nodes before -> after, stats), graphs
(``graphs``: before and after the pipeline, SVG side by side, IR text in ``<details>``), fused groups
(``fusion``: kind, size and member ops of every ``kiln.fused`` group, any kind), memory (``memory``: live
bytes per step and the arena plan), roofline (``roofline``: the machine peaks with their source, the plot,
one row per kernel), fallbacks (``fallbacks``: partitions and ops that ran in eager), quantization and
pruning (``quant``: "not run" unless the graph carries quant/sparsity annotations) and notes (sections
that could not be computed, with the reason). Every piece of text from the model is HTML-escaped.
"""

from __future__ import annotations

import math

from kiln.ir.printer import print_graph
from kiln.options import NOT_IMPLEMENTED
from kiln.report.explain import ExplainData, summary
from kiln.report.graph_svg import graph_svg, legend_html
from kiln.report.memory import timeline_svg
from kiln.report.roofline import roofline_svg
from kiln.report.svg import esc, fmt_bytes, fmt_si

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1a202c;background:#fafafa}
header{background:#2d3748;color:#fff;padding:14px 24px}header h1{margin:0 0 4px;font-size:20px}
header p{margin:0;font-size:13px;color:#cbd5e0}nav{padding:6px 24px;background:#edf2f7;font-size:13px}
nav a{margin-right:14px;color:#2b6cb0}main{padding:0 24px 40px}section{margin-top:22px}
h2{font-size:17px;border-bottom:1px solid #cbd5e0;padding-bottom:4px}
table{border-collapse:collapse;font-size:12px;background:#fff}th,td{border:1px solid #e2e8f0;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#edf2f7;cursor:pointer;user-select:none}td.n{text-align:right;
font-variant-numeric:tabular-nums}.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#fff;
border:1px solid #e2e8f0;border-radius:6px;padding:8px 12px;min-width:120px}.card b{display:block;font-size:18px}
.card span{font-size:11px;color:#4a5568}.ok{color:#2f855a}.bad{color:#c53030}.note{color:#4a5568;font-size:13px}
.scroll{overflow:auto;max-height:820px;border:1px solid #e2e8f0;background:#fff}.side{display:flex;gap:12px}
.side>div{flex:1;min-width:0}pre{font-size:11px;background:#fff;border:1px solid #e2e8f0;padding:8px;
overflow:auto;max-height:500px}.key{display:inline-block;margin-right:12px;font-size:12px}.key i{display:inline-block;
width:12px;height:12px;margin-right:4px;border:1px solid #555;vertical-align:middle}
.key i.fusedkey{border:2.5px solid #5b2a86;background:#eee}svg .hover:hover{fill:rgba(0,0,0,.06)}
svg .node:hover,svg .buffer:hover{stroke:#000;stroke-width:2}svg.graph{display:block}
"""

JS = """
document.querySelectorAll('table.sortable th').forEach(function (th, i) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var asc = th.dataset.asc !== '1';
    th.dataset.asc = asc ? '1' : '0';
    rows.sort(function (a, b) {
      var x = a.cells[th.cellIndex], y = b.cells[th.cellIndex];
      var u = x.dataset.v !== undefined ? parseFloat(x.dataset.v) : x.textContent;
      var v = y.dataset.v !== undefined ? parseFloat(y.dataset.v) : y.textContent;
      return (u < v ? -1 : u > v ? 1 : 0) * (asc ? 1 : -1);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
document.body.dataset.ready = '1';
"""


def _num(v: float | int | None, text: str | None = None) -> str:
    if v is None:
        return '<td class="n"></td>'
    shown = text if text is not None else (f"{v:.3g}" if isinstance(v, float) else str(v))
    data = v if math.isfinite(v) else (1e300 if v > 0 else -1e300)
    return f'<td class="n" data-v="{data}">{esc(shown)}</td>'


def _table(headers: list[str], rows: list[str], cls: str = "sortable") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _card(value: str, label: str, cls: str = "") -> str:
    return f'<div class="card"><b class="{cls}">{esc(value)}</b><span>{esc(label)}</span></div>'


def _summary(d: ExplainData) -> str:
    s = summary(d)
    cards = [
        _card(f"{s['nodes_before']} → {s['nodes_after']}", "nodes before → after the pipeline"),
        _card(str(len(d.records)), "passes run"),
        _card(str(s["fused_groups"]), "kiln.fused groups"),
        _card(f"{d.report.partitions}", f"partitions ({d.report.compiled_nodes}/{d.report.nodes} nodes compiled)"),
        _card(str(sum(d.report.fallback_ops.values())) if not d.report.reason else "all",
              "nodes in eager fallback", "bad" if d.report.fell_back else "ok"),
        _card(fmt_bytes(s["peak_bytes"]) if s["peak_bytes"] is not None else "n/a", "peak live activations"),
        _card(fmt_bytes(s["arena_bytes"]) if s["arena_bytes"] is not None else "n/a", "planned arena"),
        _card("matches" if d.numerics is None else "MISMATCH", "compiled vs pre-pipeline reference",
              "ok" if d.numerics is None else "bad"),
    ]
    extra = "" if d.numerics is None else f'<p class="bad">{esc(d.numerics)}</p>'
    return f'<section id="summary"><h2>Summary</h2><div class="cards">{"".join(cards)}</div>{extra}</section>'


def _passes(d: ExplainData) -> str:
    if not d.records:
        return '<section id="passes"><h2>Passes</h2><p class="note">no passes ran (pipeline is empty)</p></section>'
    rows = []
    for r in d.records:
        delta = r.nodes_after - r.nodes_before
        stats = ", ".join(f"{k}={v}" for k, v in sorted(r.stats.items()))
        rows.append(f"<tr>{_num(r.index)}<td>{esc(r.name)}</td>{_num(r.seconds * 1e3, f'{r.seconds * 1e3:.2f}')}"
                    f"<td>{'yes' if r.changed else '-'}</td>{_num(r.nodes_before)}{_num(r.nodes_after)}"
                    f"{_num(delta, f'{delta:+d}')}<td>{esc(stats)}</td></tr>")
    total = sum(r.seconds for r in d.records) * 1e3
    return (f'<section id="passes"><h2>Passes</h2><p class="note">pipeline {esc(d.pipeline)}: '
            f"{total:.1f} ms in passes; {d.compile_seconds:.2f} s for passes + backend compile</p>"
            + _table(["#", "pass", "ms", "changed", "nodes before", "nodes after", "Δ nodes", "stats"], rows)
            + "</section>")


def _graphs(d: ExplainData) -> str:
    cols = []
    for label, g in (("before the pipeline", d.before), ("after the pipeline", d.after)):
        cols.append(f"<div><h3>{esc(label)}: {len(g.nodes)} nodes</h3><div class=\"scroll\">"
                    f"{graph_svg(g, f'graph {label}')}</div><details><summary>IR text</summary>"
                    f"<pre>{esc(print_graph(g))}</pre></details></div>")
    return (f'<section id="graphs"><h2>Graph before / after</h2><p>{legend_html()}</p>'
            f'<div class="side">{"".join(cols)}</div></section>')


def _fusion(d: ExplainData) -> str:
    if not d.fused_groups:
        body = ('<p class="note">no <code>kiln.fused</code> groups in the optimized graph (no pass in this '
                "pipeline made any).</p>")
    else:
        kinds: dict[str, int] = {}
        for g in d.fused_groups:
            kinds[g.kind] = kinds.get(g.kind, 0) + 1
        head = ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))
        rows = [f"<tr><td>%{esc(g.name)}</td><td>{esc(g.kind)}</td>{_num(len(g.members))}"
                f"<td>{esc(', '.join(g.members))}</td><td>{esc('; '.join(g.inputs))}</td>"
                f"<td>{esc('; '.join(g.outputs))}</td>{_num(g.depth)}</tr>" for g in d.fused_groups]
        body = (f'<p class="note">{len(d.fused_groups)} groups by kind: {esc(head)}</p>'
                + _table(["group", "kind", "ops", "members", "inputs", "outputs", "nesting"], rows))
    return f'<section id="fusion"><h2>Fused groups</h2>{body}</section>'


def _memory(d: ExplainData) -> str:
    if d.memory is None:
        return (f'<section id="memory"><h2>Memory timeline</h2><p class="note">not available: '
                f'{esc(d.notes.get("memory", "?"))}</p></section>')
    m = d.memory
    p = m.plan
    facts = (f"{len(m.steps)} steps (program order), {len(m.buffers)} activation buffers (weights and graph "
             f"inputs excluded; every value its own buffer, views included); peak live {fmt_bytes(m.peak)}; "
             f"arena {fmt_bytes(p.size)} by {p.method} (lower bound {fmt_bytes(p.lower_bound)}, gap {p.gap:.1%}"
             + (", proved optimal" if p.optimal else "") + ")")
    return (f'<section id="memory"><h2>Memory timeline</h2><p class="note">{esc(facts)}</p>'
            f'<div class="scroll">{timeline_svg(m)}</div></section>')


def _roofline(d: ExplainData) -> str:
    src = f'<p class="note">machine peaks: {esc(d.peaks.source)}.</p>'
    if "roofline" in d.notes:
        return (f'<section id="roofline"><h2>Roofline</h2>{src}<p class="note">not available: '
                f'{esc(d.notes["roofline"])}</p></section>')
    timed = any(r.measured_s is not None for r in d.kernels)
    how = ("kernel times: the optimized graph run op by op through PyTorch (the reference executor), best of "
           "5 runs" if timed else "kernels not timed: dots sit on their roof")
    if "kernel-times" in d.notes:
        how = f"kernels not timed: {d.notes['kernel-times']}"
    rows = []
    for r in sorted(d.kernels, key=lambda r: -r.roofline_s):
        frac = r.fraction_of_roofline
        rows.append(f"<tr><td>%{esc(r.name)}</td><td>{esc(r.op)}</td>{_num(r.flops, fmt_si(r.flops))}"
                    f"{_num(r.bytes, fmt_bytes(r.bytes))}{_num(r.intensity)}<td>{esc(r.bound)}</td>"
                    f"{_num(r.roofline_s * 1e6)}"
                    f"{_num(r.measured_s * 1e6 if r.measured_s is not None else None)}"
                    f"{_num(frac, f'{frac:.1%}' if frac is not None else None)}</tr>")
    total_roof = sum(r.roofline_s for r in d.kernels)
    total_meas = sum(r.measured_s for r in d.kernels if r.measured_s is not None)
    tot = f"{len(d.kernels)} kernels; roofline time {total_roof * 1e6:.1f} µs"
    if timed:
        tot += f"; measured {total_meas * 1e6:.1f} µs ({total_roof / total_meas:.1%} of the limit)"
    return (f'<section id="roofline"><h2>Roofline</h2>{src}<p class="note">{esc(how)}. {esc(tot)}.</p>'
            f"{roofline_svg(d.kernels, d.peaks)}"
            + '<div class="scroll">'
            + _table(["value", "kernel", "FLOPs", "bytes", "FLOP/byte", "bound", "roofline µs", "measured µs",
                      "% of roofline"], rows) + "</div></section>")


def _fallbacks(d: ExplainData) -> str:
    r = d.report
    if r.reason:
        body = f'<p class="bad">the whole graph runs in eager PyTorch: {esc(r.reason)}</p>'
    elif not r.fallback_ops:
        body = (f'<p class="ok">none: target {esc(r.target)} compiles all {r.nodes} compute nodes '
                f"in {r.partitions} partition(s).</p>")
    else:
        rows = [f"<tr><td>{esc(op)}</td>{_num(n)}</tr>" for op, n in sorted(r.fallback_ops.items())]
        body = (f'<p class="note">target {esc(r.target)}: {r.compiled_nodes}/{r.nodes} compute nodes compiled in '
                f"{r.partitions} partition(s); these ops run in eager PyTorch:</p>" + _table(["op", "nodes"], rows))
    return f'<section id="fallbacks"><h2>Fallbacks</h2>{body}</section>'


def _quant(d: ExplainData) -> str:
    if not d.annotations:
        body = ('<p class="note">quantization: not run (add the <code>quantize</code> pass to the pipeline, '
                'e.g. <code>-O quantize,O2</code>; no tensor carries quantization parameters).<br>pruning: not run '
                f'({esc(NOT_IMPLEMENTED.get("prune", "no pass"))}; no tensor carries sparsity info).</p>')
    else:
        rows = [f"<tr><td>%{esc(v)}</td><td>{esc(k)}</td><td>{esc(detail)}</td></tr>" for v, k, detail in d.annotations]
        body = _table(["value", "annotation", "parameters"], rows)
    return f'<section id="quant"><h2>Quantization and pruning</h2>{body}</section>'


def _notes(d: ExplainData) -> str:
    if not d.notes:
        return ""
    items = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in sorted(d.notes.items()))
    return f'<section id="notes"><h2>Notes</h2><ul class="note">{items}</ul></section>'


SECTIONS = [("summary", "Summary"), ("passes", "Passes"), ("graphs", "Graphs"), ("fusion", "Fused groups"),
            ("memory", "Memory"), ("roofline", "Roofline"), ("fallbacks", "Fallbacks"),
            ("quant", "Quantization / pruning")]


def render_html(d: ExplainData) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in d.versions.items())
    nav = "".join(f'<a href="#{sid}">{esc(label)}</a>' for sid, label in SECTIONS)
    body = "".join([_summary(d), _passes(d), _graphs(d), _fusion(d), _memory(d), _roofline(d), _fallbacks(d),
                    _quant(d), _notes(d)])
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><link rel=\"icon\" href=\"data:,\">"
            f"<title>kiln explain: {esc(d.title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>kiln explain: {esc(d.title)}</h1><p>graph @{esc(d.after.name)} · target "
            f"{esc(d.target)} · pipeline {esc(d.pipeline)} · {esc(versions)}</p></header><nav>{nav}</nav>"
            f"<main>{body}</main><script>{JS}</script></body></html>\n")
