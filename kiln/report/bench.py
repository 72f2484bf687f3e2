"""End-to-end model benchmark: eager PyTorch vs its compilers (Inductor, OpenVINO) vs kiln, one process,
interleaved (the protocol is docs/benchmarks.md). ``kiln bench`` runs it for one model, ``benchmarks/e2e.py``
for the whole zoo.

Contract:
- A ``Contender`` is one column group: ``name``, ``build(model, inputs) -> callable(*inputs)``, ``kind``
  (``eager``, a peer kind of ``PEER_KINDS`` = ``inductor``/``openvino``, ``kiln``, or ``other``),
  ``options`` (recorded in the JSON) and ``reset``: a no-argument function run before each build that
  drops the *process-level* compile caches (Dynamo's, kiln's in-memory kernel table), so that a second
  build measures a real compile served by the persistent on-disk caches (Inductor's FX graph cache,
  kiln's kernel cache and tuning database), not a dictionary lookup; ``compile_context``: an optional
  context manager factory every compiling call of the contender runs under.
- ``CONTENDERS`` maps a name to a constructor: ``eager``; ``inductor`` (``torch.compile``, default mode);
  ``inductor-freezing`` (the same with ``torch._inductor.config.freezing = True``, scoped: the flag is
  set by ``compile_context``, a ``config.patch`` around each compiling call only, and restored after; the
  two never share an FX-graph-cache entry: the key includes Inductor's config, and torch 2.13 bypasses the
  cache for graphs with frozen weights); ``openvino``
  (``torch.compile(backend="openvino")``, CPU, f32 precision hint, ``INFERENCE_NUM_THREADS`` = torch's
  thread count; optional: when the ``openvino`` package is missing the contender is *unavailable*; when
  its default capture fails on a model, OpenVINO's own ``aot_autograd=True`` capture is tried, the cold
  compile time includes both attempts and ``<c>_note`` says so);
  ``kiln`` (``kiln.compile(target, pipeline, **options)``). ``named_contender(name, pipeline, tune_trials)``
  parses the names ``benchmarks/e2e.py`` takes: those plus ``kiln-<target>`` and ``kiln-<target>-tuned``
  (``tune_trials`` MetaSchedule trials). ``contenders_for(targets, pipeline, inductor)`` gives eager,
  Inductor and one kiln per target (``kiln bench``). Bad names/targets/pipelines raise ``KilnInputError``
  before any model is built; an option kiln does not implement yet (``UnsupportedError``) is not an error
  here: the build raises it and the cell is reported unavailable.
- ``run_model(name, model, inputs, contenders, warmup=3, reps=20, peaks=None, warm_compile=False,
  output_scaled_atol=False) -> row`` (``output_scaled_atol``: compare with ``magnitude`` = the largest eager
  output element, ``kiln.numerics``' test for long accumulations such as a K=4096 GEMM): builds each contender
  (cold compile time = reset + build + first call, ``<c>_compile_s``; with ``warm_compile`` a second reset +
  build + call, ``<c>_compile_warm_s``; every build runs with the objects alive before it frozen
  (``gc.collect()`` then ``gc.freeze()``, undone after): a build's own garbage is collected as usual, but it
  does not pay for walking what earlier contenders left in the process — late in an e2e run one full
  collection took 0.67 s, landing in whichever build triggered it; the warm build's output is compared
  with eager too: the warm build is the one timed); kiln's compile-cache outcomes ``<c>_compile_cache`` /
  ``<c>_compile_cache_warm``; Inductor's FX-graph-cache outcomes of the two are ``<c>_cold_cache`` and
  ``<c>_warm_cache``: hit/miss/bypass counts). A build that raises is a failed cell (``<c>_correct`` False,
  ``<c>_error`` its first line), never a crash; ``UnsupportedError`` and ``ImportError`` (the contender is not
  in this build/install) also set ``<c>_unavailable``. Each output is compared with eager (``kiln.numerics``; a
  mismatch sets ``<c>_correct`` False and ``<c>_error``). After all builds, every contender with a ``reset`` is
  called once in its ``compile_context`` (a later contender's reset dropped Dynamo's code: it recompiles there,
  not in the timed loop, and with the right config). Then all contenders are timed interleaved: ``warmup``
  untimed rounds, ``reps`` rounds calling each once, under ``torch.no_grad()``: ``<c>_ms`` (median),
  ``<c>_min_ms``, ``<c>_max_ms``. Speed-ups (None unless both sides are correct: a wrong answer is never a
  speed-up): ``<c>_speedup_vs_eager`` for every non-eager contender; for kiln contenders
  ``<c>_speedup_vs_inductor`` (default Inductor) and ``<c>_speedup_vs_best_peer``, where
  ``best_peer``/``best_peer_ms`` is the fastest *correct* contender of a peer kind on that row (None when there
  is none). Kiln contenders whose executable reports kernel paths (the TVM backend's ``kernel_paths``) get
  ``<c>_kernels``: {path: count}, and ``<c>_gemm_kernels``: the same over the kernels that hold a GEMM/conv
  (``GEMM_OPS``): which path the heavy kernels took; with tuning, ``<c>_tuning`` and ``<c>_tuning_warm``
  (``tuning_totals`` of the cold and warm builds: the warm one should tune nothing). Roofline columns from the
  first built kiln contender's graph: ``flops``, ``bytes`` (kernel reads + writes), ``roofline_ms`` with the
  machine peaks ``peaks`` and ``<kiln>_pct_of_roofline`` per kiln contender.
- ``headline_kiln(rows, contenders)``: the kiln contender the summary's top-level keys describe: the last
  kiln contender with tuning (``tune_trials`` in its options) that was available on at least one row;
  else the first kiln contender available on at least one row; else the first kiln contender.
- ``summarize(rows, contenders)``: ``kiln_contender`` (the headline), its ``speedup_vs_eager_geomean``,
  ``speedup_vs_inductor_geomean``, ``speedup_vs_best_peer_geomean`` (geomeans over the rows where both
  sides are correct) and ``warm_compile_s_max`` (max warm compile over rows; None when not measured);
  ``all_correct``: every kiln cell that was available matched eager (and at least one was); ``unavailable``
  {contender: reason}; ``peers_all_correct``; ``models``; and per contender under ``by_contender`` the same
  figures plus ``rows_correct`` and ``compile_s_max``.
- ``kiln_contender(name, target, pipeline, **options)``: a kiln contender under any name (e.g. with
  ``backend_options``), options checked like ``named_contender``'s. ``add_speedups(row, contenders)`` fills
  a row's ``best_peer`` and speed-ups from its ``_ms``/``_correct`` cells. ``kernel_paths(compiled)`` /
  ``kernel_path_counts(compiled, gemm_only=False)`` read the backend executables' ``kernel_paths``.
- ``print_results`` prints the markdown tables (``display_rows``: times and speed-ups; compile times,
  kernel paths and roofline); ``write_json`` the report (``kiln.benchmarking.write_report``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.benchmarking import geomean, markdown_table, write_report
from kiln.errors import KilnInputError, UnsupportedError
from kiln.report.roofline import MachinePeaks

log = logging.getLogger(__name__)

PEER_KINDS = ("inductor", "openvino")
INDUCTOR = "inductor"  # the default-Inductor contender that ``<kiln>_speedup_vs_inductor`` divides by
UNAVAILABLE_ERRORS = (UnsupportedError, ImportError)


@dataclass(frozen=True)
class Contender:
    name: str
    build: Callable[[torch.nn.Module, tuple], Callable[..., Any]]
    kind: str = "other"  # "eager" | "inductor" | "openvino" | "kiln" | ...
    options: dict[str, Any] = field(default_factory=dict)
    reset: Callable[[], None] | None = None
    compile_context: Callable[[], AbstractContextManager] | None = None


def _reset_dynamo() -> None:
    torch._dynamo.reset()


def reset_kiln_process_caches() -> None:
    """Forget what this process compiled (the TVM backend's in-memory kernel table), so the next kiln compile
    does the work a fresh process would do, served only by the on-disk caches. (``kiln.compile`` goes through
    ``torch.export``, which keeps no Dynamo code cache, so Dynamo is left alone: resetting it would drop the
    other contenders' compiled code.)"""
    try:
        from kiln.backends.tvm import backend as tvm_backend
    except ImportError:  # TVM not installed: nothing cached
        return
    clear = getattr(tvm_backend, "clear_process_caches", None)
    if clear is not None:
        clear()
    else:
        getattr(tvm_backend, "_KERNEL_CACHE", {}).clear()


def _eager() -> Contender:
    return Contender("eager", lambda model, inputs: model, "eager")


def _inductor() -> Contender:
    return Contender(INDUCTOR, lambda model, inputs: torch.compile(model), "inductor", {}, _reset_dynamo)


def _freezing_on():
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)


def _inductor_freezing() -> Contender:
    return Contender("inductor-freezing", lambda model, inputs: torch.compile(model), "inductor", {"freezing": True},
                     _reset_dynamo, _freezing_on)


_BUILD_NOTES: dict[int, str] = {}  # id(built callable) -> what its build had to do, read once by run_model


def _openvino() -> Contender:
    def build(model, inputs):
        import openvino.torch  # noqa: F401  (registers the "openvino" torch.compile backend)

        fn = torch.compile(model, backend="openvino", options=_openvino_options())
        try:
            with torch.no_grad():
                fn(*inputs)  # compiles now
            return fn
        except Exception as e:  # e.g. Dynamo's symbolic-shape guards on some models: retry with AOTAutograd capture
            first = _first_line(e)
        torch._dynamo.reset()
        fn = torch.compile(model, backend="openvino", options={**_openvino_options(), "aot_autograd": True})
        with torch.no_grad():
            fn(*inputs)  # a second failure is the cell's error
        _BUILD_NOTES[id(fn)] = f"default capture failed ({first}); compiled with aot_autograd=True"
        return fn

    return Contender("openvino", build, "openvino", _openvino_options(), _reset_dynamo)


def _openvino_options() -> dict[str, Any]:
    return {"device": "CPU", "config": {"INFERENCE_PRECISION_HINT": "f32",
                                        "INFERENCE_NUM_THREADS": str(torch.get_num_threads())}}


def _kiln(target: str = "reference", pipeline: str = "O1", name: str | None = None, **options: Any) -> Contender:
    def build(model, inputs):
        import kiln

        return kiln.compile(model, inputs, target=target, pipeline=pipeline, **options)

    if name is None:
        name = "kiln" if target == "reference" else f"kiln-{target}"
    return Contender(name, build, "kiln", {"target": target, "pipeline": pipeline, **options},
                     reset_kiln_process_caches)


CONTENDERS: dict[str, Callable[..., Contender]] = {"eager": _eager, "inductor": _inductor,
                                                   "inductor-freezing": _inductor_freezing,
                                                   "openvino": _openvino, "kiln": _kiln}


def _check_kiln_options(options: dict[str, Any]) -> None:
    from kiln.options import CompileOptions

    try:
        CompileOptions.from_dict(options)  # a bad target/pipeline fails before any model is built
    except UnsupportedError:
        pass  # not built yet: each build raises it and the cell is reported unavailable


def named_contender(name: str, pipeline: str = "O2", tune_trials: int = 32,
                    backend_options: dict[str, Any] | None = None) -> Contender:
    """``eager``, ``inductor``, ``inductor-freezing``, ``openvino``, ``kiln`` (reference target),
    ``kiln-<target>`` or ``kiln-<target>-tuned`` (``tune_trials`` trials)."""
    if name in CONTENDERS and name != "kiln":
        return CONTENDERS[name]()
    if name == "kiln" or name.startswith("kiln-"):
        rest = name.removeprefix("kiln").removeprefix("-") or "reference"
        tuned = rest.endswith("-tuned")
        target = rest.removesuffix("-tuned")
        options: dict[str, Any] = {}
        if tuned:
            options["tune_trials"] = tune_trials
        if backend_options:
            options["backend_options"] = dict(backend_options)
        _check_kiln_options({"target": target, "pipeline": pipeline, **options})
        return CONTENDERS["kiln"](target, pipeline, name=name, **options)
    raise KilnInputError(f"unknown contender {name!r}; valid: {', '.join(n for n in CONTENDERS if n != 'kiln')}, "
                         "kiln, kiln-<target>, kiln-<target>-tuned")


def kiln_contender(name: str, target: str = "tvm", pipeline: str = "O2", **options: Any) -> Contender:
    """A kiln contender under any name, e.g. ``kiln_contender("kiln-tvm-tir", backend_options={"gemm": "tvm"})``;
    options are checked now (``KilnInputError``) except the not-yet-built ones (see the module contract)."""
    _check_kiln_options({"target": target, "pipeline": pipeline, **options})
    return CONTENDERS["kiln"](target, pipeline, name=name, **options)


def contenders_for(targets: Sequence[str] = ("reference",), pipeline: str = "O1",
                   inductor: bool = True) -> list[Contender]:
    out = [CONTENDERS["eager"]()]
    if inductor:
        out.append(CONTENDERS["inductor"]())
    for target in dict.fromkeys(targets):
        _check_kiln_options({"target": target, "pipeline": pipeline})
        out.append(CONTENDERS["kiln"](target, pipeline))
    return out


def _ms(seconds: list[float]) -> tuple[float, float, float]:
    return statistics.median(seconds) * 1e3, min(seconds) * 1e3, max(seconds) * 1e3


def _fxgraph_counters() -> Counter:
    from torch._dynamo.utils import counters

    return Counter({k.removeprefix("fxgraph_cache_"): v for k, v in counters["inductor"].items()
                    if k.startswith("fxgraph_cache_")})


def _build_and_call(c: Contender, model, inputs) -> tuple[Callable, Any, float]:
    if c.reset is not None:
        c.reset()
    gc.collect()
    gc.freeze()  # what earlier contenders left alive is not this build's to collect (see run_model)
    try:
        t0 = time.perf_counter()
        fn = c.build(model, inputs)
        with _compiling(c), torch.no_grad():
            out = fn(*inputs)
        return fn, out, time.perf_counter() - t0
    finally:
        gc.unfreeze()


def _compiling(c: Contender) -> AbstractContextManager:
    return c.compile_context() if c.compile_context is not None else contextlib.nullcontext()


GEMM_OPS = frozenset({"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.convolution",
                      "mkl._mkl_linear", "mkldnn._convolution_pointwise",  # the tvm target's packed-weight kernels
                      "mkldnn._convolution_pointwise.binary", "aten.scaled_dot_product_attention"})


def _executables(compiled: Any) -> list:
    """The backend executables of a ``kiln.compile`` result (one per partition; a compile-cache hit has one)."""
    return list(getattr(getattr(compiled, "compiled", None), "executables", None) or [])


def kernel_paths(compiled: Any) -> list[dict[str, Any]] | None:
    """Every ``kernel_paths`` entry ({"kernel", "path", "ops"}) of the backend executables inside a
    ``kiln.compile`` result (the TVM backend: path "tvm" for generated TIR, "torch" for PyTorch's kernels);
    None when no executable reports them."""
    found: list[dict[str, Any]] | None = None
    for exe in _executables(compiled):
        paths = getattr(exe, "kernel_paths", None)
        if paths is not None:
            found = (found or []) + [dict(p) for p in paths]
    return found


TUNING_COUNTS = ("tuned", "reused", "fell_back", "gemm_choices_measured", "gemm_choices_reused", "tuning_s")


def tuning_totals(compiled: Any) -> dict[str, float] | None:
    """The backend executables' tuning summaries (the TVM backend's ``run.tuning``) summed over partitions:
    kernels tuned now, reused from the tuning database, fallen back; GEMM path choices measured/reused;
    seconds spent tuning. None when nothing was tuned (no executable reports a summary)."""
    totals: dict[str, float] | None = None
    for exe in _executables(compiled):
        summary = getattr(exe, "tuning", None)
        if isinstance(summary, dict):
            totals = totals or dict.fromkeys(TUNING_COUNTS, 0)
            for key in TUNING_COUNTS:
                totals[key] += summary.get(key) or 0
    return totals


def kernel_path_counts(compiled: Any, gemm_only: bool = False) -> dict[str, int] | None:
    """{path: kernels} over ``kernel_paths(compiled)``; with ``gemm_only`` only the kernels that hold a
    GEMM/conv (``GEMM_OPS``). None when no executable reports kernel paths."""
    paths = kernel_paths(compiled)
    if paths is None:
        return None
    if gemm_only:
        paths = [p for p in paths if any(str(op).removesuffix(".default") in GEMM_OPS for op in p.get("ops", ()))]
    return dict(sorted(Counter(str(p.get("path", "?")) for p in paths).items()))


def _first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text.splitlines()[0] if text.strip() else type(e).__name__


def run_model(name: str, model: torch.nn.Module, inputs: tuple, contenders: list[Contender], warmup: int = 3,
              reps: int = 20, peaks: MachinePeaks | None = None, warm_compile: bool = False,
              output_scaled_atol: bool = False) -> dict[str, Any]:
    from kiln.numerics import compare

    model.eval()
    row: dict[str, Any] = {"model": name,
                           "inputs": ", ".join(f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"
                                               for x in inputs if isinstance(x, torch.Tensor))}
    with torch.no_grad():
        expected = model(*inputs)
    magnitude = None
    if output_scaled_atol:
        leaves = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor) and t.numel()]
        magnitude = max((t.detach().abs().max().item() for t in leaves), default=None)
    fns: dict[str, Callable] = {}
    graphs: dict[str, Any] = {}
    for c in contenders:
        before = _fxgraph_counters()
        try:
            fn, out, cold = _build_and_call(c, model, inputs)
        except Exception as e:  # a contender that cannot compile this model is a failed cell, not a crash
            log.warning("%s: %s failed: %s", name, c.name, _first_line(e))
            row[f"{c.name}_correct"], row[f"{c.name}_error"] = False, _first_line(e)
            if isinstance(e, UNAVAILABLE_ERRORS):
                row[f"{c.name}_unavailable"] = True
            continue
        if id(fn) in _BUILD_NOTES:
            row[f"{c.name}_note"] = _BUILD_NOTES.pop(id(fn))
        if c.kind != "eager":
            row[f"{c.name}_compile_s"] = cold
        if c.kind == "inductor":
            row[f"{c.name}_cold_cache"] = dict(_fxgraph_counters() - before)
        msg = compare(out, expected, "output", magnitude=magnitude)
        row[f"{c.name}_correct"] = msg is None
        if msg is not None:
            row[f"{c.name}_error"] = msg
        if c.kind == "kiln" and tuning_totals(fn) is not None:
            row[f"{c.name}_tuning"] = tuning_totals(fn)
        if getattr(fn, "cache", None) is not None:
            row[f"{c.name}_compile_cache"] = fn.cache
        if warm_compile and c.kind != "eager":
            before = _fxgraph_counters()
            try:
                fn, warm_out, row[f"{c.name}_compile_warm_s"] = _build_and_call(c, model, inputs)
                if c.kind == "kiln" and tuning_totals(fn) is not None:
                    row[f"{c.name}_tuning_warm"] = tuning_totals(fn)
                if getattr(fn, "cache", None) is not None:
                    row[f"{c.name}_compile_cache_warm"] = fn.cache
                msg = compare(warm_out, expected, "output of the warm build", magnitude=magnitude)
                if msg is not None:  # the warm build is the one timed: it must be right too
                    row[f"{c.name}_correct"], row[f"{c.name}_error"] = False, msg
            except Exception as e:  # the first build worked: keep it, report the second
                row[f"{c.name}_warm_error"] = _first_line(e)
            if c.kind == "inductor":
                row[f"{c.name}_warm_cache"] = dict(_fxgraph_counters() - before)
        fns[c.name] = fn
        if c.kind == "kiln":
            if getattr(fn, "graph", None) is not None:
                graphs[c.name] = fn.graph
            paths = kernel_path_counts(fn)
            if paths is not None:
                row[f"{c.name}_kernels"] = paths
                row[f"{c.name}_gemm_kernels"] = kernel_path_counts(fn, gemm_only=True)
    with torch.no_grad():  # a later reset dropped earlier Dynamo contenders' code: recompile each in its context
        for c in contenders:
            if c.name in fns and c.reset is not None:
                with _compiling(c):
                    fns[c.name](*inputs)
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
    add_speedups(row, contenders)
    first_kiln = next((c.name for c in contenders if c.kind == "kiln" and c.name in graphs), None)
    if first_kiln is not None and peaks is not None:
        _roofline_columns(row, graphs[first_kiln], [c.name for c in contenders if c.kind == "kiln"], peaks)
    row["reps"], row["warmup"] = reps, warmup
    return row


