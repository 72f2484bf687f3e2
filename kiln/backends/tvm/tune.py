"""MetaSchedule tuning of kiln's TIR kernels, with a persistent record per workload and a measured choice.

Contract:
- ``tune_prim_func(func, target, trials, seed=0, time_s=90) -> (trace_json, best_seconds, stopped) | None``:
  MetaSchedule (one ``TuneContext`` through ``tune_tasks``, evolutionary search) measures up to ``trials``
  candidate schedules of ``func`` — the budget is per kernel: one kernel is one MetaSchedule task, ``trials``
  is its ``max_trials_global`` — and returns the best one's trace (TVM's JSON, as a string) and its measured
  time, or None when no candidate built and ran. The search also stops after a round that measured no new
  candidate (MetaSchedule alone would re-sample forever on a design space smaller than ``trials``: seen
  here on a Mamba epilogue kernel, ~20 s a round) or after the round that passes ``time_s`` seconds (the
  backend option ``tune_kernel_s``); ``stopped`` then says which. Kernels of more than ``MAX_TUNED_OPS``
  ops are not tuned at all (kiln's default schedule; ``stopped`` says so). Candidates are built and timed
  *in this process* (``InProcessBuilder``/``InProcessRunner``): MetaSchedule's popen workers re-import TVM's tensor
  intrinsics per worker (measured here: ~45 s per build on 2 busy cores, every build timed out at 30 s).
  The cost model is XGBoost when ``xgboost`` is installed, else MetaSchedule's random model (the search
  still runs its evolutionary rounds over valid candidates); the population shrinks with the budget
  (``population_size``). Weights stay ordinary parameters (the
  ``layout_free_buffers`` attribute is dropped): a kernel is shared by every model with the same shapes.
- ``TracedSchedule(trace_json)``: a schedule function (``func -> IRModule``) replaying a tuned trace;
  its ``schedule_id`` (``ms-trace:<sha256>``) keys the compiled-kernel cache, so tuned and untuned
  kernels of one workload never collide.
- ``measure(fn, inputs)``: median seconds per call of a Python callable (warm-up, then repeats of a
  calibrated number of calls); ``measure_against(candidates, inputs)`` times several with their
  repeats interleaved and a pause before each (TVM's spinning thread pool would otherwise slow down
  whatever is timed after a parallel TVM kernel): what both sides of every kiln choice are timed with.
- ``KernelTuner(trials, target, kernel_cache, db)``: what the backend calls per kernel.
  ``tuner.kernel(graph) -> (TVMKernel, info)``: looks the workload up in the ``TuningDatabase``; on a miss
  it tunes, builds the tuned kernel and kiln's untuned ``schedule_cpu`` kernel, times both on random
  inputs of the kernel's real shapes, keeps the faster and stores the record (trace, both times,
  choice, trials). A tuning that finds nothing valid (or that TVM rejects) falls back to
  ``schedule_cpu`` with a ``KilnTuningWarning`` and is recorded, so it is not retried at the same budget.
  The record key is kiln's canonical text of the kernel plus the structural hash of its PrimFunc (a
  change of kiln's lowering makes a new key) and the untuned schedule's ``schedule_id`` (a record
  compares against ``schedule_cpu``: a new version of it, e.g. the GEMM template, is measured anew,
  for kernel and GEMM-choice records alike); a stored trace that TVM cannot replay is ignored with a
  ``KilnCacheWarning`` and the kernel re-tuned.
  ``tuner.choose(workload_text, name, build, input_types)``: the GEMM/conv group choice — ``build(path)``
  gives the callable for ``"tvm"`` or ``"torch"``; on a miss both are built and timed on random inputs of
  ``input_types`` and the choice recorded (a TIR build that fails means ``"torch"``, with a warning); on a
  hit only the chosen one is built. ``tuner.stats`` counts tuned / reused / fell back kernels and
  tuning seconds; ``tuner.summary()`` is a dict for reports; ``tuner.print_summary()`` prints a rich
  table to stderr when progress bars are on (a terminal), and logs one line otherwise.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import statistics
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import Schedule
from tvm_ffi import structural_hash

from kiln.ir.graph import Graph
from kiln.ir.ops import WEIGHT
from kiln.ir.types import TensorType
from kiln.logs import progress, progress_enabled

from .cache import KernelCache, KilnCacheWarning, canonical_text
from .kernel import TVMKernel, graph_prim_func, schedule_id
from .schedule import inline_producers, schedule_cpu
from .tune_db import TuningDatabase, record_key

log = logging.getLogger(__name__)


class KilnTuningWarning(UserWarning):
    """Tuning found no valid schedule (or TVM refused the workload): kiln's default schedule is used."""


