"""Log switches (``KILN_LOGS``, after PyTorch's ``TORCH_LOGS``) and progress bars that stay quiet off a TTY.

Contract:
- ``KILN_LOGS="+passes,fusion,-frontend"``: comma-separated areas; ``+area`` logs at DEBUG, ``-area`` at
  ERROR only, a plain ``area`` at INFO. ``all`` is the whole ``kiln`` logger tree. Every area is a
  logger (``AREAS``: ``passes`` -> ``kiln.passes``, ``fusion`` -> ``kiln.passes.fusion``...), so a module
  logs with ``logging.getLogger(__name__)`` (or the area's logger name) and the switch applies to it
  and to every logger below it. Areas not named keep the default: WARNING and above.
- ``parse_logs(spec) -> dict[area, level]``; an unknown area or a malformed item raises
  ``KilnInputError`` listing the known areas. ``register_log_area(name, logger)`` adds one (plugins).
- ``set_logs(spec=None, **levels)`` (``kiln.set_logs("+passes")`` or ``set_logs(passes=logging.DEBUG)``)
  applies a spec: it resets every area's level, sets the named ones, and installs one stderr handler on
  the ``kiln`` logger (``[kiln.passes] DEBUG: ...``) that stops propagation to the root logger, as
  TORCH_LOGS does, so messages are not printed twice. ``set_logs("")`` (or no arguments) undoes all of
  it: levels reset, handler removed, propagation back on. ``init_from_env()`` applies ``$KILN_LOGS``
  when it is set (the CLI calls it; invalid values raise ``KilnInputError``).
- ``progress(description, total=None)``: a context manager giving ``advance(n=1)`` / ``update(...)``;
  it draws a rich progress bar on stderr only when stderr is a terminal (and ``$KILN_PROGRESS`` is not
  ``0``), or when ``enabled=True`` is forced (with an optional rich ``console``), and otherwise does
  nothing but count (``.completed``). ``track(iterable, description, total=None)`` wraps an iterable.
  For long-running work (tuning, ILP solving, RL training).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from kiln.errors import KilnInputError

ROOT = "kiln"

# area -> logger name. Modules log with getLogger(__name__), so an area covers its package.
AREAS: dict[str, str] = {
    "all": ROOT,
    "frontend": "kiln.frontend",
    "ir": "kiln.ir",
    "passes": "kiln.passes",
    "fusion": "kiln.passes.fusion",
    "quantize": "kiln.passes.quantize",
    "scheduler": "kiln.scheduler",
    "backends": "kiln.backends",
    "tvm": "kiln.backends.tvm",
    "runtime": "kiln.runtime",
    "costmodel": "kiln.costmodel",
    "cli": "kiln.cli",
    "report": "kiln.report",
    "bench": "kiln.report.bench",
    "bisect": "kiln.bisect",
}

DEFAULT_LEVEL = logging.WARNING
_HANDLER_TAG = "_kiln_logs_handler"


def register_log_area(name: str, logger: str) -> None:
    """Make ``name`` usable in ``KILN_LOGS`` for the logger ``logger`` (e.g. a plugin's package)."""
    if not name.isidentifier():
        raise KilnInputError(f"bad log area name {name!r}: use letters, digits and '_'")
    AREAS[name] = logger


def parse_logs(spec: str) -> dict[str, int]:
    """``"+passes,fusion,-frontend"`` -> ``{"passes": DEBUG, "fusion": INFO, "frontend": ERROR}``."""
    out: dict[str, int] = {}
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        level = logging.INFO
        if item[0] in "+-":
            level = logging.DEBUG if item[0] == "+" else logging.ERROR
            item = item[1:].strip()
        if item not in AREAS:
            raise KilnInputError(f"bad KILN_LOGS item {raw.strip()!r}: unknown area {item!r}; known areas: "
                                 f"{', '.join(sorted(AREAS))} (prefix + for DEBUG, - for ERROR only)")
        out[item] = level
    return out


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the message (it may be redirected later)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _handler() -> logging.Handler | None:
    for h in logging.getLogger(ROOT).handlers:
        if getattr(h, _HANDLER_TAG, False):
            return h
    return None


def set_logs(spec: str | None = None, **levels: int) -> dict[str, int]:
    """Apply a ``KILN_LOGS`` spec and/or ``area=level`` keywords; returns the levels set by area."""
    chosen = parse_logs(spec or "")
    for area, level in levels.items():
        if area not in AREAS:
            raise KilnInputError(f"unknown log area {area!r}; known areas: {', '.join(sorted(AREAS))}")
        if not isinstance(level, int) or isinstance(level, bool):
            raise KilnInputError(f"log level for {area!r} must be a logging level (int), got {level!r}")
        chosen[area] = level
    for name in set(AREAS.values()):
        logging.getLogger(name).setLevel(logging.NOTSET)
    root = logging.getLogger(ROOT)
    handler = _handler()
    if not chosen:
        if handler is not None:
            root.removeHandler(handler)
        root.setLevel(logging.NOTSET)
        root.propagate = True
        return {}
    root.setLevel(DEFAULT_LEVEL)
    # Parents first, so that "+passes,-fusion" leaves kiln.passes.fusion at ERROR whatever the order.
    for area in sorted(chosen, key=lambda a: AREAS[a].count(".")):
        logging.getLogger(AREAS[area]).setLevel(chosen[area])
    if handler is None:
        handler = _StderrHandler()
        setattr(handler, _HANDLER_TAG, True)
        root.addHandler(handler)
    root.propagate = False
    return chosen


def init_from_env() -> dict[str, int]:
    """Apply ``$KILN_LOGS`` if it is set (and not empty)."""
    spec = os.environ.get("KILN_LOGS", "").strip()
    if not spec:
        return {}
    try:
        return set_logs(spec)
    except KilnInputError as e:
        raise KilnInputError(f"$KILN_LOGS: {e}") from None


# -- progress ------------------------------------------------------------------------------------

class _Progress:
    """One task of a rich progress bar, or a silent counter when ``bar`` is None."""

    def __init__(self, bar: Any = None, task: Any = None, total: float | None = None):
        self.bar, self.task, self.total = bar, task, total
        self.completed = 0.0

    def advance(self, n: float = 1) -> None:
        self.completed += n
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def update(self, completed: float | None = None, total: float | None = None,
               description: str | None = None) -> None:
        if completed is not None:
            self.completed = completed
        if total is not None:
            self.total = total
        if self.bar is not None:
            kw: dict[str, Any] = {}
            if completed is not None:
                kw["completed"] = completed
            if total is not None:
                kw["total"] = total
            if description is not None:
                kw["description"] = description
            self.bar.update(self.task, **kw)

    @property
    def drawing(self) -> bool:
        return self.bar is not None


def progress_enabled() -> bool:
    """Bars draw only on an interactive stderr, unless ``KILN_PROGRESS=0``."""
    if os.environ.get("KILN_PROGRESS", "").strip() == "0":
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


@contextmanager
def progress(description: str, total: float | None = None, *, enabled: bool | None = None,
             console: Any = None) -> Iterator[_Progress]:
    if not (progress_enabled() if enabled is None else enabled):
        yield _Progress(total=total)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console or Console(stderr=True), transient=False)
    with bar:
        yield _Progress(bar, bar.add_task(description, total=total), total)


def track(iterable: Iterable, description: str, total: float | None = None, **kw: Any) -> Iterator:
    """Iterate ``iterable`` with a progress bar (``total`` defaults to ``len(iterable)`` when it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with progress(description, total, **kw) as p:
        for item in iterable:
            yield item
            p.advance()


__all__ = ["AREAS", "init_from_env", "parse_logs", "progress", "progress_enabled", "register_log_area",
           "set_logs", "track"]
