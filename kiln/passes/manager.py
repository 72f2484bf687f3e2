"""The pass manager: named pipelines of registered passes, run with instruments.

Contract:
- ``context_for(target)`` is the ``PassContext`` for compiling to a target (its preferred layout).
- ``PIPELINES`` maps a pipeline name (``O0``, ``O1``, ``O2``) to pass names; ``register_pipeline``
  adds more. ``parse_pipeline("O1")`` or ``parse_pipeline("canonicalize,cse,my-pass")`` gives the pass
  names (pipeline names expand in place); unknown names raise ``KilnInputError``.
- ``PassManager(passes, instruments).run(graph, ctx) -> list[PassRecord]`` runs each pass in order.
  Instruments see every pass before and after: ``TimingInstrument`` (seconds, changed, node counts),
  ``DumpIRInstrument(dir)`` (``NN-before-NAME.kir`` / ``NN-after-NAME.kir``), ``VerifyInstrument``
  (verifier after each pass; names the pass that broke the IR), ``NumericsInstrument(inputs)`` (runs the
  graph through the reference after each pass and compares with the pre-pipeline outputs; names the
  first pass that changed results beyond tolerance).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError, KilnInputError, VerificationError
from kiln.ir.graph import Graph
from kiln.passes.base import Pass, PassContext, PassResult, get_pass, registered_passes

PIPELINES: dict[str, list[str]] = {
    "O0": [],
    "O1": ["canonicalize", "constant-fold", "cse", "dce"],
    # inference rewrites, then layout (before fusion hides the convs), then fusion
    "O2": ["O1", "fold-bn", "fuse-attention", "layout", "fuse", "dce"],
}


def context_for(target: str, **options: Any) -> PassContext:
    """The pass context a pipeline runs in when compiling for ``target``: the target's name and what its
    backend prefers (``prefer_layout``: ``layout`` converts conv nets to it), plus ``options``."""
    from kiln.backends.base import get_backend

    backend = get_backend(target)
    return PassContext(options={"target": target, "prefer_layout": backend.preferred_layout, **options})


def register_pipeline(name: str, passes: list[str]) -> None:
    PIPELINES[name] = list(passes)


def parse_pipeline(spec: str | list[str] | None) -> list[str]:
    if spec is None:
        return []
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    known = registered_passes()
    out: list[str] = []
    for item in items:
        if not item:
            continue
        if item in PIPELINES:
            out.extend(parse_pipeline(PIPELINES[item]))
        elif item in known:
            out.append(item)
        else:
            raise KilnInputError(f"unknown pass or pipeline {item!r}; pipelines: {', '.join(PIPELINES)}; "
                                 f"passes: {', '.join(sorted(known))}")
    return out


@dataclass
class PassRecord:
    index: int
    name: str
    seconds: float = 0.0
    changed: bool = False
    nodes_before: int = 0
    nodes_after: int = 0
    stats: dict[str, Any] = field(default_factory=dict)


class Instrument:
    def before_pass(self, record: PassRecord, p: Pass, graph: Graph, ctx: PassContext) -> None:
        pass

    def after_pass(self, record: PassRecord, p: Pass, graph: Graph, ctx: PassContext) -> None:
        pass


class TimingInstrument(Instrument):
    """Always on: fills seconds and node counts in each record."""

    def before_pass(self, record, p, graph, ctx):
        record.nodes_before = len(graph.nodes)
        record.seconds = time.perf_counter()

    def after_pass(self, record, p, graph, ctx):
        record.seconds = time.perf_counter() - record.seconds
        record.nodes_after = len(graph.nodes)


class DumpIRInstrument(Instrument):
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _write(self, tag: str, record: PassRecord, graph: Graph) -> None:
        from kiln.runtime.files import atomic_write_text

        atomic_write_text(self.dir / f"{record.index:02d}-{tag}-{record.name}.kir", str(graph) + "\n")

    def before_pass(self, record, p, graph, ctx):
        self._write("before", record, graph)

    def after_pass(self, record, p, graph, ctx):
        self._write("after", record, graph)


class VerifyInstrument(Instrument):
    def after_pass(self, record, p, graph, ctx):
        from kiln.ir.verifier import verify

        try:
            verify(graph)
        except VerificationError as e:
            raise VerificationError(f"IR is malformed after pass '{record.name}': {e}", e.node) from e


class NumericsInstrument(Instrument):
    """Compares the graph's outputs after each pass with its outputs before the pipeline."""

    def __init__(self, inputs: tuple, scale: float = 1.0):
        self.inputs = tuple(inputs)
        self.scale = scale
        self.expected = None

    def before_pass(self, record, p, graph, ctx):
        if self.expected is None:
            self.expected = run_reference(graph, self.inputs)

    def after_pass(self, record, p, graph, ctx):
        from kiln.numerics import NumericsError, compare

        msg = compare(run_reference(graph, self.inputs), self.expected, "output", self.scale)
        if msg is not None:
            raise NumericsError(f"pass '{record.name}' changed the results: {msg}")


def run_reference(graph: Graph, inputs: tuple):
    import torch

    from kiln.ir.to_fx import to_fx

    with torch.no_grad():
        return to_fx(graph)(*inputs)


class PassManager:
    def __init__(self, passes: list[Pass | str], instruments: list[Instrument] | None = None):
        self.passes = [get_pass(p) if isinstance(p, str) else p for p in passes]
        self.instruments = [TimingInstrument(), *(instruments or [])]

    @classmethod
    def from_pipeline(cls, spec: str | list[str] | None, instruments=None) -> PassManager:
        return cls(parse_pipeline(spec), instruments)

    def run(self, graph: Graph, ctx: PassContext | None = None) -> list[PassRecord]:
        ctx = ctx or PassContext()
        records = []
        for i, p in enumerate(self.passes):
            record = PassRecord(i, p.name)
            for inst in self.instruments:
                inst.before_pass(record, p, graph, ctx)
            result = p.run(graph, ctx)
            if not isinstance(result, PassResult):
                raise KilnError(f"pass '{p.name}' returned {type(result).__name__}, expected PassResult")
            record.changed, record.stats = result.changed, dict(result.stats)
            for inst in reversed(self.instruments):
                inst.after_pass(record, p, graph, ctx)
            records.append(record)
        graph.meta.setdefault("pass_records", []).extend(records)
        return records