def _load_cpu_intrinsics() -> None:
    """Register TVM's x86/ARM tensor intrinsics without importing its CUDA ones.

    ``tvm.s_tir.tensor_intrin``'s package ``__init__`` parses hundreds of CUDA intrinsics with TVMScript
    (measured here: 47 s). MetaSchedule's CPU rules only look up the CPU ones, so the package is
    registered as an empty namespace and only its CPU modules are imported (0.3 s)."""
    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        package = types.ModuleType(name)
        package.__path__ = list(spec.submodule_search_locations)
        package.__package__ = name
        package.__spec__ = spec
        sys.modules[name] = package
    for sub in ("x86", "arm_cpu"):
        importlib.import_module(f"{name}.{sub}")


def strip_layout_free(func):
    """``func`` without ``layout_free_buffers``: MetaSchedule must not rewrite weight layouts (kiln binds
    weights at call time and shares a kernel between models)."""
    attrs = func.attrs
    return func.without_attr("layout_free_buffers") if attrs is not None and "layout_free_buffers" in attrs \
        else func


# -- in-process builder and runner -----------------------------------------------------------------

_BUILT: dict[str, Any] = {}


def _ms():
    import tvm.s_tir.meta_schedule as ms  # imported lazily: MetaSchedule costs seconds to import

    return ms


def _make_builder_runner():
    ms = _ms()
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.runner import PyRunner
    from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for inp in build_inputs:
                try:
                    built = tvm.compile(inp.mod, target=inp.target)
                except Exception as e:  # a candidate TVM cannot compile is a failed trial, not an error
                    results.append(BuilderResult(None, f"{type(e).__name__}: {e}"[:4000]))
                    continue
                key = f"kiln-inprocess-{id(built)}-{len(_BUILT)}"
                _BUILT[key] = built
                results.append(BuilderResult(key, None))
            return results

    @derived_object
    class InProcessRunner(PyRunner):
        def run(self, runner_inputs):
            futures = []
            for inp in runner_inputs:
                built = _BUILT.pop(inp.artifact_path, None)
                try:
                    args = [_random_tvm_tensor(info) for info in inp.args_info]
                    timer = built.mod.time_evaluator("main", tvm.cpu(), number=3, repeat=3, min_repeat_ms=0)
                    costs = list(timer(*args).results)
                    futures.append(LocalRunnerFuture(res=[float(min(costs))]))
                except Exception as e:  # a candidate that fails at run time is a failed trial
                    futures.append(LocalRunnerFuture(error_message=f"{type(e).__name__}: {e}"[:4000]))
            return futures

    return InProcessBuilder(), InProcessRunner(), ms


DEFAULT_KERNEL_TIME_S = 90.0  # a kernel's MetaSchedule search stops after the round that passes this
# Kernels of more ops than this are not given to MetaSchedule: its design space grows with the blocks, and a
# Mamba scan kernel (383 ops, 385 blocks: the time loop unrolled) did not finish generating its first
# candidates in minutes, at 13 GB of memory. Such a kernel keeps kiln's default schedule.
MAX_TUNED_OPS = 64


def _stop_callback(deadline_s: float, trials: int):
    """A measure callback that ends the (single) task when a search round brought no new candidate — the
    evolutionary search found no unmeasured schedule: a tiny design space, e.g. a scan kernel, where
    MetaSchedule would otherwise re-sample its population (~20 s a round here) forever, since its task ends
    only after ``max_trials`` measurements — or when the kernel's time budget (seconds from now) is spent
    before its ``trials``.
    ``.stopped`` says why it stopped (None: the trial budget ended it)."""
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class StopWhenDone(PyMeasureCallback):
        def __init__(self):
            self.deadline = time.perf_counter() + deadline_s
            self.stopped: str | None = None
            self.measured = 0

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            if self.stopped is not None:
                return
            self.measured += len(measure_candidates)
            if not measure_candidates:
                self.stopped = f"search exhausted after {self.measured} candidates"
            elif self.measured < trials and time.perf_counter() > self.deadline:
                self.stopped = f"time budget of {deadline_s:g} s spent after {self.measured} candidates"
            if self.stopped is not None:
                task_scheduler.terminate_task(task_id)

    return StopWhenDone()


