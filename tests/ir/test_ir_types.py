"""Unit tests for kiln.ir.types: TensorType / ScalarType / NoneType, annotations, the dtype table,
symbolic dims, and the example-value -> type mapping used by the importers."""

from __future__ import annotations

import pytest
import sympy
import torch

from kiln.ir.infer import type_of_example
from kiln.ir.printer import format_type
from kiln.ir.types import (
    DTYPE_BY_NAME,
    DTYPES,
    LAYOUTS,
    SCALAR_KINDS,
    NoneType,
    QuantParams,
    ScalarType,
    SparsityInfo,
    TensorType,
    dtype_name,
    layout_of,
    sym,
)

s0, s1 = sym("s0"), sym("s1")


# -- the dtype table ---------------------------------------------------------------------------------

def test_dtype_table_is_a_bijection():
    assert len(set(DTYPES.values())) == len(DTYPES)
    assert all(DTYPE_BY_NAME[name] is dt for dt, name in DTYPES.items())
    for dt, name in [(torch.float32, "f32"), (torch.float16, "f16"), (torch.bfloat16, "bf16"),
                     (torch.int64, "i64"), (torch.int8, "i8"), (torch.uint8, "u8"), (torch.bool, "bool")]:
        assert dtype_name(dt) == name


def test_dtype_name_of_unsupported_dtype_raises():
    with pytest.raises(ValueError, match="qint8"):
        dtype_name(torch.qint8)


# -- symbolic dims -----------------------------------------------------------------------------------

def test_sym_is_a_positive_integer_symbol_and_stable():
    assert sym("s0") == s0
    assert s0.is_integer and s0.is_positive
    assert sym("s0") != sympy.Symbol("s0")  # assumptions are part of a sympy symbol's identity


def test_tensor_type_dims_are_normalized():
    t = TensorType((sympy.Integer(3), s0, 2 * s0 + 1), torch.float32)
    assert t.shape == (3, s0, 2 * s0 + 1)
    assert isinstance(t.shape[0], int)
    assert not t.is_static
    assert TensorType((2, 3), torch.float32).is_static
    assert t.free_symbols() == {s0}
    assert TensorType((s0, s1), torch.float32).free_symbols() == {s0, s1}
    assert TensorType((), torch.float32).free_symbols() == set()


@pytest.mark.parametrize("bad", [True, 2.0, "3", None])
def test_tensor_type_rejects_bad_dims(bad):
    with pytest.raises(TypeError, match="dim"):
        TensorType((bad,), torch.float32)


def test_tensor_type_rejects_torch_symint():
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    symint = env.create_unbacked_symint()
    with pytest.raises(TypeError, match="SymInt"):
        TensorType((symint,), torch.float32)


def test_tensor_type_numel_and_nbytes():
    t = TensorType((2, 3), torch.float32)
    assert t.rank == 2 and t.numel() == 6 and t.nbytes() == 24
    assert TensorType((4,), torch.float64).nbytes() == 32
    assert TensorType((4,), torch.int8).nbytes() == 4
    assert TensorType((), torch.float32).numel() == 1
    sym_t = TensorType((s0, 3), torch.float16)
    assert sympy.simplify(sym_t.numel() - 3 * s0) == 0
    assert sympy.simplify(sym_t.nbytes() - 6 * s0) == 0


def test_tensor_type_layouts():
    assert LAYOUTS == ("contiguous", "channels_last", "strided")
    assert TensorType((2,), torch.float32).layout == "contiguous"
    with pytest.raises(ValueError, match="layout"):
        TensorType((2,), torch.float32, layout="nhwc")


def test_types_are_structural_frozen_and_hashable():
    a = TensorType((2, s0), torch.float32)
    b = TensorType((2, s0), torch.float32)
    assert a == b and hash(a) == hash(b)
    assert a != TensorType((2, s0), torch.float64)
    assert a != TensorType((2, s1), torch.float32)
    assert a != a.with_(layout="strided")
    q = QuantParams("i8", "per_tensor", (0.5,), (0,))
    assert a.with_(quant=q) == b.with_(quant=QuantParams("i8", "per_tensor", (0.5,), (0,)))
    assert a.with_(quant=q) != a
    assert len({a, b, a.with_(dtype=torch.int8)}) == 2
    with pytest.raises(AttributeError):
        a.dtype = torch.float64  # type: ignore[misc]
    assert ScalarType("symint", s0) == ScalarType("symint", s0)
    assert NoneType() == NoneType() and hash(NoneType()) == hash(NoneType())


