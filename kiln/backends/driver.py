"""Compile a whole kiln graph for a target: partition, compile the supported regions, fall back for the
rest, and report what fell back.

Contract: ``compile_graph(graph, target="reference", options=None, example_inputs=None) -> CompiledGraph``.
- The graph is not modified (a copy is partitioned).
- kiln's quantized ops (``kiln.ir.quant_ops``) are first lowered onto real integer kernels
  (``kiln.passes.quantize.lower``), chosen per op by measurement on ``example_inputs`` when given (else
  the first applicable kernel); ``CompiledGraph.quant_lowering`` is that report (None without such ops).
  The saved/compared graph stays the quantized one with exact reference semantics.
- ``CompiledGraph.artifact_files()``: compiled code the backend offers for artifacts (name -> bytes);
  ``options["prebuilt_dir"]`` hands such files back to the backend when an artifact is loaded.
- Supported regions become ``kiln.partition`` nodes compiled by the target backend; every other node
  runs through PyTorch (eager fallback) in the top-level fx module. kiln never fails a model because
  one of its ops is unsupported.
- ``CompiledGraph(*inputs) -> tuple`` of outputs; ``.report`` is a ``FallbackReport`` (``to_dict()``
  for machine-readable summaries; one log line on the ``kiln`` logger when something fell back).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kiln.backends.base import get_backend
from kiln.backends.partition import outline, partition
from kiln.ir.clone import clone_graph
from kiln.ir.graph import Graph
from kiln.ir.ops import WEIGHT
from kiln.ir.to_fx import to_fx

log = logging.getLogger("kiln")


@dataclass
class FallbackReport:
    graph: str
    target: str
    nodes: int = 0
    compiled_nodes: int = 0
    partitions: int = 0
    fallback_ops: dict[str, int] = field(default_factory=dict)
    reason: str | None = None  # set when the whole graph ran in eager (capture/compile failed)

    @property
    def fell_back(self) -> bool:
        return bool(self.fallback_ops) or self.reason is not None

    def to_dict(self) -> dict[str, Any]:
        return {"graph": self.graph, "target": self.target, "nodes": self.nodes,
                "compiled_nodes": self.compiled_nodes, "partitions": self.partitions,
                "fallback_ops": dict(self.fallback_ops), "reason": self.reason}

    def summary_line(self) -> str:
        if self.reason is not None:
            return f"kiln: graph '{self.graph}' runs in eager PyTorch: {self.reason}"
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(self.fallback_ops.items()))
        n = sum(self.fallback_ops.values())
        return (f"kiln: {n} of {self.nodes} node(s) of graph '{self.graph}' fell back to eager "
                f"(target {self.target!r}): {ops}")


class CompiledGraph:
    def __init__(self, graph: Graph, module, report: FallbackReport, executables: list | None = None):
        self.graph = graph  # the partitioned graph
        self.module = module
        self.report = report
        self.executables = list(executables or [])  # what the backend compiled, one per partition
        self.quant_lowering = None  # kiln.passes.quantize.lower.LoweringReport when the graph was quantized

    def __call__(self, *inputs) -> tuple:
        return self.module(*inputs)

    def artifact_files(self) -> dict[str, bytes]:
        """Compiled code to ship in an artifact: the union of the executables' ``artifact_files()``
        (name -> bytes; a backend that builds libraries, like tvm, offers them so that loading the
        artifact compiles nothing)."""
        files: dict[str, bytes] = {}
        for exe in self.executables:
            files.update(getattr(exe, "artifact_files", dict)())
        return files


def compile_graph(graph: Graph, target: str = "reference", options: dict[str, Any] | None = None,
                  example_inputs: tuple | None = None) -> CompiledGraph:
    options = dict(options or {})
    backend = get_backend(target)
    g = clone_graph(graph)
    lowering = _lower_quantized(g, example_inputs)
    compute = [n for n in g.nodes if n.op is not WEIGHT]
    regions = partition(g, backend.supports)
    report = FallbackReport(graph.name, target, nodes=len(compute),
                            compiled_nodes=sum(len(r) for r in regions), partitions=len(regions))
    in_region = {n for r in regions for n in r}
    report.fallback_ops = dict(Counter(n.op.name for n in compute if n not in in_region))
    parts = outline(g, regions, target)
    executables = {p: backend.compile(p.subgraph, options) for p in parts}
    module = to_fx(g, submodules=executables)
    if report.fell_back:
        log.warning(report.summary_line())
    compiled = CompiledGraph(g, module, report, list(executables.values()))
    compiled.quant_lowering = lowering
    return compiled


def _lower_quantized(graph: Graph, example_inputs: tuple | None):
    from kiln.passes.quantize.lower import LOWERINGS, lower_graph

    if not any(n.op in LOWERINGS for n in graph.nodes):
        return None
    return lower_graph(graph, example_inputs)
