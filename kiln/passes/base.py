"""What a pass is, and the registry of passes by name.

Contract:
- A pass is a (preferably frozen) dataclass with a class attribute ``name`` and a method
  ``run(graph, ctx) -> PassResult``; it may change the graph in place. Options are dataclass fields.
- ``@register_pass("name")`` makes it available to pipelines, the CLI (``-O "cse,my-pass"``) and
  ``kiln explain``. ``get_pass("name", **options)`` instantiates one; unknown names raise
  ``KilnInputError`` listing the known ones.
- ``RewritePass`` is a pass made of ``@pattern`` methods (see ``kiln.ir.rewrite``) run to a fixpoint.
- ``PassContext`` carries what passes may need besides the graph: options, and example inputs for
  passes (or instruments) that evaluate numerics.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kiln.errors import KilnInputError
from kiln.ir.graph import Graph
from kiln.ir.rewrite import apply_patterns, collect_patterns


@dataclass
class PassResult:
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    options: dict[str, Any] = field(default_factory=dict)
    example_inputs: tuple | None = None


class Pass(ABC):
    name: ClassVar[str] = ""

    @abstractmethod
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Transform ``graph`` (in place) and say whether it changed."""


class RewritePass(Pass):
    """A pass made of @pattern methods, applied greedily to a fixpoint."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        n = apply_patterns(graph, collect_patterns(self))
        return PassResult(changed=n > 0, stats={"rewrites": n})


_PASSES: dict[str, type[Pass]] = {}


def register_pass(name: str):
    def deco(cls: type[Pass]) -> type[Pass]:
        if name in _PASSES and _PASSES[name] is not cls:
            raise KilnInputError(f"a pass named {name!r} is already registered ({_PASSES[name].__name__})")
        cls.name = name
        _PASSES[name] = cls
        return cls

    return deco


def get_pass(name: str, **options: Any) -> Pass:
    _load_builtin_passes()
    try:
        cls = _PASSES[name]
    except KeyError:
        raise KilnInputError(f"unknown pass {name!r}; known passes: {', '.join(sorted(_PASSES))}") from None
    if options and dataclasses.is_dataclass(cls):
        known = {f.name for f in dataclasses.fields(cls)}
        bad = set(options) - known
        if bad:
            raise KilnInputError(f"pass {name!r} has no option(s) {sorted(bad)}; options: {sorted(known)}")
    return cls(**options)


def registered_passes() -> dict[str, type[Pass]]:
    _load_builtin_passes()
    return dict(_PASSES)


def _load_builtin_passes() -> None:
    import kiln.passes.builtin  # noqa: F401  (registers the built-in passes)