def _ok(row: dict[str, Any], name: str) -> bool:
    return bool(row.get(f"{name}_correct")) and f"{name}_ms" in row


def add_speedups(row: dict[str, Any], contenders: list[Contender]) -> None:
    """Fill ``best_peer``/``best_peer_ms`` and every ``<c>_speedup_vs_*`` of ``row`` from its ``_ms`` and
    ``_correct`` cells (None wherever either side is incorrect or missing)."""
    peers = [c.name for c in contenders if c.kind in PEER_KINDS and _ok(row, c.name)]
    best = min(peers, key=lambda n: row[f"{n}_ms"]) if peers else None
    row["best_peer"] = best
    row["best_peer_ms"] = row[f"{best}_ms"] if best else None
    for c in contenders:
        if c.kind == "eager" or f"{c.name}_ms" not in row:
            continue
        ok = _ok(row, c.name)
        ms = row[f"{c.name}_ms"]
        row[f"{c.name}_speedup_vs_eager"] = row["eager_ms"] / ms if ok and _ok(row, "eager") else None
        if c.kind == "kiln":
            row[f"{c.name}_speedup_vs_inductor"] = row[f"{INDUCTOR}_ms"] / ms if ok and _ok(row, INDUCTOR) else None
            row[f"{c.name}_speedup_vs_best_peer"] = row["best_peer_ms"] / ms if ok and best else None


