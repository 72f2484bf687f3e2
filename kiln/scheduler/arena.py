"""Arena planners: give every activation buffer a byte offset in one arena, as small as we can make it.

Contract:
- Every planner takes ``buffers`` (``Buffer`` with unique names) and an ``alignment`` in bytes (a
  positive int), and returns an ``ArenaPlan`` that passes ``check_plan``: every offset is a multiple
  of ``alignment``, buffers live together never overlap in memory, and ``size`` is the top of the
  highest buffer (not rounded up). ``lower_bound`` is at least ``live_bytes_lower_bound(buffers)``.
- Zero-size buffers get offset 0 and never conflict with anything. No buffers: a plan of size 0.
- ``plan_greedy_by_size``: TFLite Micro's greedy planner. Buffers by decreasing size (ties: earlier
  start, then name); each goes into the lowest aligned gap, among already placed buffers live with it,
  that fits.
- ``plan_best_fit``: buffers by start (ties: larger first, then name); each goes into the smallest
  aligned gap among the placed buffers still live (the space between the top live buffer and the
  arena's current top counts as a gap); if none fits it goes on top of the live buffers.
- ``plan_cpsat``: OR-Tools CP-SAT over offsets (in units of ``alignment``, so the model stays small)
  minimising the arena size, warm-started (hint and upper bound) from ``warm_start`` or, by default,
  the better of the two greedy plans. Never worse than that plan; when the solver finds nothing better
  in ``time_limit_s`` the warm start's offsets come back, still with method "cpsat", and
  ``stats["kept_warm_start"] == 1``. ``optimal`` is True iff the solver proved optimality;
  ``lower_bound`` is the best of the live-bytes bounds and the solver's bound; ``stats`` holds the status
  name, conflicts, branches, the solver's wall time and the warm start's size. ``time_limit_s`` bounds
  the whole call (greedy plans and model building included), give or take reading back the solution.
  Formulation: one memory interval (offset, padded size) per buffer and one ``AddNoOverlap2D`` with the
  fixed time intervals [start, end + 1); CP-SAT's presolve turns it into one 1-D no-overlap per maximal
  set of buffers live together. The alternative, a Boolean "a below b" / "b below a" disjunction per
  pair of buffers live together, was measured on 30 seeded realistic sets (51-288 buffers, log-normal
  sizes, 5 s, 2 workers, one run after the other on a 2-core machine): arena / lower bound geomean
  1.0112 and 8/30 proved optimal for pairwise (every literal hinted from the warm start; worse still
  without), against 1.0029-1.0030 and 16-17/30 (two runs) for NoOverlap2D; pairwise also spends up to
  0.4 s in Python building its ~10k disjunctions. Runs of the same model vary by a few 0.001 in that
  geomean: the 2-worker search is not deterministic.
  The model's arena variable is bounded below by ``aligned_live_lower_bound`` (the live-bytes bound
  with padding), which lets the solver prove optimality when alignment padding is what is left.
- ``plan_arena(buffers, method=...)`` dispatches on "cpsat", "greedy" or "best-fit"; anything else is a
  ``KilnInputError`` listing the methods.

Anchors: TFLite Micro's GreedyMemoryPlanner; MODeL / OLLA (integer programs over offsets).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kiln.errors import KilnError, KilnInputError
from kiln.scheduler.buffers import ArenaPlan, Buffer, check_plan, live_bytes_lower_bound

# ---------------------------------------------------------------------------------------------- helpers


def _align_up(x: int, alignment: int) -> int:
    return -(-x // alignment) * alignment


def _validate(buffers: list[Buffer], alignment: int) -> None:
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
        raise KilnInputError(f"arena alignment must be a positive int, got {alignment!r}")
    seen: set[str] = set()
    for b in buffers:
        if b.name in seen:
            raise KilnInputError(f"arena buffers must have unique names; '{b.name}' appears twice")
        seen.add(b.name)


def _arena_top(buffers: list[Buffer], offsets: dict[str, int]) -> int:
    return max((offsets[b.name] + b.size for b in buffers), default=0)


def _finish(buffers: list[Buffer], offsets: dict[str, int], method: str, solve_s: float) -> ArenaPlan:
    """A heuristic's plan: zero-size buffers at 0, size = top buffer, optimal iff it meets the bound."""
    for b in buffers:
        offsets.setdefault(b.name, 0)
    size = _arena_top(buffers, offsets)
    bound = live_bytes_lower_bound(buffers)
    return ArenaPlan(offsets, size, method, lower_bound=bound, optimal=True if size == bound else None,
                     solve_s=solve_s)


