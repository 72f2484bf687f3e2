"""What kind of loop each op is, for fusion: a data table from op name to ``OpClass``.

Contract:
- ``classify(node) -> OpClass``. Kinds (``OpKind``):
  * ``POINTWISE``: one output element from the inputs' elements at the same (broadcast, or gathered)
    index: unary/binary elementwise ops, comparisons, ``where``/``clamp``, type conversions and copies,
    creation ops (``full_like``, ``arange``...), indexing loads (``embedding``, ``index``, ``gather``),
    ``cat``, ``constant_pad_nd`` and small-window loads (``max_pool2d_with_indices``, ``avg_pool2d``,
    ``upsample_*``), which Inductor also generates as pointwise loops. Its iteration space is its first
    result.
  * ``REDUCTION``: combines elements along ``reduced_dims(node)`` (``sum``, ``mean``, ``amax``, ``var``...);
    ``OpClass.combine`` names the combine function (``amax`` and ``max.dim`` both say ``"max"``).
  * ``NORM``: a composite normalisation as core ATen keeps it (``_softmax``, ``_log_softmax``,
    ``native_layer_norm``): a row reduction whose first result has the input's shape. Inference batch
    norm (``_native_batch_norm_legit_no_training``) is a ``NORM`` with no reduced dims: per-channel
    affine, i.e. pointwise.
  * ``ANCHOR``: ``mm``/``addmm``/``bmm``/``baddbmm``/``convolution``: extern kernels (BLAS, oneDNN, a GEMM
    template) that take a pointwise epilogue but no prologue; ``OpClass.operand`` is the activation
    operand (the one Q/K/V projections share) and ``OpClass.weight`` the operand a concatenated GEMM
    stacks along ``OpClass.concat_dim``.
  * ``VIEW``: not a kernel (``kiln.passes.analysis.is_kernel`` is False: views, ``sym.*``, weights).
  * ``OPAQUE``: everything else, and every op with side effects or seeded randomness, and region nodes
    (``kiln.fused``/``kiln.partition``, e.g. an attention group): never fused.
- ``reduced_dims(node)`` gives the reduced (normalised) input dims of a REDUCTION/NORM node, non-negative
  and sorted; ``rows(node) -> (R, K)``: output rows and elements per row (R*K = the input's numel).
- ``numel(value)``: exact element count (an int, or a sympy expression over symbolic dims): legality
  compares these; ``size_hint``/``nbytes`` size a symbolic dim as ``SYMBOLIC_DIM_HINT`` (scores only).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

import sympy

from kiln.ir.graph import Node, Value
from kiln.ir.types import TensorType
from kiln.passes.analysis import is_kernel


class OpKind(StrEnum):
    POINTWISE = "pointwise"
    REDUCTION = "reduction"
    NORM = "norm"
    ANCHOR = "anchor"
    VIEW = "view"
    OPAQUE = "opaque"


@dataclass(frozen=True)
class Dims:
    """Where a reduction's dims come from: positional ``arg`` (or keyword ``dim``); ``last_of_arg``:
    the last ``len(args[arg])`` dims (layer norm's ``normalized_shape``); ``arg=None``: all dims."""

    arg: int | None = None
    last_of_arg: bool = False


@dataclass(frozen=True)
class OpClass:
    kind: OpKind
    combine: str | None = None   # REDUCTION/NORM: "sum", "max", "mean", "var", "softmax", "layer_norm"...
    dims: Dims | None = None     # REDUCTION/NORM: where the reduced dims come from (None: no reduction)
    operand: int | None = None   # ANCHOR: positional index of the activation operand
    weight: int | None = None    # ANCHOR: positional index of the weight operand
    concat_dim: int | None = None  # ANCHOR: the weight dim a horizontal (concatenated) GEMM/conv stacks

    @property
    def reduces(self) -> bool:
        return self.dims is not None


POINTWISE = OpClass(OpKind.POINTWISE)
VIEW = OpClass(OpKind.VIEW)
OPAQUE = OpClass(OpKind.OPAQUE)

# Keyed by op packet (``aten.add`` covers ``.Tensor`` and ``.Scalar``).
_POINTWISE_LINES = (
    # unary math and activations
    "abs acos acosh asin asinh atan atanh bitwise_not ceil cos cosh erf erfc erfinv exp exp2 expm1 floor frac "
    "isinf isnan isfinite isneginf isposinf lgamma digamma log log10 log1p log2 logical_not neg reciprocal relu "
    "round rsqrt sigmoid sign sgn signbit sin sinh sqrt square tan tanh trunc gelu silu mish hardsigmoid "
    "hardswish hardtanh elu celu selu leaky_relu softplus threshold logit nan_to_num relu6 "
    # binary / ternary
    "add sub rsub mul div pow remainder fmod atan2 maximum minimum fmax fmin eq ne lt le gt ge logical_and "
    "logical_or logical_xor bitwise_and bitwise_or bitwise_xor bitwise_left_shift bitwise_right_shift hypot "
    "copysign floor_divide xlogy lerp addcmul addcdiv where clamp clamp_min clamp_max masked_fill heaviside "
    "nextafter ",
    # conversions and copies
    "_to_copy to clone copy type_as _to_dim_order_copy "
    # creation (index-only loops)
    "full full_like zeros zeros_like ones ones_like scalar_tensor arange fill "
    # indexing loads, layout-changing copies and small-window loads Inductor also generates as pointwise loops
    "embedding index gather cat constant_pad_nd max_pool2d_with_indices avg_pool2d upsample_nearest2d "
    "upsample_bilinear2d",
)
_POINTWISE_PACKETS = frozenset(name for line in _POINTWISE_LINES for name in line.split())

_REDUCTIONS: dict[str, OpClass] = {
    "aten.sum.dim_IntList": OpClass(OpKind.REDUCTION, "sum", Dims(1)),
    "aten.sum.default": OpClass(OpKind.REDUCTION, "sum", Dims(None)),
    "aten.mean.dim": OpClass(OpKind.REDUCTION, "mean", Dims(1)),
    "aten.mean.default": OpClass(OpKind.REDUCTION, "mean", Dims(None)),
    "aten.amax.default": OpClass(OpKind.REDUCTION, "max", Dims(1)),
    "aten.amin.default": OpClass(OpKind.REDUCTION, "min", Dims(1)),
    "aten.max.dim": OpClass(OpKind.REDUCTION, "max", Dims(1)),
    "aten.min.dim": OpClass(OpKind.REDUCTION, "min", Dims(1)),
    "aten.max.default": OpClass(OpKind.REDUCTION, "max", Dims(None)),
    "aten.min.default": OpClass(OpKind.REDUCTION, "min", Dims(None)),
    "aten.argmax.default": OpClass(OpKind.REDUCTION, "argmax", Dims(1)),
    "aten.argmin.default": OpClass(OpKind.REDUCTION, "argmin", Dims(1)),
    "aten.any.dim": OpClass(OpKind.REDUCTION, "any", Dims(1)),
    "aten.any.dims": OpClass(OpKind.REDUCTION, "any", Dims(1)),
    "aten.any.default": OpClass(OpKind.REDUCTION, "any", Dims(None)),
    "aten.all.dim": OpClass(OpKind.REDUCTION, "all", Dims(1)),
    "aten.all.dims": OpClass(OpKind.REDUCTION, "all", Dims(1)),
    "aten.all.default": OpClass(OpKind.REDUCTION, "all", Dims(None)),
    "aten.prod.dim_int": OpClass(OpKind.REDUCTION, "prod", Dims(1)),
    "aten.prod.default": OpClass(OpKind.REDUCTION, "prod", Dims(None)),
    "aten.var.correction": OpClass(OpKind.REDUCTION, "var", Dims(1)),
    "aten.var.dim": OpClass(OpKind.REDUCTION, "var", Dims(1)),
    "aten.var_mean.correction": OpClass(OpKind.REDUCTION, "var_mean", Dims(1)),
    "aten.std.correction": OpClass(OpKind.REDUCTION, "std", Dims(1)),
    "aten.logsumexp.default": OpClass(OpKind.REDUCTION, "logsumexp", Dims(1)),
    "aten.linalg_vector_norm.default": OpClass(OpKind.REDUCTION, "norm", Dims(2)),
}

_NORMS: dict[str, OpClass] = {
    "aten._softmax.default": OpClass(OpKind.NORM, "softmax", Dims(1)),
    "aten._log_softmax.default": OpClass(OpKind.NORM, "log_softmax", Dims(1)),
    "aten.native_layer_norm.default": OpClass(OpKind.NORM, "layer_norm", Dims(1, last_of_arg=True)),
    # inference batch norm: running statistics, so per-channel affine with no reduction
    "aten._native_batch_norm_legit_no_training.default": OpClass(OpKind.NORM, "batch_norm", None),
}

_ANCHORS: dict[str, OpClass] = {
    "aten.mm.default": OpClass(OpKind.ANCHOR, operand=0, weight=1, concat_dim=-1),
    "aten.addmm.default": OpClass(OpKind.ANCHOR, operand=1, weight=2, concat_dim=-1),
    "aten.bmm.default": OpClass(OpKind.ANCHOR, operand=0, weight=1, concat_dim=-1),
    "aten.baddbmm.default": OpClass(OpKind.ANCHOR, operand=1, weight=2, concat_dim=-1),
    "aten.convolution.default": OpClass(OpKind.ANCHOR, operand=0, weight=1, concat_dim=0),
}

TABLE: dict[str, OpClass] = {
    **{f"aten.{p}": POINTWISE for p in _POINTWISE_PACKETS},
    **_REDUCTIONS,
    **_NORMS,
    **_ANCHORS,
}

SYMBOLIC_DIM_HINT = 64


def _full_name(node: Node) -> str:
    name = node.op.name
    return name if name.count(".") >= 2 else f"{name}.default"


def classify(node: Node) -> OpClass:
    if not is_kernel(node):
        return VIEW
    op = node.op
    if node.subgraph is not None or op.side_effects or op.nondeterministic or not node.results:
        return OPAQUE
    cls = TABLE.get(_full_name(node))
    if cls is None and op.packet is not None:
        cls = TABLE.get(op.packet.name)
    return cls or OPAQUE


def size_hint(n) -> int:
    """An int for an element count: a symbolic one is sized with ``SYMBOLIC_DIM_HINT`` per symbol."""
    if isinstance(n, int):
        return n
    expr = sympy.sympify(n)
    return int(expr.subs({s: SYMBOLIC_DIM_HINT for s in expr.free_symbols}))


def numel(v: Value):
    """Exact element count: an int, or a sympy expression when a dim is symbolic."""
    return _numel(v.type) if isinstance(v.type, TensorType) else 0


@lru_cache(maxsize=8192)
def _numel(t: TensorType):
    n = 1
    for d in t.shape:
        n = n * d
    return _exact(n)


def _exact(n):
    if isinstance(n, int):
        return n
    n = sympy.simplify(n)
    return int(n) if n.is_Integer else n


def nbytes(v: Value) -> int:
    return size_hint(numel(v)) * v.type.dtype.itemsize if isinstance(v.type, TensorType) else 0


def shape(v: Value) -> tuple:
    return tuple(v.type.shape) if isinstance(v.type, TensorType) else ()


def _dim_arg(node: Node, index: int):
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get("dim")


def reduced_dims(node: Node) -> tuple[int, ...]:
    """The input dims a REDUCTION/NORM node reduces over (empty for inference batch norm)."""
    cls = classify(node)
    if cls.dims is None:
        return ()
    rank = len(shape(node.inputs[0]))
    if cls.dims.arg is None:
        return tuple(range(rank))
    arg = _dim_arg(node, cls.dims.arg)
    if cls.dims.last_of_arg:
        return tuple(range(rank - len(arg), rank))
    if arg is None or arg == []:
        return tuple(range(rank))
    dims = [arg] if isinstance(arg, int) else list(arg)
    return tuple(sorted({d % rank if rank else 0 for d in dims}))


def rows(node: Node) -> tuple:
    """(R, K) of a reducing node: R independent rows of K elements each (exact, like ``numel``)."""
    x = shape(node.inputs[0])
    k = 1
    for d in reduced_dims(node):
        k = k * x[d]
    k = _exact(k)
    total = numel(node.inputs[0])
    if isinstance(total, int) and isinstance(k, int):
        return (total // k if k else 0), k
    return _exact(sympy.sympify(total) / k), k


def iteration_numel(node: Node):
    """The element count a node's loop runs over: its first tensor result (a reduction's output rows)."""
    for r in node.results:
        if isinstance(r.type, TensorType):
            return numel(r)
    return 0