def _roofline_columns(row: dict[str, Any], graph, kilns: list[str], peaks: MachinePeaks) -> None:
    from kiln.errors import KilnError
    from kiln.passes.analysis import graph_cost

    try:
        cost = graph_cost(graph)
    except KilnError as e:  # symbolic shapes
        row["roofline_error"] = str(e)
        return
    row["flops"], row["bytes"] = cost.flops, cost.bytes
    row["roofline_ms"] = max(cost.flops / peaks.flops_per_s, cost.bytes / peaks.bytes_per_s) * 1e3
    for name in kilns:
        if f"{name}_ms" in row:
            row[f"{name}_pct_of_roofline"] = 100 * row["roofline_ms"] / row[f"{name}_ms"]


def _geomean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return geomean(vals) if vals else None


def _max_of(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return max(vals) if vals else None


def _available(rows: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in rows if not r.get(f"{name}_unavailable")]


def headline_kiln(rows: list[dict[str, Any]], contenders: list[Contender]) -> str | None:
    kilns = [c for c in contenders if c.kind == "kiln"]
    usable = [c for c in kilns if _available(rows, c.name)]
    tuned = [c for c in usable if c.options.get("tune_trials")]
    pick = tuned[-1] if tuned else (usable[0] if usable else (kilns[0] if kilns else None))
    return pick.name if pick else None


def summarize(rows: list[dict[str, Any]], contenders: list[Contender]) -> dict[str, Any]:
    by: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    for c in contenders:
        if c.kind == "eager":
            continue
        n = c.name
        avail = _available(rows, n)
        by[n] = {"speedup_vs_eager_geomean": _geomean_of(rows, f"{n}_speedup_vs_eager"),
                 "all_correct": bool(rows) and all(r.get(f"{n}_correct", False) for r in rows),
                 "rows_correct": sum(bool(r.get(f"{n}_correct")) for r in rows),
                 "compile_s_max": _max_of(rows, f"{n}_compile_s"),
                 "compile_warm_s_max": _max_of(rows, f"{n}_compile_warm_s")}
        if c.kind == "kiln":
            by[n]["speedup_vs_inductor_geomean"] = _geomean_of(rows, f"{n}_speedup_vs_inductor")
            by[n]["speedup_vs_best_peer_geomean"] = _geomean_of(rows, f"{n}_speedup_vs_best_peer")
        if len(avail) < len(rows):
            reasons = dict.fromkeys(r.get(f"{n}_error", "?") for r in rows if r.get(f"{n}_unavailable"))
            unavailable[n] = by[n]["unavailable"] = "; ".join(reasons)
    head = headline_kiln(rows, contenders)
    main = by.get(head, {}) if head else {}
    kiln_cells = [r.get(f"{c.name}_correct", False) for c in contenders if c.kind == "kiln"
                  for r in _available(rows, c.name)]
    peer_cells = [r.get(f"{c.name}_correct", False) for c in contenders if c.kind in PEER_KINDS
                  for r in _available(rows, c.name)]
    return {
        "speedup_vs_eager_geomean": main.get("speedup_vs_eager_geomean"),
        "speedup_vs_inductor_geomean": main.get("speedup_vs_inductor_geomean"),
        "speedup_vs_best_peer_geomean": main.get("speedup_vs_best_peer_geomean"),
        "all_correct": bool(kiln_cells) and all(kiln_cells),
        "warm_compile_s_max": main.get("compile_warm_s_max"),
        "kiln_contender": head,
        "peers_all_correct": all(peer_cells),
        "models": len(rows),
        "unavailable": unavailable,
        "by_contender": by,
    }


def _cell_time(row: dict[str, Any], name: str) -> str | None:
    if f"{name}_ms" not in row:
        return "n/a" if row.get(f"{name}_unavailable") else ("FAILED" if f"{name}_error" in row else None)
    text = f"{row[f'{name}_ms']:.3g} ({row[f'{name}_min_ms']:.3g}-{row[f'{name}_max_ms']:.3g})"
    return text if row.get(f"{name}_correct") else text + " WRONG"


def _cell_compile(row: dict[str, Any], name: str) -> str | None:
    cold, warm = row.get(f"{name}_compile_s"), row.get(f"{name}_compile_warm_s")
    if cold is None:
        return None
    text = f"{cold:.3g} / {warm:.3g}" if warm is not None else f"{cold:.3g}"
    if row.get(f"{name}_compile_cache_warm") == "hit":
        text += " (cache hit)"
    return text


def display_rows(rows: list[dict[str, Any]], contenders: list[Contender]) -> tuple[list[dict], list[str],
                                                                                     list[dict], list[str]]:
    """Two printable tables: times and speed-ups; compile times, kernel paths and roofline."""
    kilns = [c.name for c in contenders if c.kind == "kiln"]
    times, comp = [], []
    tcols = ["model"] + [f"{c.name} ms" for c in contenders] + ["best peer"]
    for k in kilns:
        tcols += [f"{k} vs eager", f"{k} vs inductor", f"{k} vs best peer"]
    ccols = ["model"] + [f"{c.name} compile s (cold / warm)" for c in contenders if c.kind != "eager"]
    ccols += [f"{k} kernels" for k in kilns] + ["roofline ms"] + [f"{k} % of roofline" for k in kilns]
    for r in rows:
        t: dict[str, Any] = {"model": r["model"], "best peer": r.get("best_peer")}
        for c in contenders:
            t[f"{c.name} ms"] = _cell_time(r, c.name)
        for k in kilns:
            t[f"{k} vs eager"] = r.get(f"{k}_speedup_vs_eager")
            t[f"{k} vs inductor"] = r.get(f"{k}_speedup_vs_inductor")
            t[f"{k} vs best peer"] = r.get(f"{k}_speedup_vs_best_peer")
        times.append(t)
        m: dict[str, Any] = {"model": r["model"], "roofline ms": r.get("roofline_ms")}
        for c in contenders:
            if c.kind != "eager":
                m[f"{c.name} compile s (cold / warm)"] = _cell_compile(r, c.name)
        for k in kilns:
            paths = r.get(f"{k}_kernels")
            m[f"{k} kernels"] = ", ".join(f"{v} {p}" for p, v in paths.items()) if paths else None
            for key, when in (("tuning", "cold"), ("tuning_warm", "warm")):
                t = r.get(f"{k}_{key}")
                if t and m[f"{k} kernels"]:
                    m[f"{k} kernels"] += (f"; {when}: {t['tuned']:g} tuned, {t['reused']:g} from the tuning "
                                          f"database, {t['tuning_s']:.0f} s tuning")
            m[f"{k} % of roofline"] = r.get(f"{k}_pct_of_roofline")
        comp.append(m)
    return times, tcols, comp, ccols


def columns(contenders: list[Contender]) -> list[str]:
    """The JSON row keys of the main figures, in table order."""
    cols = ["model"]
    for c in contenders:
        cols += [f"{c.name}_ms", f"{c.name}_min_ms", f"{c.name}_max_ms"]
    cols += ["best_peer"]
    for c in contenders:
        if c.kind != "eager":
            cols += [f"{c.name}_speedup_vs_eager"]
            if c.kind == "kiln":
                cols += [f"{c.name}_speedup_vs_inductor", f"{c.name}_speedup_vs_best_peer"]
    cols += [f"{c.name}_correct" for c in contenders]
    cols += [f"{c.name}_compile_s" for c in contenders if c.kind != "eager"]
    kilns = [c.name for c in contenders if c.kind == "kiln"]
    if kilns:
        cols += ["roofline_ms"] + [f"{k}_pct_of_roofline" for k in kilns]
    return cols


def print_results(rows: list[dict[str, Any]], summary: dict[str, Any], contenders: list[Contender],
                  out: Callable[[str], Any] = print) -> None:
    times, tcols, comp, ccols = display_rows(rows, contenders)
    out(f"torch threads: {torch.get_num_threads()}; times in ms: median (min-max) over the timed reps; "
        "speed-ups = other time / kiln time, blank when either output does not match eager (WRONG) or the "
        "contender failed (FAILED) or is not available (n/a); best peer = fastest correct of "
        f"{', '.join(c.name for c in contenders if c.kind in PEER_KINDS) or 'none'}")
    out(markdown_table(times, tcols))
    out("")
    out("compile: cold = first build + call in this process; warm = a second one after dropping the process's "
        "compile caches (Dynamo, kiln's in-memory kernels), served by the on-disk caches")
    out(markdown_table(comp, ccols))
    for r in rows:
        for c in contenders:
            for key, what in (("error", ""), ("warm_error", " (warm compile)"), ("note", " (note)")):
                if r.get(f"{c.name}_{key}"):
                    out(f"{r['model']}: {c.name}{what}: {r[f'{c.name}_{key}']}")
    shown = {k: v for k, v in summary.items() if k not in ("by_contender", "unavailable")}
    out("summary: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    for name, reason in summary.get("unavailable", {}).items():
        out(f"unavailable: {name}: {reason}")


def write_json(path: str, rows: list[dict[str, Any]], summary: dict[str, Any], contenders: list[Contender],
               extra: dict[str, Any] | None = None) -> None:
    meta = {"contenders": [{"name": c.name, "kind": c.kind, **c.options} for c in contenders], **(extra or {})}
    write_report(path, rows, summary, meta)