def _first_fit(size: int, occupied: list[tuple[int, int]], alignment: int) -> int:
    """Lowest aligned offset where [offset, offset + size) misses every (lo, hi) in ``occupied``."""
    candidate = 0
    for lo, hi in sorted(occupied):
        if candidate + size <= lo:
            break
        candidate = max(candidate, _align_up(hi, alignment))
    return candidate


def _best_fit(size: int, occupied: list[tuple[int, int]], top: int, alignment: int) -> int:
    """Aligned start of the smallest gap that holds ``size`` bytes, between the (lo, hi) blocks in
    ``occupied`` or between the highest of them and the arena's ``top``; else the aligned top of
    ``occupied``, growing the arena."""
    fits: list[tuple[int, int]] = []  # (gap length, offset)
    cursor = 0
    for lo, hi in sorted(occupied):
        if lo - cursor >= size:
            fits.append((lo - cursor, cursor))
        cursor = max(cursor, _align_up(hi, alignment))
    if top - cursor >= size:
        fits.append((top - cursor, cursor))
    return min(fits)[1] if fits else cursor


# ---------------------------------------------------------------------------------------------- greedy


def plan_greedy_by_size(buffers: list[Buffer], alignment: int = 64) -> ArenaPlan:
    """TFLite Micro's greedy: largest first, each into the lowest gap among the buffers live with it."""
    _validate(buffers, alignment)
    t0 = time.perf_counter()
    offsets: dict[str, int] = {}
    placed: list[Buffer] = []
    for b in sorted((b for b in buffers if b.size), key=lambda b: (-b.size, b.start, b.name)):
        occupied = [(offsets[p.name], offsets[p.name] + p.size) for p in placed if p.conflicts(b)]
        offsets[b.name] = _first_fit(b.size, occupied, alignment)
        placed.append(b)
    return _finish(buffers, offsets, "greedy", time.perf_counter() - t0)


