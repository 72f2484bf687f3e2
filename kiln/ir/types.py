"""Types of kiln IR values.

Contract:
- ``TensorType(shape, dtype, layout="contiguous", quant=None, sparsity=None)`` describes a tensor value.
  ``shape`` is a tuple of dims; a dim is an ``int`` or a ``sympy.Expr`` over symbolic dims (``s0``...).
- ``ScalarType(kind)`` describes a non-tensor value (``int``, ``float``, ``bool``, ``symint``,
  ``symfloat``, ``symbool``); ``NoneType`` is the type of an absent optional result.
- Types are frozen and hashable; equality is structural, so the verifier can compare an inferred type
  with a declared one.
- ``DTYPES`` is the one table between torch dtypes and their short IR spelling (``f32``, ``i64``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import sympy
import torch

Dim = Union[int, sympy.Expr]

# torch dtype <-> short IR spelling. One table, used by printer, parser and converters.
DTYPES: dict[torch.dtype, str] = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int8: "i8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.bool: "bool",
    torch.complex64: "c64",
    torch.complex128: "c128",
    torch.float8_e4m3fn: "f8e4m3",
    torch.float8_e5m2: "f8e5m2",
    torch.uint16: "u16",
    torch.uint32: "u32",
    torch.uint64: "u64",
}
DTYPE_BY_NAME: dict[str, torch.dtype] = {v: k for k, v in DTYPES.items()}

LAYOUTS = ("contiguous", "channels_last", "strided")
SCALAR_KINDS = ("int", "float", "bool", "symint", "symfloat", "symbool")


def sym(name: str) -> sympy.Symbol:
    """The one spelling of a symbolic dim: a positive integer sympy Symbol (as torch's ShapeEnv makes)."""
    return sympy.Symbol(name, integer=True, positive=True)


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"kiln IR has no spelling for dtype {dtype}") from None


@dataclass(frozen=True)
class QuantParams:
    """Quantization annotation: how a real tensor maps to integers.

    ``scheme`` is ``per_tensor`` | ``per_channel`` | ``per_group``; scales/zero points are tuples so the
    type stays hashable (per-tensor: one element).
    """

    qdtype: str
    scheme: str
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int | None = None
    group_size: int | None = None


@dataclass(frozen=True)
class SparsityInfo:
    """Sparsity annotation: ``kind`` is ``unstructured`` | ``n:m`` | ``block``; ``density`` in [0, 1]."""

    kind: str
    density: float
    block: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: torch.dtype
    layout: str = "contiguous"
    quant: QuantParams | None = None
    sparsity: SparsityInfo | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; expected one of {LAYOUTS}")
        dims = tuple(_normalize_dim(d) for d in self.shape)
        object.__setattr__(self, "shape", dims)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> Dim:
        n: Dim = 1
        for d in self.shape:
            n = n * d
        return n

    def nbytes(self) -> Dim:
        return self.numel() * _itemsize(self.dtype)

    def free_symbols(self) -> set[sympy.Symbol]:
        out: set[sympy.Symbol] = set()
        for d in self.shape:
            if isinstance(d, sympy.Expr):
                out |= d.free_symbols
        return out

    def with_(self, **changes) -> TensorType:
        fields = {"shape": self.shape, "dtype": self.dtype, "layout": self.layout,
                  "quant": self.quant, "sparsity": self.sparsity}
        fields.update(changes)
        return TensorType(**fields)


@dataclass(frozen=True)
class ScalarType:
    """A non-tensor value; ``expr`` is its symbolic value when known (e.g. ``s0`` for a dim size)."""

    kind: str
    expr: sympy.Expr | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCALAR_KINDS:
            raise ValueError(f"unknown scalar kind {self.kind!r}; expected one of {SCALAR_KINDS}")
        if self.expr is not None and not isinstance(self.expr, sympy.Basic):
            object.__setattr__(self, "expr", sympy.sympify(self.expr))


@dataclass(frozen=True)
class NoneType:
    pass


Type = Union[TensorType, ScalarType, NoneType]


def _normalize_dim(d) -> Dim:
    if isinstance(d, bool):
        raise TypeError(f"a dim must be an int or a sympy expression, got {d!r}")
    if isinstance(d, int):
        return d
    if isinstance(d, sympy.Expr):
        return int(d) if d.is_Integer else d
    if isinstance(d, torch.SymInt):
        raise TypeError("convert torch.SymInt dims with kiln.ir.symbolic before building a TensorType")
    raise TypeError(f"a dim must be an int or a sympy expression, got {type(d).__name__}")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def layout_of(t: torch.Tensor) -> str:
    """Classify a tensor's strides as one of LAYOUTS."""
    if t.layout != torch.strided:
        return "strided"
    try:
        if t.is_contiguous():
            return "contiguous"
        if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
            return "channels_last"
    except Exception:  # symbolic strides we cannot decide: call them contiguous-agnostic
        return "contiguous"
    return "strided"