def _random_tvm_tensor(info):
    shape = [int(d) for d in info.shape]
    dtype = str(info.dtype)
    try:
        data = np.random.default_rng(0).uniform(-1, 1, shape).astype(dtype)
    except TypeError:  # a dtype numpy lacks (bfloat16): uninitialised memory is enough to time a kernel
        return tvm.runtime.empty(shape, dtype)
    return tvm.runtime.tensor(data)


def _cost_model() -> str:
    return "xgb" if importlib.util.find_spec("xgboost") is not None else "random"


def trials_per_round(trials: int) -> int:
    """Candidates measured per search round: rounds of 16 let a learned cost model (XGBoost) steer the
    next round; the random model learns nothing, so its budget is spent in one round."""
    return min(trials, 16 if _cost_model() == "xgb" else 64)


def population_size(trials: int) -> int:
    """The evolutionary search's population: MetaSchedule's 512 from 64 trials, smaller below (8 per
    trial, at least 64) — a tiny budget need not mutate 512 candidates per round."""
    return min(512, max(64, 8 * trials))


def tune_prim_func(func, target, trials: int, seed: int = 0,
                   time_s: float = DEFAULT_KERNEL_TIME_S) -> tuple[str, float, str | None] | None:
    """Tune ``func`` with ``trials`` measured candidates (fewer when the search is exhausted or ``time_s``
    is spent); (trace json, best seconds, why it stopped early or None) or None."""
    _load_cpu_intrinsics()
    builder, runner, ms = _make_builder_runner()
    func = strip_layout_free(func)
    from tvm.s_tir.meta_schedule.tune_context import TuneContext

    # one task, built here rather than by ``tune_tir``: tune_tir re-configures Python logging for a work
    # dir on every call (and breaks on handlers it did not name); MetaSchedule's log goes to kiln's logger
    task = TuneContext(mod=tvm.IRModule({"main": func}), target=target, space_generator="post-order-apply",
                       search_strategy=ms.search_strategy.EvolutionarySearch(
                           population_size=population_size(trials),
                           init_min_unmeasured=min(50, population_size(trials))),
                       task_name="main", rand_state=seed,
                       num_threads=max(1, int(target.attrs.get("num-cores", 1))),
                       logger=logging.getLogger("kiln.backends.tvm.metaschedule")).clone()
    stop = _stop_callback(time_s, trials)
    with tempfile.TemporaryDirectory(prefix="kiln-tune-") as work_dir:
        database = ms.tune.tune_tasks(
            tasks=[task], task_weights=[1.0], work_dir=work_dir, max_trials_global=trials,
            num_trials_per_iter=trials_per_round(trials), builder=builder, runner=runner,
            database=ms.database.MemoryDatabase(), cost_model=_cost_model(),
            measure_callbacks=[ms.measure_callback.AddToDatabase(), ms.measure_callback.UpdateCostModel(), stop],
            task_scheduler="round-robin")
    _BUILT.clear()
    if stop.stopped is not None:
        log.info("MetaSchedule stopped early (%s)", stop.stopped)
    mod = tvm.IRModule({"main": func})
    workload = database.commit_workload(mod)
    top = database.get_top_k(workload, 1)
    if not top:
        return None
    best = top[0]
    seconds = [float(s) for s in best.run_secs] if best.run_secs is not None else []
    return tvm.ir.save_json(best.trace.as_json()), (min(seconds) if seconds else float("nan")), stop.stopped


PREPARATIONS = ("none", "inline")


def prepare(func, preparation: str):
    """The PrimFunc MetaSchedule tunes: ``"none"``: as lowered; ``"inline"``: non-output spatial blocks
    inlined first (``schedule.inline_producers``), the retry when MetaSchedule's rules reject the former
    (e.g. a reshape block between a conv and its consumer)."""
    func = strip_layout_free(func)
    return inline_producers(func) if preparation == "inline" else func


class TracedSchedule:
    """Replays a MetaSchedule trace on a kernel's PrimFunc (a schedule function for ``TVMKernel``)."""

    SCHEDULE_VERSION = "1"

    def __init__(self, trace_json: str, preparation: str = "none"):
        self.trace_json, self.preparation = trace_json, preparation
        digest = hashlib.sha256(f"{preparation}\n{trace_json}".encode()).hexdigest()
        self.schedule_id = f"ms-trace:{digest}"

    def __call__(self, func) -> tvm.IRModule:
        from tvm.s_tir.schedule import Trace

        _load_cpu_intrinsics()
        sch = Schedule(tvm.IRModule({"main": prepare(func, self.preparation)}))
        Trace.apply_json_to_schedule(tvm.ir.load_json(self.trace_json), sch)
        return sch.mod