def plan_best_fit(buffers: list[Buffer], alignment: int = 64) -> ArenaPlan:
    """In order of start, each into the smallest gap among the placed buffers still live."""
    _validate(buffers, alignment)
    t0 = time.perf_counter()
    offsets: dict[str, int] = {}
    live: list[Buffer] = []
    top = 0
    for b in sorted((b for b in buffers if b.size), key=lambda b: (b.start, -b.size, b.name)):
        live = [p for p in live if p.end >= b.start]  # placed earlier, so p.start <= b.start
        occupied = [(offsets[p.name], offsets[p.name] + p.size) for p in live]
        offsets[b.name] = _best_fit(b.size, occupied, top, alignment)
        top = max(top, offsets[b.name] + b.size)
        live.append(b)
    return _finish(buffers, offsets, "best-fit", time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- CP-SAT


def aligned_live_lower_bound(buffers: list[Buffer], alignment: int) -> int:
    """Max over steps of the live buffers' padded sizes, less the largest padding among them: with
    aligned offsets every live buffer but the top one occupies its padded size. At least the live-bytes
    bound."""
    events: dict[int, list[tuple[int, Buffer]]] = {}
    for b in buffers:
        if b.size:
            events.setdefault(b.start, []).append((1, b))
            events.setdefault(b.end + 1, []).append((-1, b))
    live: dict[str, Buffer] = {}
    best = 0
    for step in sorted(events):
        for sign, b in events[step]:
            if sign > 0:
                live[b.name] = b
            else:
                live.pop(b.name)
        if live:
            padded = [(_align_up(b.size, alignment), b.size) for b in live.values()]
            best = max(best, sum(p for p, _ in padded) - max(p - s for p, s in padded))
    return max(best, live_bytes_lower_bound(buffers))


def _build_model(bufs: list[Buffer], alignment: int, lower: int, upper: int):
    """CP-SAT model over ``bufs`` (all non-empty): offsets in alignment units, memory intervals of padded
    length, one ``NoOverlap2D`` with the fixed time intervals, and the arena (bytes) in [lower, upper]
    above every buffer. Returns (model, offset vars, arena var)."""
    from ortools.sat.python import cp_model

    model = cp_model.CpModel()
    arena = model.NewIntVar(lower, upper, "arena")
    offs, mem, steps = [], [], []
    for i, b in enumerate(bufs):
        off = model.NewIntVar(0, (upper - b.size) // alignment, f"off_{i}")
        model.Add(arena >= off * alignment + b.size)
        offs.append(off)
        mem.append(model.NewFixedSizeIntervalVar(off, _align_up(b.size, alignment) // alignment, f"mem_{i}"))
        steps.append(model.NewFixedSizeIntervalVar(b.start, b.end + 1 - b.start, f"t_{i}"))
    model.AddNoOverlap2D(steps, mem)
    model.Minimize(arena)
    return model, offs, arena


def _check_warm_start(buffers: list[Buffer], plan: ArenaPlan, alignment: int) -> None:
    try:
        check_plan(buffers, plan)
    except KilnError as e:
        raise KilnInputError(f"plan_cpsat: the warm start is not a valid plan for these buffers: {e}") from e
    bad = sorted(b.name for b in buffers if b.size and plan.offsets[b.name] % alignment)
    if bad:
        raise KilnInputError(f"plan_cpsat: warm start offsets of {bad[:5]} are not multiples of {alignment}")


def _incumbent(buffers: list[Buffer], alignment: int, warm_start: ArenaPlan | None) -> ArenaPlan:
    """The plan CP-SAT starts from and must beat: the better greedy plan, or ``warm_start`` if no worse."""
    best = min(plan_greedy_by_size(buffers, alignment), plan_best_fit(buffers, alignment), key=lambda p: p.size)
    if warm_start is not None:
        _check_warm_start(buffers, warm_start, alignment)
        if warm_start.size <= best.size:
            return warm_start
    return best


def plan_cpsat(buffers: list[Buffer], alignment: int = 64, time_limit_s: float = 5.0, workers: int = 2,
               warm_start: ArenaPlan | None = None, seed: int = 0) -> ArenaPlan:
    """CP-SAT over aligned offsets, warm-started from the best of ``warm_start`` and the greedy plans."""
    from ortools.sat.python import cp_model

    _validate(buffers, alignment)
    t0 = time.perf_counter()
    incumbent = _incumbent(buffers, alignment, warm_start)
    bound = live_bytes_lower_bound(buffers)
    lower = aligned_live_lower_bound(buffers, alignment)
    stats: dict = {"warm_start_size": incumbent.size}

    if incumbent.size <= lower:  # the heuristic already meets the bound: nothing left to prove
        offsets = _with_zero_size(buffers, incumbent.offsets)
        stats.update(status="OPTIMAL", kept_warm_start=1, solver_skipped=1)
        return ArenaPlan(offsets, _arena_top(buffers, offsets), "cpsat", lower_bound=lower, optimal=True,
                         solve_s=time.perf_counter() - t0, stats=stats)

    bufs = [b for b in buffers if b.size]
    model, offs, arena = _build_model(bufs, alignment, lower, incumbent.size)
    for off, b in zip(offs, bufs):
        model.AddHint(off, incumbent.offsets[b.name] // alignment)
    model.AddHint(arena, incumbent.size)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.05, time_limit_s - (time.perf_counter() - t0))
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    status = solver.Solve(model)

    found = status in (cp_model.OPTIMAL, cp_model.FEASIBLE)
    offsets = incumbent.offsets
    if found:
        solved = {b.name: solver.Value(off) * alignment for off, b in zip(offs, bufs)}
        if _arena_top(bufs, solved) < incumbent.size:
            offsets = solved
    stats.update(status=solver.StatusName(status), kept_warm_start=int(offsets is incumbent.offsets),
                 conflicts=solver.NumConflicts(), branches=solver.NumBranches(), solver_wall_s=solver.WallTime())
    offsets = _with_zero_size(buffers, offsets)
    solver_bound = -int(-solver.BestObjectiveBound() // 1) if found else 0
    return ArenaPlan(offsets, _arena_top(buffers, offsets), "cpsat", lower_bound=max(bound, lower, solver_bound),
                     optimal=status == cp_model.OPTIMAL, solve_s=time.perf_counter() - t0, stats=stats)


def _with_zero_size(buffers: list[Buffer], offsets: dict[str, int]) -> dict[str, int]:
    return {b.name: (offsets[b.name] if b.size else 0) for b in buffers}


# ---------------------------------------------------------------------------------------------- dispatch

METHODS: dict[str, Callable[..., ArenaPlan]] = {
    "cpsat": plan_cpsat,
    "greedy": plan_greedy_by_size,
    "best-fit": plan_best_fit,
}


def plan_arena(buffers: list[Buffer], method: str = "cpsat", **kw) -> ArenaPlan:
    """Plan with ``METHODS[method]``, passing ``kw`` on (``alignment``, and for "cpsat" its options)."""
    if method not in METHODS:
        raise KilnInputError(f"unknown arena planning method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method](buffers, **kw)