def test_with_keeps_other_fields():
    q = QuantParams("i8", "per_channel", (0.1, 0.2), (0, 1), axis=0)
    sp = SparsityInfo("n:m", 0.5, (2, 4))
    t = TensorType((2, 4), torch.int8, "strided", q, sp)
    u = t.with_(shape=(4, 2))
    assert (u.shape, u.dtype, u.layout, u.quant, u.sparsity) == ((4, 2), torch.int8, "strided", q, sp)
    assert t.with_(quant=None).quant is None and t.with_(quant=None).sparsity == sp


def test_scalar_type_kinds_and_exprs():
    assert SCALAR_KINDS == ("int", "float", "bool", "symint", "symfloat", "symbool")
    for kind in SCALAR_KINDS:
        assert ScalarType(kind).expr is None
    with pytest.raises(ValueError, match="scalar kind"):
        ScalarType("double")
    t = ScalarType("int", 3)
    assert isinstance(t.expr, sympy.Basic) and t.expr == 3
    assert ScalarType("symint", 2 * s0 + 1).expr.free_symbols == {s0}


def test_annotations_are_hashable_dataclasses():
    q = QuantParams("i8", "per_group", (0.5, 0.25), (0, 0), axis=1, group_size=32)
    assert hash(q) == hash(QuantParams("i8", "per_group", (0.5, 0.25), (0, 0), axis=1, group_size=32))
    sp = SparsityInfo("block", 0.25, (4, 4))
    assert sp == SparsityInfo("block", 0.25, (4, 4)) and sp != SparsityInfo("block", 0.5, (4, 4))


# -- example values -> types ---------------------------------------------------------------------------

def test_layout_of():
    x = torch.randn(2, 3, 4, 5)
    assert layout_of(x) == "contiguous"
    assert layout_of(x.to(memory_format=torch.channels_last)) == "channels_last"
    assert layout_of(x.permute(0, 2, 1, 3)) == "strided"
    assert layout_of(torch.randn(2, 3).t()) == "strided"
    assert layout_of(torch.randn(4, 4).to_sparse()) == "strided"


def test_type_of_example():
    x = torch.randn(2, 3, dtype=torch.float64)
    assert type_of_example(x) == TensorType((2, 3), torch.float64)
    assert type_of_example(x.t()) == TensorType((3, 2), torch.float64, "strided")
    assert type_of_example(None) == NoneType()
    assert type_of_example(3) == ScalarType("int", 3)
    assert type_of_example(True) == ScalarType("bool", sympy.true)
    assert type_of_example(2.5) == ScalarType("float")
    with pytest.raises(Exception, match="no type"):
        type_of_example("a string")


def test_symbolic_example_dims_become_kiln_symbols():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from kiln.frontend.fx_import import example_type

    mode = FakeTensorMode(shape_env=ShapeEnv())
    fake = mode.from_tensor(torch.randn(5, 3))
    t = example_type(fake)
    assert t.dtype == torch.float32 and t.rank == 2 and not t.is_static
    for d in t.shape:  # every dim is symbolic, spelled like kiln.ir.types.sym makes it
        assert isinstance(d, sympy.Symbol) and d == sym(d.name)
    assert example_type(fake[0]).shape == (t.shape[1],)


# -- printing of types (the parser side is in test_ir_printer_parser.py) -------------------------------

@pytest.mark.parametrize("t, text", [
    (TensorType((2, 3), torch.float32), "f32[2, 3]"),
    (TensorType((), torch.int64), "i64[]"),
    (TensorType((s0, 2 * s0 + 1), torch.bfloat16), "bf16[s0, 2*s0 + 1]"),
    (TensorType((1, 2, 3, 4), torch.float16, "channels_last"), 'f16[1, 2, 3, 4] #{layout = "channels_last"}'),
    (ScalarType("symint", s0), "symint(s0)"),
    (ScalarType("float"), "float"),
    (ScalarType("bool", sympy.true), "bool(True)"),
    (NoneType(), "none"),
])
def test_format_type(t, text):
    assert format_type(t) == text


def test_format_type_with_quant_and_sparsity():
    t = TensorType((4, 8), torch.int8, quant=QuantParams("i8", "per_channel", (0.5, 0.25), (0, 3), axis=0),
                   sparsity=SparsityInfo("n:m", 0.5, (2, 4)))
    assert format_type(t) == ('i8[4, 8] #{quant = {qdtype = "i8", scheme = "per_channel", scale = [0.5, 0.25], '
                              'zero_point = [0, 3], axis = 0}, sparsity = {kind = "n:m", density = 0.5, '
                              'block = [2, 4]}}')
    with pytest.raises(TypeError):
        format_type("f32")  # type: ignore[arg-type]
