"""The backend interface and registry.

Contract:
- A backend subclasses ``Backend``: ``name``; ``supports(node) -> bool`` (which nodes it can compile;
  weights are data and always go with the partition that reads them); ``compile(graph, options) ->
  Executable`` where the graph is one partition and the executable is ``callable(*inputs) -> tuple``
  returning the graph's outputs in order. An executable with a ``graph_module`` attribute (an
  ``fx.GraphModule``) computes exactly ``graph_module(*inputs)``: flat plans (``kiln.runtime.plan``)
  inline it. ``cache_version()`` is a string that changes whenever what the backend builds may change
  outside kiln's own code (its compiler's version, the machine it targets): part of compile-cache keys.
- ``register_backend(name)`` registers a class; ``get_backend(name)`` instantiates it. A target that is
  built on an optional extra (``OPTIONAL_TARGETS``: ``tvm``) is imported on first use, and raises
  ``UnsupportedError`` naming the extra when it is not installed. A target planned but not built yet
  raises ``UnsupportedError`` naming the issue that builds it; an unknown
  target raises ``KilnInputError`` listing the known ones.
- ``kiln.backends.compile_graph`` (in ``kiln.backends.driver``) cuts the graph with the partitioner and
  runs what the backend does not support on the reference path, reporting it.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from kiln.errors import KilnInputError, UnsupportedError, first_line
from kiln.ir.graph import Graph, Node

Executable = Callable[..., tuple]

_BACKENDS: dict[str, type[Backend]] = {}

# Targets named in the design whose backends are other issues' work.
PLANNED_TARGETS = {
    "triton": "the Triton backend issue",
    "fpga": "the FPGA backend issue",
    "accel": "the simulated-accelerator issue",
}


# Targets built on optional dependencies: imported (and registered) on first use.
OPTIONAL_TARGETS = {"tvm": ("kiln.backends.tvm.backend", "tvm")}


class Backend(ABC):
    name: str = ""
    # the memory layout this backend's conv kernels run fastest on ("channels_last"), or None: the
    # ``layout`` pass converts conv nets to it (kiln.passes.manager.context_for)
    preferred_layout: str | None = None

    @abstractmethod
    def supports(self, node: Node) -> bool:
        """Can this backend compile ``node``?"""

    @abstractmethod
    def compile(self, graph: Graph, options: dict[str, Any]) -> Executable:
        """Compile one partition into a callable returning its outputs as a tuple."""

    def cache_version(self) -> str:
        """What besides kiln's source and the options decides this backend's output (compile-cache keys)."""
        import torch

        return f"torch {torch.__version__}"


def register_backend(name: str):
    def deco(cls: type[Backend]) -> type[Backend]:
        cls.name = name
        _BACKENDS[name] = cls
        return cls

    return deco


def get_backend(name: str) -> Backend:
    import kiln.backends.reference  # noqa: F401  (registers "reference")

    if name in OPTIONAL_TARGETS and name not in _BACKENDS:
        module, extra = OPTIONAL_TARGETS[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UnsupportedError(f"target {name!r} needs the optional extra: pip install 'kiln[{extra}]' "
                                   f"({first_line(e)})") from e
    if name in _BACKENDS:
        return _BACKENDS[name]()
    if name in PLANNED_TARGETS:
        raise UnsupportedError(f"target {name!r} is not implemented yet; it is built by {PLANNED_TARGETS[name]}")
    raise KilnInputError(f"unknown target {name!r}; known targets: {', '.join(sorted(_BACKENDS))}")


def available_backends() -> list[str]:
    import kiln.backends.reference  # noqa: F401

    return sorted(set(_BACKENDS) | set(OPTIONAL_TARGETS))
