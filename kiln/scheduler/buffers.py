"""The vocabulary shared by kiln's memory planners: buffers with lifetimes, and arena plans.

Contract:
- A ``Buffer`` is one tensor that needs memory: ``size`` in bytes, live from step ``start`` (the step of
  its producer in the chosen order) to step ``end`` inclusive (its last consumer's step; a graph output
  lives to the last step). Two buffers conflict iff their lifetimes intersect and both have a size.
- An ``ArenaPlan`` gives every buffer a byte ``offset`` in one arena of ``size`` bytes; ``check_plan``
  verifies that no two conflicting buffers overlap in memory and that every buffer fits, raising
  ``KilnError`` naming the pair at fault (buffer names must be unique).
- ``lower_bound`` is the best known bound on any arena for these buffers (max over steps of live bytes);
  ``optimal`` is True when a solver proved the plan optimal, and ``gap`` is (size - bound) / size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kiln.errors import KilnError


@dataclass(frozen=True)
class Buffer:
    name: str
    size: int
    start: int
    end: int

    def __post_init__(self) -> None:
        if self.size < 0 or self.end < self.start:
            raise KilnError(f"buffer {self.name}: bad size {self.size} or lifetime [{self.start}, {self.end}]")

    def conflicts(self, other: Buffer) -> bool:
        """Live together and both need memory (a zero-size buffer conflicts with nothing)."""
        return bool(self.size and other.size) and self.start <= other.end and other.start <= self.end


@dataclass
class ArenaPlan:
    offsets: dict[str, int]
    size: int
    method: str
    lower_bound: int = 0
    optimal: bool | None = None
    solve_s: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def gap(self) -> float:
        return 0.0 if self.size == 0 else (self.size - self.lower_bound) / self.size


def live_bytes_lower_bound(buffers: list[Buffer]) -> int:
    """Max over steps of the bytes live at that step: no arena can be smaller."""
    events: dict[int, int] = {}
    for b in buffers:
        events[b.start] = events.get(b.start, 0) + b.size
        events[b.end + 1] = events.get(b.end + 1, 0) - b.size
    live = peak = 0
    for step in sorted(events):
        live += events[step]
        peak = max(peak, live)
    return peak


def check_plan(buffers: list[Buffer], plan: ArenaPlan) -> None:
    names = [b.name for b in buffers]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise KilnError(f"plan '{plan.method}': buffer names must be unique, repeated: {dup[:5]}")
    missing = [b.name for b in buffers if b.name not in plan.offsets]
    if missing:
        raise KilnError(f"plan '{plan.method}' places no offset for {missing[:5]}")
    by_start = sorted(buffers, key=lambda b: b.start)
    for b in by_start:
        off = plan.offsets[b.name]
        if off < 0 or off + b.size > plan.size:
            raise KilnError(f"plan '{plan.method}': {b.name} [{off}, {off + b.size}) is outside the arena "
                            f"of {plan.size} bytes")
    for i, a in enumerate(by_start):
        for j in range(i + 1, len(by_start)):
            b = by_start[j]
            if b.start > a.end:
                break
            if a.conflicts(b):
                oa, ob = plan.offsets[a.name], plan.offsets[b.name]
                if oa < ob + b.size and ob < oa + a.size:
                    raise KilnError(f"plan '{plan.method}': {a.name} and {b.name} are live together "
                                    f"but overlap in memory")
