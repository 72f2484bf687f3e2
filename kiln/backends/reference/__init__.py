"""The reference backend: runs any kiln graph through PyTorch via the fx conversion.

Contract: it is the oracle every other backend is checked against, so it adds nothing of its own:
``compile(graph)`` is ``to_fx(graph)``. It *supports* the ops kiln's IR defines semantics for (ATen,
prims, symbolic scalars, kiln's region ops); ops from other namespaces (custom ops) are left to the
partitioner's eager fallback, which is how an unsupported op shows up in reports.
With ``options={"arena": True}`` (``"arena_method"``: ``greedy`` default, ``cpsat``, ``best-fit``) the
partition runs from one planned arena instead (``kiln.runtime.arena_exec``): same kernels, same results,
activations at the scheduler's offsets.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.backends.base import Backend, Executable, register_backend
from kiln.ir.graph import Graph, Node
from kiln.ir.to_fx import to_fx

KNOWN_NAMESPACES = ("aten", "prims", "sym", "kiln", "onednn", "quantized")  # the last two: lowered int8 kernels


@register_backend("reference")
class ReferenceBackend(Backend):
    # PyTorch's CPU convolutions run 1.2-1.4x faster on channels-last activations here (measured on the
    # zoo's resnet18/mobilenetv2, bench size, 1-2 threads; the fusion issue's note has the table)
    preferred_layout = "channels_last"

    def supports(self, node: Node) -> bool:
        return node.op.namespace in KNOWN_NAMESPACES

    def compile(self, graph: Graph, options: dict[str, Any]) -> Executable:
        if options.get("arena"):
            from kiln.runtime.arena_exec import compile_with_arena

            return compile_with_arena(graph, method=options.get("arena_method", "greedy"))
        gm = to_fx(graph)

        def run(*inputs):
            with torch.profiler.record_function(f"kiln.reference.{graph.name}"):
                return gm(*inputs)

        run.graph_module = gm
        return run