# -- timing ----------------------------------------------------------------------------------------

def _calibrate(fn: Callable, inputs: Sequence[torch.Tensor], min_repeat_s: float) -> int:
    fn(*inputs)  # warm-up (first-call allocations, page faults)
    start = time.perf_counter()
    fn(*inputs)
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, min(1000, int(min_repeat_s / once)))


def _block(fn: Callable, inputs: Sequence[torch.Tensor], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn(*inputs)
    return (time.perf_counter() - start) / number


def measure(fn: Callable, inputs: Sequence[torch.Tensor], repeats: int = 5, min_repeat_s: float = 2e-3) -> float:
    """Median seconds per call of ``fn(*inputs)`` over ``repeats`` repeats of a calibrated call count."""
    number = _calibrate(fn, inputs, min_repeat_s)
    return statistics.median(_block(fn, inputs, number) for _ in range(repeats))


def measure_against(candidates: dict[str, Callable], inputs: Sequence[torch.Tensor], repeats: int = 5,
                    min_repeat_s: float = 2e-3, pause_s: float = 0.02) -> dict[str, float]:
    """Median seconds per call of each candidate, their repeats interleaved (the order rotating) with a
    pause before each: TVM's thread pool spins after a parallel kernel and would steal the cores from
    whatever runs next (measured: PyTorch's GEMM 40x slower right after a tuned TVM GEMM on 2 cores)."""
    names = list(candidates)
    numbers = {n: _calibrate(candidates[n], inputs, min_repeat_s) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(pause_s)
            times[n].append(_block(candidates[n], inputs, numbers[n]))
    return {n: statistics.median(t) for n, t in times.items()}


def random_inputs(types_: Sequence[TensorType], seed: int = 0) -> list[torch.Tensor]:
    """Inputs of the given types for timing: normal floats, small non-negative integers, random bools."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in types_:
        shape = [int(d) for d in t.shape]
        if t.dtype == torch.bool:
            out.append(torch.rand(shape, generator=gen) > 0.5)
        elif t.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(t.dtype))
        else:
            out.append(torch.zeros(shape, dtype=t.dtype))  # a valid index for any gather
    return out


# -- the per-kernel tuner --------------------------------------------------------------------------

@dataclass
class TunerStats:
    tuned: int = 0        # kernels tuned in this compile
    reused: int = 0       # kernels whose record came from the database
    fell_back: int = 0    # tunings that found nothing valid: kiln's default schedule
    skipped: int = 0      # kernels too large to tune (MAX_TUNED_OPS): kiln's default schedule
    choices: int = 0      # GEMM/conv TIR-vs-PyTorch choices measured in this compile
    choices_reused: int = 0
    tuning_s: float = 0.0
    kernels: list[dict] = field(default_factory=list)


class KernelTuner:
    def __init__(self, trials: int, target, kernel_cache: KernelCache | None, db: TuningDatabase,
                 seed: int = 0, time_s: float = DEFAULT_KERNEL_TIME_S):
        self.trials, self.target, self.kernel_cache, self.db, self.seed = trials, target, kernel_cache, db, seed
        self.time_s = time_s
        self.stats = TunerStats()
        self._bar = None

    # progress: one bar over the kernels of a compile
    def __enter__(self) -> KernelTuner:
        self._progress = progress("tuning TVM kernels", total=0)
        self._bar = self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)
        self._bar = None

    def _start(self, name: str) -> None:
        if self._bar is not None:
            self._bar.update(total=(self._bar.total or 0) + 1, description=f"tuning {name}")

    def _done(self) -> None:
        if self._bar is not None:
            self._bar.advance()

    def kernel(self, graph: Graph) -> tuple[TVMKernel, dict]:
        """The kernel for ``graph`` with the faster of its tuned and untuned schedules, and what was measured."""
        lowered = graph_prim_func(graph)
        # kiln's canonical IR text and the structural hash of the PrimFunc kiln lowers it to: a change of
        # kiln's lowering gives a new key rather than a trace that no longer applies
        workload = (f"{canonical_text(graph)}\nprimfunc:{structural_hash(strip_layout_free(lowered))}"
                    f"\nuntuned:{schedule_id(schedule_cpu)}")
        key = record_key("kernel", workload, self.target)
        self._start(graph.name)
        try:
            record = self.db.get(key, min_trials=self.trials)
            kernel = self._build(graph, record) if record is not None else None
            if kernel is not None:
                self.stats.reused += 1
                info = {"source": "database"}
            else:
                record, info = self._tune(graph, lowered), {"source": "tuned"}
                self.db.put(key, record)
                kernel = self._build(graph, record, strict=True)
            info.update(tuned=record["choice"] == "tuned", tuned_s=record.get("tuned_s"),
                        untuned_s=record.get("untuned_s"), trials=record["trials"],
                        **({"stopped": record["stopped"]} if record.get("stopped") else {}))
            ops = sorted({n.op.name.removeprefix("aten.") for n in graph.nodes if n.op is not WEIGHT})
            self.stats.kernels.append({"kernel": graph.name, "ops": ",".join(ops), **info})
            return kernel, info
        finally:
            self._done()

    def _build(self, graph: Graph, record: dict, strict: bool = False) -> TVMKernel | None:
        """The kernel a record describes; None (with a warning) when a stored trace no longer applies."""
        if record["choice"] != "tuned":
            return TVMKernel(graph, self.target, schedule_cpu, cache=self.kernel_cache)
        schedule = TracedSchedule(record["trace"], record.get("preparation", "none"))
        try:
            return TVMKernel(graph, self.target, schedule, cache=self.kernel_cache)
        except Exception as e:  # a trace TVM cannot replay on this function: re-tune rather than crash
            if strict:
                raise
            warnings.warn(f"kiln: ignoring TVM tuning record for @{graph.name}: its trace does not apply "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})", KilnCacheWarning, stacklevel=4)
            return None

    def _tune(self, graph: Graph, lowered) -> dict:
        ops = sum(n.op is not WEIGHT for n in graph.nodes)
        if ops > MAX_TUNED_OPS:
            untuned = TVMKernel(graph, self.target, schedule_cpu, cache=self.kernel_cache)
            self.stats.skipped += 1
            return {"trials": self.trials, "choice": "untuned", "trace": None, "tuned_s": None,
                    "untuned_s": measure(untuned, random_inputs(untuned.input_types, self.seed)),
                    "stopped": f"not tuned: {ops} ops, over MAX_TUNED_OPS={MAX_TUNED_OPS}"}
        start = time.perf_counter()
        found, failures, preparation = None, [], "none"
        for preparation in PREPARATIONS:
            try:
                found = tune_prim_func(prepare(lowered, preparation), self.target, self.trials, self.seed,
                                       time_s=self.time_s)
            except Exception as e:  # TVM's rules reject some workloads; the next form, or kiln's schedule
                failures.append(f"{preparation}: MetaSchedule failed: {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]}")
                continue
            if found is not None:
                break
            failures.append(f"{preparation}: no candidate schedule built and ran")
        failure = "; ".join(failures) if found is None else None
        self.stats.tuning_s += time.perf_counter() - start
        untuned = TVMKernel(graph, self.target, schedule_cpu, cache=self.kernel_cache)
        inputs = random_inputs(untuned.input_types, self.seed)
        if found is None:
            untuned_s = measure(untuned, inputs)
            self.stats.fell_back += 1
            warnings.warn(f"kiln: tuning kernel @{graph.name} with {self.trials} trials: {failure}; "
                          "using kiln's default schedule", KilnTuningWarning, stacklevel=4)
            return {"trials": self.trials, "choice": "untuned", "trace": None, "tuned_s": None,
                    "untuned_s": untuned_s, "failure": failure}
        trace, ms_best_s, stopped = found
        self.stats.tuned += 1
        tuned = TVMKernel(graph, self.target, TracedSchedule(trace, preparation), cache=self.kernel_cache)
        times = measure_against({"tuned": tuned, "untuned": untuned}, inputs)
        tuned_s, untuned_s = times["tuned"], times["untuned"]
        return {"trials": self.trials, "choice": "tuned" if tuned_s <= untuned_s else "untuned", "trace": trace,
                "preparation": preparation, "tuned_s": tuned_s, "untuned_s": untuned_s,
                "metaschedule_s": ms_best_s, **({"stopped": stopped} if stopped else {})}

    def choose(self, workload_text: str, name: str, build: Callable[[str], Callable],
               inputs_types: Sequence[TensorType]) -> tuple[str, Callable, dict]:
        """``"tvm"`` or ``"torch"`` for a GEMM/conv group, by measurement (recorded) or from the record."""
        key = record_key("gemm-choice", f"{workload_text}\nuntuned:{schedule_id(schedule_cpu)}", self.target)
        record = self.db.get(key, min_trials=self.trials)
        if record is not None:
            self.stats.choices_reused += 1
            return record["path"], build(record["path"]), record
        candidates = {"torch": build("torch")}
        try:
            candidates["tvm"] = build("tvm")
        except Exception as e:  # TVM could not compile the TIR GEMM kernel: PyTorch's kernel it is
            warnings.warn(f"kiln: GEMM/conv kernel @{name} in TIR failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}); using PyTorch's kernel", KilnTuningWarning, stacklevel=4)
            record = {"trials": self.trials, "path": "torch", "tvm_s": None, "torch_s": None,
                      "failure": f"{type(e).__name__}"}
            self.db.put(key, record)
            self.stats.kernels.append({"kernel": name, "source": "choice", **record})
            return "torch", candidates["torch"], record
        inputs = random_inputs(inputs_types, self.seed)
        times = measure_against(candidates, inputs)
        path = min(times, key=times.get)
        record = {"trials": self.trials, "path": path, "tvm_s": times["tvm"], "torch_s": times["torch"]}
        self.db.put(key, record)
        self.stats.choices += 1
        self.stats.kernels.append({"kernel": name, "source": "choice", **record})
        return path, candidates[path], record

    def summary(self) -> dict:
        s = self.stats
        speedups = [k["untuned_s"] / k["tuned_s"] for k in s.kernels
                    if k.get("tuned_s") and k.get("untuned_s")]
        return {"trials_per_kernel": self.trials, "tuned": s.tuned, "reused": s.reused, "fell_back": s.fell_back,
                "skipped": s.skipped,
                "gemm_choices_measured": s.choices, "gemm_choices_reused": s.choices_reused,
                "tuning_s": round(s.tuning_s, 3),
                "speedup_vs_untuned_geomean": (float(np.exp(np.mean(np.log(speedups)))) if speedups else None),
                "kernels": s.kernels}

    def print_summary(self) -> None:
        summary = self.summary()
        line = (f"TVM tuning: {summary['tuned']} kernels tuned, {summary['reused']} reused from the database, "
                f"{summary['fell_back']} fell back to the default schedule, {summary['skipped']} too large to "
                f"tune, {summary['tuning_s']:.1f} s tuning"
                f"; GEMM/conv choices: {summary['gemm_choices_measured']} measured, "
                f"{summary['gemm_choices_reused']} reused")
        if not progress_enabled() or not summary["kernels"]:
            log.info(line)
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=line, title_justify="left")
        texts = ("kernel", "ops", "source", "choice")
        for col in (*texts, "tuned µs", "untuned µs", "untuned/tuned", "tvm µs", "torch µs"):
            table.add_column(col, justify="left" if col in texts else "right")

        def us(x):
            return f"{x * 1e6:.1f}" if isinstance(x, float) else "-"

        for k in summary["kernels"]:
            choice = k.get("path") or ("tuned" if k.get("tuned") else "untuned")
            speed = (f"{k['untuned_s'] / k['tuned_s']:.2f}x" if k.get("tuned_s") and k.get("untuned_s") else "-")
            table.add_row(k["kernel"], k.get("ops", "-"), k["source"], choice, us(k.get("tuned_s")),
                          us(k.get("untuned_s")), speed, us(k.get("tvm_s")), us(k.get("torch_s")))
        Console(stderr=True).print(table)


def tuning_enabled(options: dict) -> int:
    """The validated ``tune_trials`` option: 0 when tuning is off."""
    from kiln.errors import KilnInputError

    trials = options.get("tune_trials")
    if trials is None:
        return 0
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise KilnInputError(f"tune_trials must be an integer >= 0 (trials per kernel), got {trials!r}")
    return trials


def tune_kernel_seconds(options: dict) -> float:
    """The validated ``tune_kernel_s`` option: MetaSchedule's time budget per kernel, in seconds."""
    from kiln.errors import KilnInputError

    value = options.get("tune_kernel_s", DEFAULT_KERNEL_TIME_S)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise KilnInputError(f"tune_kernel_s must be a number of seconds > 0 (per kernel), got {value!r}")
    return float(value)


GEMM_MODES = ("auto", "tvm", "torch")


def gemm_mode(options: dict) -> str:
    from kiln.errors import KilnInputError

    mode = options.get("gemm", "auto")
    if mode not in GEMM_MODES:
        raise KilnInputError(f"gemm must be one of {', '.join(GEMM_MODES)}, got {mode!r}")
    return mode

