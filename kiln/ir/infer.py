"""Type inference for torch ops by running them on fake tensors.

Contract: ``infer_torch_op(op, args, kwargs, attrs, subgraph) -> list[Type]`` builds a FakeTensor for
every tensor-typed Value (symbolic dims become SymInts of a private ShapeEnv, mapped back to kiln's
symbols afterwards), calls the op, and reads the result types. No op has a hand-written shape rule;
torch's meta kernels are the single source of truth. Results for fully static signatures are cached.
Failures raise ``KilnError`` naming the op and the argument types.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import sympy
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kiln.errors import KilnError
from kiln.ir.types import NoneType, ScalarType, TensorType, Type, layout_of, sym


def _type_key(obj: Any) -> Any:
    from kiln.ir.graph import Value

    if isinstance(obj, Value):
        return ("v", obj.type)
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(_type_key(o) for o in obj))
    if isinstance(obj, float) and obj != obj:
        return ("nan",)
    if isinstance(obj, (bool, int, float)):  # 1 == 1.0 == True, but they promote differently
        return (type(obj).__name__, obj)
    return obj


def _is_static(key: Any) -> bool:
    if isinstance(key, tuple):
        return all(_is_static(k) for k in key)
    if isinstance(key, TensorType):
        return key.is_static
    if isinstance(key, ScalarType):
        return key.kind in ("int", "float", "bool") or (key.expr is not None and key.expr.is_number)
    return True


class _FakeEnv:
    """A fake mode plus the mapping between kiln's symbols and the ShapeEnv's."""

    _hints = itertools.count(11, 2)

    def __init__(self, symbolic: bool):
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        self.shape_env = ShapeEnv(allow_dynamic_output_shape_ops=True) if symbolic else None
        self.mode = FakeTensorMode(shape_env=self.shape_env, allow_non_fake_inputs=True)
        self.to_torch: dict[sympy.Symbol, Any] = {}
        self.from_torch: dict[sympy.Symbol, sympy.Symbol] = {}

    def symint(self, sym: sympy.Symbol):
        if sym not in self.to_torch:
            from torch._dynamo.source import ConstantSource
            from torch.fx.experimental.symbolic_shapes import DimDynamic

            hint = next(self._hints) + 64
            src = ConstantSource(f"kiln_{sym.name}")
            tsym = self.shape_env.create_symbol(hint, source=src, dynamic_dim=DimDynamic.DYNAMIC)
            self.to_torch[sym] = self.shape_env.create_symintnode(tsym, hint=hint, source=src)
            self.from_torch[tsym] = sym
        return self.to_torch[sym]

    def dim(self, d):
        if isinstance(d, int):
            return d
        return _eval_expr(d, self.symint)

    def fake(self, t: TensorType) -> torch.Tensor:
        shape = [self.dim(d) for d in t.shape]
        with self.mode:
            if t.layout == "channels_last" and len(shape) == 4:
                return torch.empty(shape, dtype=t.dtype, memory_format=torch.channels_last)
            return torch.empty(shape, dtype=t.dtype)

    def back(self, x) -> Any:
        if isinstance(x, int):
            return x
        expr = x.node.expr
        # kiln's own symbols map back; fresh ones (unbacked u0 from .item()/nonzero) get kiln's spelling
        expr = expr.xreplace({s: self.from_torch.get(s) or sym(s.name) for s in expr.free_symbols})
        return int(expr) if expr.is_Integer else expr


def _eval_expr(expr: sympy.Expr, symint):
    """Evaluate a sympy dim expression with SymInts substituted for its symbols."""
    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        return symint(expr)
    if isinstance(expr, sympy.Add):
        return functools.reduce(lambda a, b: a + b, (_eval_expr(a, symint) for a in expr.args))
    if isinstance(expr, sympy.Mul):
        return functools.reduce(lambda a, b: a * b, (_eval_expr(a, symint) for a in expr.args))
    if isinstance(expr, sympy.Pow) and expr.exp.is_Integer and int(expr.exp) > 0:
        return _eval_expr(expr.base, symint) ** int(expr.exp)
    if isinstance(expr, sympy.floor) and isinstance(expr.args[0], sympy.Mul):
        num, den = expr.args[0].as_numer_denom()
        return _eval_expr(num, symint) // _eval_expr(den, symint)
    if isinstance(expr, sympy.Max):
        return functools.reduce(torch.sym_max, (_eval_expr(a, symint) for a in expr.args))
    if isinstance(expr, sympy.Min):
        return functools.reduce(torch.sym_min, (_eval_expr(a, symint) for a in expr.args))
    if isinstance(expr, sympy.Mod):
        return _eval_expr(expr.args[0], symint) % _eval_expr(expr.args[1], symint)
    raise KilnError(f"cannot evaluate symbolic dim {expr} during type inference")


def type_of_example(x: Any, back=None) -> Type:
    """The kiln type of a (fake or real) example value: tensor, SymInt, number or None."""
    back = back or (lambda s: s if isinstance(s, int) else _sym_expr(s))
    if isinstance(x, torch.Tensor):
        return TensorType(tuple(back(s) for s in x.shape), x.dtype, layout_of(x))
    if x is None:
        return NoneType()
    if isinstance(x, torch.SymInt):
        return ScalarType("symint", back(x))
    if isinstance(x, torch.SymFloat):
        return ScalarType("symfloat", None)
    if isinstance(x, torch.SymBool):
        return ScalarType("symbool", None)
    if isinstance(x, bool):
        return ScalarType("bool", sympy.true if x else sympy.false)
    if isinstance(x, int):
        return ScalarType("int", sympy.Integer(x))
    if isinstance(x, float):
        return ScalarType("float", None)
    raise KilnError(f"kiln IR has no type for a value of type {type(x).__name__}")


def _sym_expr(s) -> Any:
    expr = s.node.expr
    return int(expr) if expr.is_Integer else expr


def infer_torch_op(op, args: tuple, kwargs: dict, attrs: dict, subgraph) -> list[Type]:
    key = (op.name, _type_key(args), _type_key(tuple(sorted(kwargs.items()))))
    static = _is_static(key)
    if static:
        try:
            cached = _CACHE.get(key)
        except TypeError:  # an unhashable literal: skip the cache
            static, cached = False, None
        if cached is not None:
            return list(cached)
    if static and _DATA_DEPENDENT & set(getattr(op.target, "tags", ())):
        static = False  # .item(), nonzero...: results are fresh unbacked symbols, need a ShapeEnv
    env = _static_env() if static else _FakeEnv(symbolic=True)
    result = _run_fake(op, args, kwargs, env)
    types = _result_types(op, result, env)
    if static:
        _CACHE[key] = tuple(types)
    return types


_CACHE: dict[Any, tuple[Type, ...]] = {}
_DATA_DEPENDENT = {torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape}


def is_unbacked(expr: sympy.Expr) -> bool:
    """True if a dim holds a data-dependent symbol (``u0``...), fresh at every inference."""
    return any(s.name.startswith("u") for s in expr.free_symbols)


@functools.lru_cache(maxsize=1)
def _static_env() -> _FakeEnv:
    return _FakeEnv(symbolic=False)


def _run_fake(op, args, kwargs, env: _FakeEnv):
    from kiln.ir.graph import Value, map_values

    def to_fake(v: Value):
        t = v.type
        if isinstance(t, TensorType):
            return env.fake(t)
        if isinstance(t, ScalarType):
            if t.expr is not None:
                if t.kind in ("float", "symfloat"):
                    return float(t.expr) if t.expr.is_number else 1.0
                if t.kind in ("bool", "symbool"):
                    return bool(t.expr) if t.expr in (sympy.true, sympy.false) else True
                return env.dim(t.expr) if not t.expr.is_Integer else int(t.expr)
            return {"int": 1, "float": 1.0, "bool": True, "symfloat": 1.0, "symbool": True}.get(t.kind, 1)
        return None

    fargs = map_values(args, to_fake)
    fkwargs = {k: map_values(a, to_fake) for k, a in kwargs.items()}
    try:
        with env.mode:
            return op.target(*fargs, **fkwargs)
    except Exception as e:  # torch raises many types; report them as one kiln error
        sig = ", ".join(_describe(a) for a in args)
        raise KilnError(f"type inference failed for {op.name}({sig}): {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from e


def _describe(a) -> str:
    from kiln.ir.graph import Value
    from kiln.ir.printer import format_type

    if isinstance(a, Value):
        return format_type(a.type)
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_describe(x) for x in a) + "]"
    return repr(a)


def _result_types(op, result, env: _FakeEnv) -> list[Type]:
    if op.schema is not None and not op.schema.returns:  # `-> ()`: asserts, prints
        return []
    items = list(result) if op.multi_result else [result]
    return [type_of_example(x, env.back) for x in items]


def run_on_fake(op, args: tuple, kwargs: dict):
    """Call ``op`` on fake tensors standing for the static-typed Values in its args (for analyses that
    observe a call, such as FLOP counting). Returns the fake result."""
    return _run_fake(op, args, kwargs, _static_env())
