"""Everything ``kiln explain`` shows, collected from one compile: the data behind the HTML report.

Contract: ``explain(graph, inputs, pipeline="O1", target="reference", arena="best-fit", measure=True,
title="") -> ExplainData``. ``graph`` is the imported graph before any pass (it is transformed in place).
It runs the pipeline with the ``PassManager`` (records: per-pass seconds, changed, node counts, stats),
compiles for ``target`` (``kiln.backends.driver.compile_graph``: partitions and fallbacks), runs the
compiled graph once on ``inputs`` and compares with the pre-pipeline graph's reference outputs
(``numerics``: None when they match, else the mismatch). Then, from the optimized graph:
``fused_groups`` (every ``kiln.fused`` node, at any depth: kind = its ``kind`` attr, members = its
subgraph's ops), the memory timeline (``kiln.report.memory``) and the roofline rows
(``kiln.report.roofline``; with ``measure`` the machine's peaks and each kernel's time are measured in
this run, otherwise the labelled reference constants are used and kernels are not timed), and the
quantization/pruning annotations found on tensor types (``quant``/``sparsity``). A section that cannot
be computed (e.g. symbolic shapes for memory planning) keeps its error message in ``notes[section]``
instead of failing the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.backends.driver import FallbackReport, compile_graph
from kiln.errors import KilnError
from kiln.ir.clone import clone_graph
from kiln.ir.graph import Graph, Node
from kiln.ir.ops import FUSED
from kiln.ir.printer import format_type
from kiln.ir.types import TensorType
from kiln.passes.manager import PassManager, PassRecord, context_for, run_reference
from kiln.report.memory import MemoryTimeline, memory_timeline
from kiln.report.roofline import REFERENCE_PEAKS, KernelRow, MachinePeaks, kernel_rows, measure_machine, time_nodes


@dataclass
class FusedGroup:
    name: str  # the group's (first) result
    kind: str
    members: list[str]  # op names of the subgraph's compute nodes, in order
    inputs: list[str]  # types
    outputs: list[str]
    depth: int = 0  # 0: in the top-level graph


@dataclass
class ExplainData:
    title: str
    target: str
    pipeline: str
    before: Graph
    after: Graph
    records: list[PassRecord]
    report: FallbackReport
    partitioned: Graph
    compile_seconds: float
    numerics: str | None
    fused_groups: list[FusedGroup]
    peaks: MachinePeaks
    memory: MemoryTimeline | None = None
    kernels: list[KernelRow] = field(default_factory=list)
    annotations: list[tuple[str, str, str]] = field(default_factory=list)  # (value, kind, detail)
    notes: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def fallback_summary(self) -> str:
        if self.report.reason:
            return f"whole graph in eager: {self.report.reason}"
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(self.report.fallback_ops.items()))
        return ops or "none"


def fused_groups(graph: Graph, depth: int = 0) -> list[FusedGroup]:
    out = []
    for node in graph.nodes:
        if node.subgraph is None:
            continue
        if node.op is FUSED:
            members = [n.op.name for n in node.subgraph.nodes if n.op.name != "kiln.weight"]
            out.append(FusedGroup(node.results[0].name if node.results else "?", str(node.attrs.get("kind", "?")),
                                  members, [format_type(v.type) for v in node.inputs],
                                  [format_type(r.type) for r in node.results], depth))
        out.extend(fused_groups(node.subgraph, depth + 1))
    return out


def annotations(graph: Graph) -> list[tuple[str, str, str]]:
    """(value, "quant"/"sparsity", detail) for every annotated tensor type, weights included."""
    out = []
    values = list(graph.inputs) + [r for n in graph.nodes for r in n.results]
    for v in values:
        t = v.type
        if isinstance(t, TensorType):
            if t.quant is not None:
                out.append((v.name, "quant", str(t.quant)))
            if t.sparsity is not None:
                out.append((v.name, "sparsity", str(t.sparsity)))
    return out


def explain(graph: Graph, inputs: tuple, pipeline: str = "O1", target: str = "reference", arena: str = "best-fit",
            measure: bool = True, title: str = "") -> ExplainData:
    import kiln

    before = clone_graph(graph)
    start = time.perf_counter()
    records = PassManager.from_pipeline(pipeline).run(graph, context_for(target, calib_inputs=inputs))
    compiled = compile_graph(graph, target)
    compile_s = time.perf_counter() - start
    with torch.no_grad():
        from kiln.numerics import compare

        numerics = compare(list(compiled(*inputs)), list(run_reference(before, inputs)), "compiled output")
    notes: dict[str, str] = {}
    peaks = REFERENCE_PEAKS
    if measure:
        peaks = measure_machine()
    data = ExplainData(title or graph.name, target, pipeline, before, graph, records, compiled.report,
                       compiled.graph, compile_s, numerics, fused_groups(graph), peaks,
                       annotations=annotations(graph),
                       versions={"kiln": kiln.__version__, "torch": torch.__version__,
                                 "threads": str(torch.get_num_threads())})
    try:
        data.memory = memory_timeline(graph, arena)
    except KilnError as e:
        notes["memory"] = str(e)
    times: dict[Node, float] | None = None
    if measure:
        try:
            times = time_nodes(graph, inputs)
        except KilnError as e:
            notes["kernel-times"] = str(e)
    try:
        data.kernels = kernel_rows(graph, peaks, times)
    except KilnError as e:
        notes["roofline"] = str(e)
    data.notes = notes
    return data


def summary(data: ExplainData) -> dict[str, Any]:
    """A few headline numbers (also used by tests)."""
    return {"passes": [r.name for r in data.records], "fused_groups": len(data.fused_groups),
            "nodes_before": len(data.before.nodes), "nodes_after": len(data.after.nodes),
            "peak_bytes": data.memory.peak if data.memory else None,
            "arena_bytes": data.memory.plan.size if data.memory else None, "kernels": len(data.kernels)}
