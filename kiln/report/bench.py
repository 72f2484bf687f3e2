"""End-to-end model benchmark: eager PyTorch vs Inductor vs kiln, one process, interleaved (the protocol is
docs/benchmarks.md). ``kiln bench`` runs it for one model, ``benchmarks/e2e.py`` for the whole zoo.

Contract:
- A ``Contender`` is one column group: ``name`` and ``build(model, inputs) -> callable(*inputs)``.
  ``CONTENDERS`` maps a kind to a constructor: ``eager``, ``inductor`` (``torch.compile``, default mode),
  ``kiln`` (``kiln.compile`` for one target and pipeline; named ``kiln`` for the reference target and
  ``kiln-<target>`` otherwise). A new peer or variant is one more entry there (e.g. a tuned TVM row).
  ``contenders_for(targets, pipeline, inductor)`` gives eager, then Inductor, then one kiln per target.
- ``run_model(name, model, inputs, contenders, warmup=3, reps=20, peaks=None, warm_compile=False) -> row``:
  builds each contender (cold compile time = build + first call, ``<c>_compile_s``; with
  ``warm_compile`` a second build after ``torch._dynamo.reset()``, ``<c>_compile_warm_s``, which for
  Inductor hits its on-disk FX graph cache), checks each output against eager with ``kiln.numerics``
  (``<c>_correct``, ``<c>_error``), then times all contenders interleaved: ``warmup`` untimed rounds,
  then ``reps`` rounds, each calling every contender once, under ``torch.no_grad()``. Per contender:
  ``<c>_ms`` (median), ``<c>_min_ms``, ``<c>_max_ms``; per non-eager contender ``<c>_speedup_vs_eager``
  and, for kiln contenders, ``<c>_speedup_vs_inductor`` — None when either side is incorrect or failed
  (a wrong answer is never a speed-up). Roofline columns from the first kiln contender's graph:
  ``flops``, ``bytes`` (kernel reads + writes: weights and activations), ``roofline_ms`` with the
  machine peaks ``peaks`` (measured in the same run by the caller) and ``<kiln>_pct_of_roofline``.
- ``summarize(rows, contenders)``: ``speedup_vs_eager_geomean`` and ``speedup_vs_inductor_geomean`` of
  the first kiln contender over the rows where it is correct, ``all_correct`` (every contender, every
  row), ``models``, and the same per contender under ``by_contender``.
- ``print_results`` prints the markdown table; ``write_json`` the report (``kiln.benchmarking.write_report``).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.benchmarking import geomean, markdown_table, write_report
from kiln.report.roofline import MachinePeaks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Contender:
    name: str
    build: Callable[[torch.nn.Module, tuple], Callable[..., Any]]
    kind: str = "other"  # "eager" | "inductor" | "kiln" | ...
    options: dict[str, Any] = field(default_factory=dict)


def _eager() -> Contender:
    return Contender("eager", lambda model, inputs: model, "eager")


def _inductor() -> Contender:
    return Contender("inductor", lambda model, inputs: torch.compile(model), "inductor")


def _kiln(target: str = "reference", pipeline: str = "O1") -> Contender:
    def build(model, inputs):
        import kiln

        return kiln.compile(model, inputs, target=target, pipeline=pipeline)

    name = "kiln" if target == "reference" else f"kiln-{target}"
    return Contender(name, build, "kiln", {"target": target, "pipeline": pipeline})


CONTENDERS: dict[str, Callable[..., Contender]] = {"eager": _eager, "inductor": _inductor, "kiln": _kiln}


def contenders_for(targets: Sequence[str] = ("reference",), pipeline: str = "O1",
                   inductor: bool = True) -> list[Contender]:
    from kiln.options import CompileOptions

    out = [CONTENDERS["eager"]()]
    if inductor:
        out.append(CONTENDERS["inductor"]())
    for target in dict.fromkeys(targets):
        CompileOptions.from_dict({"target": target, "pipeline": pipeline})  # fail before any model is built
        out.append(CONTENDERS["kiln"](target, pipeline))
    return out


def _ms(seconds: list[float]) -> tuple[float, float, float]:
    return statistics.median(seconds) * 1e3, min(seconds) * 1e3, max(seconds) * 1e3


def _build_and_call(c: Contender, model, inputs) -> tuple[Callable, Any, float]:
    t0 = time.perf_counter()
    fn = c.build(model, inputs)
    with torch.no_grad():
        out = fn(*inputs)
    return fn, out, time.perf_counter() - t0


def run_model(name: str, model: torch.nn.Module, inputs: tuple, contenders: list[Contender], warmup: int = 3,
              reps: int = 20, peaks: MachinePeaks | None = None, warm_compile: bool = False) -> dict[str, Any]:
    from kiln.numerics import compare

    model.eval()
    row: dict[str, Any] = {"model": name,
                           "inputs": ", ".join(f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"
                                               for x in inputs if isinstance(x, torch.Tensor))}
    with torch.no_grad():
        expected = model(*inputs)
    fns: dict[str, Callable] = {}
    graphs: dict[str, Any] = {}
    for c in contenders:
        if c.kind == "inductor":
            torch._dynamo.reset()
        try:
            fn, out, cold = _build_and_call(c, model, inputs)
        except Exception as e:  # a contender that cannot compile this model is a failed cell, not a crash
            log.warning("%s: %s failed: %s: %s", name, c.name, type(e).__name__, e)
            row[f"{c.name}_correct"], row[f"{c.name}_error"] = False, f"{type(e).__name__}: {e}".splitlines()[0]
            continue
        if c.kind != "eager":
            row[f"{c.name}_compile_s"] = cold
        msg = compare(out, expected, "output")
        row[f"{c.name}_correct"] = msg is None
        if msg is not None:
            row[f"{c.name}_error"] = msg
        if warm_compile and c.kind != "eager":
            if c.kind == "inductor":
                torch._dynamo.reset()
            fn, _, row[f"{c.name}_compile_warm_s"] = _build_and_call(c, model, inputs)
        fns[c.name] = fn
        if c.kind == "kiln" and getattr(fn, "graph", None) is not None:
            graphs[c.name] = fn.graph
    samples: dict[str, list[float]] = {n: [] for n in fns}
    with torch.no_grad():
        for rnd in range(warmup + reps):
            for n, fn in fns.items():
                t0 = time.perf_counter()
                fn(*inputs)
                dt = time.perf_counter() - t0
                if rnd >= warmup:
                    samples[n].append(dt)
    for n, s in samples.items():
        row[f"{n}_ms"], row[f"{n}_min_ms"], row[f"{n}_max_ms"] = _ms(s)
    eager_ok = row.get("eager_correct", False) and "eager_ms" in row
    inductor_ok = row.get("inductor_correct", False) and "inductor_ms" in row
    for c in contenders:
        if c.kind == "eager" or f"{c.name}_ms" not in row:
            continue
        ok = row[f"{c.name}_correct"]
        row[f"{c.name}_speedup_vs_eager"] = row["eager_ms"] / row[f"{c.name}_ms"] if ok and eager_ok else None
        if c.kind == "kiln":
            row[f"{c.name}_speedup_vs_inductor"] = (row["inductor_ms"] / row[f"{c.name}_ms"]
                                                    if ok and inductor_ok else None)
    first_kiln = next((c.name for c in contenders if c.kind == "kiln" and c.name in graphs), None)
    if first_kiln is not None and peaks is not None:
        _roofline_columns(row, graphs[first_kiln], first_kiln, peaks)
    row["reps"], row["warmup"] = reps, warmup
    return row


def _roofline_columns(row: dict[str, Any], graph, name: str, peaks: MachinePeaks) -> None:
    from kiln.errors import KilnError
    from kiln.passes.analysis import graph_cost

    try:
        cost = graph_cost(graph)
    except KilnError as e:  # symbolic shapes
        row["roofline_error"] = str(e)
        return
    row["flops"], row["bytes"] = cost.flops, cost.bytes
    row["roofline_ms"] = max(cost.flops / peaks.flops_per_s, cost.bytes / peaks.bytes_per_s) * 1e3
    if f"{name}_ms" in row:
        row[f"{name}_pct_of_roofline"] = 100 * row["roofline_ms"] / row[f"{name}_ms"]


def _geomean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return geomean(vals) if vals else None


def summarize(rows: list[dict[str, Any]], contenders: list[Contender]) -> dict[str, Any]:
    kilns = [c.name for c in contenders if c.kind == "kiln"]
    by: dict[str, Any] = {}
    for c in contenders:
        if c.kind == "eager":
            continue
        by[c.name] = {"speedup_vs_eager_geomean": _geomean_of(rows, f"{c.name}_speedup_vs_eager"),
                      "all_correct": all(r.get(f"{c.name}_correct", False) for r in rows)}
        if c.kind == "kiln":
            by[c.name]["speedup_vs_inductor_geomean"] = _geomean_of(rows, f"{c.name}_speedup_vs_inductor")
    main = by.get(kilns[0], {}) if kilns else {}
    return {
        "speedup_vs_eager_geomean": main.get("speedup_vs_eager_geomean"),
        "speedup_vs_inductor_geomean": main.get("speedup_vs_inductor_geomean"),
        "all_correct": all(r.get(f"{c.name}_correct", False) for r in rows for c in contenders),
        "models": len(rows),
        "kiln_contender": kilns[0] if kilns else None,
        "by_contender": by,
    }


def columns(contenders: list[Contender]) -> list[str]:
    cols = ["model"]
    for c in contenders:
        cols += [f"{c.name}_ms", f"{c.name}_min_ms", f"{c.name}_max_ms"]
    for c in contenders:
        if c.kind != "eager":
            cols += [f"{c.name}_speedup_vs_eager"]
            if c.kind == "kiln":
                cols += [f"{c.name}_speedup_vs_inductor"]
    for c in contenders:
        cols += [f"{c.name}_correct"]
    cols += [f"{c.name}_compile_s" for c in contenders if c.kind != "eager"]
    kilns = [c.name for c in contenders if c.kind == "kiln"]
    if kilns:
        cols += ["roofline_ms", f"{kilns[0]}_pct_of_roofline"]
    return cols


def print_results(rows: list[dict[str, Any]], summary: dict[str, Any], contenders: list[Contender],
                  out: Callable[[str], Any] = print) -> None:
    out(f"torch threads: {torch.get_num_threads()}; times in ms (median, min, max over the timed reps); "
        "speed-ups are eager (or Inductor) time / contender time, None when outputs do not match eager")
    out(markdown_table(rows, columns(contenders)))
    for r in rows:
        for c in contenders:
            if r.get(f"{c.name}_error"):
                out(f"{r['model']}: {c.name}: {r[f'{c.name}_error']}")
    shown = {k: v for k, v in summary.items() if k != "by_contender"}
    out("summary: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))


def write_json(path: str, rows: list[dict[str, Any]], summary: dict[str, Any], contenders: list[Contender],
               extra: dict[str, Any] | None = None) -> None:
    meta = {"contenders": [{"name": c.name, "kind": c.kind, **c.options} for c in contenders], **(extra or {})}
    write_report(path, rows, summary, meta)
