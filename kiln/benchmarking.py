"""Shared plumbing for ``benchmarks/*.py`` and ``kiln bench`` (the protocol is ``docs/benchmarks.md``).

Contract:
- ``environment()`` -> dict of what a reader needs to trust a number: kiln/torch/python versions, the
  optional backends' versions when installed (tvm, triton, ortools), the CPU model, core count and the
  torch thread count.
- ``time_call(fn, warmup=3, reps=20)`` -> ``Timing`` (median, min, max, all samples in seconds) for a
  no-argument callable: ``warmup`` untimed calls, then ``reps`` timed ones.
- ``geomean(values)`` of positive numbers (``nan`` for none).
- ``markdown_table(rows, columns)`` renders dict rows (missing cells blank; floats to 3 significant
  digits unless already strings).
- ``write_report(path, rows, summary, extra=None)`` writes ``{"rows", "summary", "env", ...}`` as JSON,
  atomically (``kiln.runtime.files``); ``summary`` holds the goal metrics the issue names.
- ``benchmark_args(description)`` -> an argparse parser with the common ``--quick`` and ``--json PATH``.
- ``select(ap, given, default, available, what, sep=",")`` -> the names in ``given`` (a ``sep``-separated
  option value, or ``default`` when None), every one of them in ``available`` (else ``ap.error`` lists them);
  ``tune_trials(ap, given, default)`` -> ``given`` or ``default``, refusing a budget below 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from kiln.runtime.files import atomic_write_text


@dataclass
class Timing:
    median: float
    min: float
    max: float
    samples: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, float]:
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "reps": len(self.samples)}


def time_call(fn: Callable[[], Any], warmup: int = 3, reps: int = 20) -> Timing:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Timing(statistics.median(samples), min(samples), max(samples), samples)


def geomean(values: Iterable[float]) -> float:
    vals = [float(v) for v in values]
    if not vals:
        return math.nan
    if any(v <= 0 for v in vals):
        raise ValueError(f"geomean of non-positive values: {vals}")
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    for dist in ("kiln", "apache-tvm", "triton", "ortools", "gymnasium"):
        v = _version(dist)
        if v is not None:
            env[dist] = v
    return env


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3g}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_report(path: str, rows: list[dict[str, Any]], summary: dict[str, Any],
                 extra: dict[str, Any] | None = None) -> None:
    doc = {"rows": rows, "summary": summary, "env": environment(), **(extra or {})}
    atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")


def benchmark_args(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repetitions (< 2 min)")
    parser.add_argument("--json", metavar="PATH", help="write rows, summary and environment as JSON")
    return parser


def select(ap: argparse.ArgumentParser, given: str | None, default: list[str], available: Iterable[str],
           what: str, sep: str = ",") -> list[str]:
    names = [n.strip() for n in given.split(sep)] if given else list(default)
    available = list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        ap.error(f"unknown {what}(s) {unknown}; available: {(sep + ' ').join(available)}")
    return names


def tune_trials(ap: argparse.ArgumentParser, given: int | None, default: int) -> int:
    trials = given if given is not None else default
    if trials < 1:
        ap.error("--tune-trials must be >= 1 (leave out the *-tuned contenders instead)")
    return trials
