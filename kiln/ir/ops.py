"""The op registry: every op a kiln node can apply.

Contract:
- ``OpDef`` is one op (one overload): its IR name, the Python callable that gives it semantics
  (``target``), its torch schema when it has one, flags (``core``, ``side_effects``, ``nondeterministic``)
  and ``infer(args, kwargs, attrs, subgraph) -> list[Type]``.
- Three families live here, all looked up by ``get_op(name)`` or ``op_for_target(fx_target)``:
  * torch ops (``aten.addmm``, ``aten.add.Tensor``, any registered custom op ``ns.op.overload``):
    types are inferred by running the op on fake tensors (``kiln.ir.infer``), never by hand rules;
  * symbolic-scalar ops (``sym.add`` ... ``sym.sym_max``) that AOTAutograd emits for SymInt arithmetic;
  * kiln ops (``kiln.weight``, ``kiln.fused``, ``kiln.partition``) registered with ``register_kiln_op``.
- IR spelling: ``ns.op`` for a torch op's ``default`` overload, ``ns.op.overload`` otherwise.
- ``aten.<op>`` (an ``OpPacket``) matches every overload; ``aten.<op>.<overload>`` is one ``OpDef``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch

from kiln.errors import KilnError
from kiln.ir.types import NoneType, ScalarType, Type


class UnknownOpError(KilnError):
    pass


@dataclass(eq=False)
class OpDef:
    name: str
    target: Callable | None
    schema: Any = None  # torch._C.FunctionSchema for torch ops
    core: bool = False
    side_effects: bool = False
    nondeterministic: bool = False
    infer_fn: Callable | None = None
    packet: OpPacket | None = None
    multi_result: bool = False  # results come back as a tuple/list (fx uses getitem)
    doc: str = ""

    @property
    def namespace(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def is_torch_op(self) -> bool:
        return isinstance(self.target, torch._ops.OpOverload)

    def infer(self, args: tuple, kwargs: dict, attrs: dict, subgraph) -> list[Type]:
        if self.infer_fn is None:
            raise KilnError(f"op {self.name} cannot infer its result types; pass result_types")
        return self.infer_fn(self, args, kwargs, attrs, subgraph)

    def __repr__(self) -> str:
        return f"<OpDef {self.name}>"


@dataclass(eq=False)
class OpPacket:
    """All overloads of one torch op, e.g. ``aten.add`` (matches ``aten.add.Tensor`` and ``.Scalar``)."""

    namespace: str
    op: str
    _overloads: dict[str, OpDef] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.namespace}.{self.op}"

    def __getattr__(self, overload: str) -> OpDef:
        if overload.startswith("_") and overload != "_":
            raise AttributeError(overload)
        return get_op(f"{self.namespace}.{self.op}.{overload}")

    def __repr__(self) -> str:
        return f"<OpPacket {self.name}>"


class _Namespace:
    """``aten.addmm`` -> OpPacket; ``aten.addmm.default`` -> OpDef."""

    def __init__(self, ns: str):
        self._ns = ns

    def __getattr__(self, op: str) -> OpPacket:
        if op.startswith("__"):
            raise AttributeError(op)
        return _packet(self._ns, op)


aten = _Namespace("aten")
prims = _Namespace("prims")

_OPS: dict[str, OpDef] = {}
_PACKETS: dict[tuple[str, str], OpPacket] = {}
_BY_TARGET: dict[Any, OpDef] = {}


def _packet(ns: str, op: str) -> OpPacket:
    key = (ns, op)
    if key not in _PACKETS:
        try:
            getattr(getattr(torch.ops, ns), op)
        except (AttributeError, RuntimeError):
            raise UnknownOpError(f"no torch op {ns}.{op}") from None
        _PACKETS[key] = OpPacket(ns, op)
    return _PACKETS[key]


def ir_name(overload: torch._ops.OpOverload) -> str:
    packet = overload.overloadpacket
    ns = overload.namespace
    base = f"{ns}.{packet._qualified_op_name.split('::', 1)[1]}"
    return base if overload._overloadname == "default" else f"{base}.{overload._overloadname}"


def _torch_opdef(overload: torch._ops.OpOverload) -> OpDef:
    from kiln.ir.infer import infer_torch_op

    schema = overload._schema
    name = ir_name(overload)
    returns = schema.returns
    multi = len(returns) != 1 or str(returns[0].type).startswith(("List[", "Tensor[]", "Optional[List"))
    tags = set(getattr(overload, "tags", ()))
    od = OpDef(
        name=name,
        target=overload,
        schema=schema,
        core=torch.Tag.core in tags and overload.namespace == "aten",
        # an op that returns nothing is run for its effect (_assert_scalar, _assert_async, _print...)
        side_effects=schema.is_mutable or not returns or any(r.alias_info is not None and r.alias_info.is_write
                                                             for r in returns),
        nondeterministic=torch.Tag.nondeterministic_seeded in tags,
        infer_fn=infer_torch_op,
        multi_result=multi,
        doc=str(schema),
    )
    ns, rest = name.split(".", 1)
    od.packet = _packet(ns, rest.split(".", 1)[0])
    _OPS[name] = od
    _BY_TARGET[overload] = od
    return od


def get_op(name: str) -> OpDef:
    """Look an op up by IR name; torch ops are created on first use."""
    if name in _OPS:
        return _OPS[name]
    parts = name.split(".")
    if len(parts) in (2, 3) and parts[0] not in ("kiln", "sym"):
        ns, op = parts[0], parts[1]
        overload = parts[2] if len(parts) == 3 else "default"
        try:
            packet = getattr(getattr(torch.ops, ns), op)
            ov = getattr(packet, overload)
        except (AttributeError, RuntimeError):
            raise UnknownOpError(f"unknown op '{name}'") from None
        # one OpDef per overload: "aten.relu.default" and "aten.relu" are the same op
        od = _BY_TARGET.get(ov) or _torch_opdef(ov)
        _OPS[name] = od
        return od
    raise UnknownOpError(f"unknown op '{name}'")


def op_for_target(target: Any) -> OpDef:
    """The OpDef for an fx node target (an OpOverload, an operator function, torch.sym_*)."""
    od = _BY_TARGET.get(target)
    if od is not None:
        return od
    if isinstance(target, torch._ops.OpOverload):
        return _torch_opdef(target)
    if isinstance(target, torch._ops.OpOverloadPacket):
        return _torch_opdef(target.default)
    raise UnknownOpError(f"kiln has no op for fx target {getattr(target, '__name__', target)!r}")


def all_ops() -> list[OpDef]:
    return list(_OPS.values())


# -- kiln ops ----------------------------------------------------------------------------------------

def register_kiln_op(name: str, *, infer: Callable | None, target: Callable | None = None,
                     side_effects: bool = False, doc: str = "") -> OpDef:
    """Register a kiln-level op (``kiln.<name>``); ``infer`` may be None if types are always given."""
    full = name if name.startswith("kiln.") else f"kiln.{name}"
    if full in _OPS:
        raise KilnError(f"op {full} is already registered")
    od = OpDef(name=full, target=target, infer_fn=infer, side_effects=side_effects, doc=doc, core=True)
    _OPS[full] = od
    return od


def _infer_fused(op, args, kwargs, attrs, subgraph) -> list[Type]:
    if subgraph is None:
        raise KilnError(f"{op.name} needs a subgraph")
    return [v.type for v in subgraph.outputs]


WEIGHT = register_kiln_op("weight", infer=None,
                          doc="kiln.weight() {name}: reads the named tensor from graph.weights")
FUSED = register_kiln_op("fused", infer=_infer_fused,
                         doc="kiln.fused(inputs...) {kind}: runs its subgraph on its inputs")
PARTITION = register_kiln_op("partition", infer=_infer_fused,
                             doc="kiln.partition(inputs...) {target}: a subgraph compiled by a backend")


# -- symbolic scalar ops -------------------------------------------------------------------------------

def _sym_infer(result_kind: str | None, fn: Callable):
    def infer(op, args, kwargs, attrs, subgraph) -> list[Type]:
        from kiln.ir.graph import Value

        kinds, exprs = [], []
        for a in args:
            if isinstance(a, Value):
                if not isinstance(a.type, ScalarType):
                    raise KilnError(f"{op.name} takes scalars, got {a.type}")
                kinds.append(a.type.kind)
                exprs.append(a.type.expr)
            else:
                kinds.append(type(a).__name__)
                exprs.append(sympy.sympify(a) if isinstance(a, (int, float, bool)) else None)
        kind = result_kind
        if kind is None:  # arithmetic: float wins over int; symbolic stays symbolic
            is_float = any(k in ("float", "symfloat") for k in kinds)
            is_sym = any(k.startswith("sym") for k in kinds)
            kind = ("sym" if is_sym else "") + ("float" if is_float else "int")
        expr = None
        if all(e is not None for e in exprs):
            try:
                expr = fn(*exprs)
                expr = sympy.sympify(expr)
            except (TypeError, ValueError, ZeroDivisionError):
                expr = None
        return [ScalarType(kind, expr)]

    return infer


def _register_sym(name: str, target: Callable, result_kind: str | None, fn: Callable) -> None:
    od = OpDef(name=f"sym.{name}", target=target, infer_fn=_sym_infer(result_kind, fn), core=True,
               doc=f"symbolic scalar {name}")
    _OPS[od.name] = od
    _BY_TARGET[target] = od


def _floordiv(a, b):
    return sympy.floor(a / b)


for _name, _target, _kind, _fn in [
    ("add", operator.add, None, operator.add),
    ("sub", operator.sub, None, operator.sub),
    ("mul", operator.mul, None, operator.mul),
    ("floordiv", operator.floordiv, None, _floordiv),
    ("truediv", operator.truediv, "symfloat", operator.truediv),
    ("mod", operator.mod, None, sympy.Mod),
    ("pow", operator.pow, None, operator.pow),
    ("neg", operator.neg, None, operator.neg),
    ("eq", operator.eq, "symbool", sympy.Eq),
    ("ne", operator.ne, "symbool", sympy.Ne),
    ("lt", operator.lt, "symbool", sympy.Lt),
    ("le", operator.le, "symbool", sympy.Le),
    ("gt", operator.gt, "symbool", sympy.Gt),
    ("ge", operator.ge, "symbool", sympy.Ge),
    ("sym_float", torch.sym_float, "symfloat", lambda a: a),
    ("sym_int", torch.sym_int, "symint", sympy.floor),
    ("sym_max", torch.sym_max, None, sympy.Max),
    ("sym_min", torch.sym_min, None, sympy.Min),
    ("sym_not", torch.sym_not, "symbool", sympy.Not),
    ("ceil", math.ceil, "symint", sympy.ceiling),
    ("floor", math.floor, "symint", sympy.floor),
]:
    _register_sym(_name, _target, _kind, _fn)

NONE_TYPE = NoneType()
