"""The text form of kiln IR: print -> parse -> print is the identity (for every construct the IR has),
and malformed text raises KilnParseError at the right line and column with a helpful message."""

from __future__ import annotations

import math

import pytest
import sympy
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.export import Dim

from kiln.errors import KilnParseError
from kiln.frontend.export import from_export
from kiln.ir.builder import Builder
from kiln.ir.clone import clone_graph
from kiln.ir.graph import Graph
from kiln.ir.ops import FUSED, aten, get_op
from kiln.ir.parser import parse_graph
from kiln.ir.printer import format_literal, print_graph
from kiln.ir.to_fx import to_fx
from kiln.ir.types import NoneType, QuantParams, ScalarType, SparsityInfo, TensorType, sym
from kiln.ir.verifier import verify

F32 = torch.float32
s0 = sym("s0")


def all_weights(g: Graph) -> dict[str, torch.Tensor]:
    out = dict(g.weights)
    for n in g.nodes:
        if n.subgraph is not None:
            out.update(all_weights(n.subgraph))
    return out


def roundtrip(g: Graph) -> Graph:
    """print -> parse -> print must be identical; the parsed graph has the same structure and types."""
    text = print_graph(g)
    g2 = parse_graph(text, weights=all_weights(g))
    assert print_graph(g2) == text
    assert g2.name == g.name
    assert [v.type for v in g2.inputs] == [v.type for v in g.inputs]
    assert [v.type for v in g2.outputs] == [v.type for v in g.outputs]
    assert len(g2.nodes) == len(g.nodes)
    for a, b in zip(g.nodes, g2.nodes):
        assert a.op is b.op
        assert [r.type for r in a.results] == [r.type for r in b.results]
        assert [r.name for r in a.results] == [r.name for r in b.results]
        assert (a.subgraph is None) == (b.subgraph is None)
    return g2


def assert_same_outputs(g1: Graph, g2: Graph, inputs: tuple) -> None:
    with torch.no_grad():
        out1, out2 = to_fx(g1)(*inputs), to_fx(g2)(*inputs)
    assert len(out1) == len(out2)
    for a, b in zip(out1, out2):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)
        else:
            assert a == b


# -- round trips of built graphs ------------------------------------------------------------------------

def test_multi_result_ops_roundtrip_and_run():
    torch.manual_seed(0)
    g = Graph("multi")
    x = g.add_input(TensorType((4, 6), F32), "x")
    b = Builder(g)
    values, indices = b.call(aten.max.dim, x, 1, True)
    w, bias = torch.randn(6), torch.randn(6)
    ln = b.call(aten.native_layer_norm, x, [6], b.weight("ln.weight", w), b.weight("ln.bias", bias), 1e-05)
    assert len(ln) == 3
    g.set_outputs([values, indices, *ln])
    text = print_graph(g)
    assert "%0, %1 = aten.max.dim(%x, 1, true) : (f32[4, 1], i64[4, 1])" in text
    assert "aten.native_layer_norm(%x, [6], %ln_weight, %ln_bias, 1e-05) : (f32[4, 6], f32[4, 1], f32[4, 1])" \
        in text
    g2 = roundtrip(g)
    verify(g2)
    xin = torch.randn(4, 6)
    out = to_fx(g2)(xin)
    ev, ei = torch.max(xin, 1, keepdim=True)
    ey = torch.nn.functional.layer_norm(xin, [6], w, bias, 1e-05)
    torch.testing.assert_close(out[0], ev, rtol=0, atol=0)
    torch.testing.assert_close(out[1], ei, rtol=0, atol=0)
    torch.testing.assert_close(out[2], ey, rtol=1e-5, atol=1e-6)


def test_symbolic_dims_from_builder():
    g = Graph("sym")
    x = g.add_input(TensorType((s0, 3), F32), "x")
    b = Builder(g)
    first = b.call(aten.slice.Tensor, x, 0, 0, 1)
    cat = b.call(aten.cat, [x, x, first], 0)
    size = b.call(aten.sym_size.int, cat, 0)
    doubled = b.call(get_op("sym.mul"), size, 2)
    g.set_outputs([cat, doubled])
    assert cat.type.shape == (2 * s0 + 1, 3)
    assert doubled.type == ScalarType("symint", 4 * s0 + 2)
    text = print_graph(g)
    assert "-> (f32[2*s0 + 1, 3], symint(4*s0 + 2))" in text
    g2 = roundtrip(g)
    # the parsed symbol is kiln's own spelling (integer, positive), not a bare sympy Symbol
    (parsed_s0,) = g2.inputs[0].type.free_symbols()
    assert parsed_s0 == s0 and parsed_s0.is_positive
    verify(g2)
    for n in (2, 5):
        out = to_fx(g2)(torch.randn(n, 3))
        assert out[0].shape == (2 * n + 1, 3) and out[1] == 4 * n + 2


class _Outer(torch.nn.Module):
    def forward(self, x):
        y = torch.cat([x, x, x[:1]])  # [2*s + 1]
        return x[:, None] * y[None, :], x.shape[0] * 2


def test_symbolic_dims_from_torch_export():
    g = from_export(_Outer(), (torch.randn(4),), dynamic_shapes={"x": {0: Dim("s0", min=2, max=64)}})
    (s,) = g.inputs[0].type.free_symbols()
    assert g.outputs[0].type.shape == (s, 2 * s + 1)
    assert isinstance(g.outputs[1].type, ScalarType) and g.outputs[1].type.kind == "symint"
    assert sympy.simplify(g.outputs[1].type.expr - 2 * s) == 0
    text = print_graph(g)
    assert f"f32[{s}, 2*{s} + 1]" in text
    g2 = roundtrip(g)
    verify(g2)
    xin = torch.randn(7)
    prod, n = to_fx(g2)(xin)
    torch.testing.assert_close(prod, _Outer()(xin)[0], rtol=0, atol=0)
    assert n == 14


def test_scalar_and_none_types_roundtrip():
    g = Graph("scalars")
    x = g.add_input(TensorType((s0, 2), F32), "x")
    n = g.add_input(ScalarType("symint", s0), "n")
    f = g.add_input(ScalarType("float"), "f")
    flag = g.add_input(ScalarType("bool", sympy.true), "flag")
    k = g.add_input(ScalarType("int", 3), "k")
    sf = g.add_input(ScalarType("symfloat"), "sf")
    sb = g.add_input(ScalarType("symbool"), "sb")
    b = Builder(g)
    y = b.call(aten.mul.Tensor, x, f)
    m = b.call(get_op("sym.add"), n, k)
    g.set_outputs([y, m, flag, sf, sb])
    text = print_graph(g)
    assert ("(%x: f32[s0, 2], %n: symint(s0), %f: float, %flag: bool(True), %k: int(3), %sf: symfloat, "
            "%sb: symbool)") in text
    assert "symint(s0 + 3)" in text
    roundtrip(g)
    g3 = Graph("nothing")
    g3.add_input(NoneType(), "z")
    assert "(%z: none) -> ()" in print_graph(g3)
    roundtrip(g3)


LITERALS = {
    "none": None, "t": True, "f": False, "zero": 0, "i": 42, "neg": -7, "big": 2**63 - 1,
    "fl": 2.5, "negf": -0.125, "eps": 1e-05, "huge": 1e300, "inf": math.inf, "ninf": -math.inf,
    "nan": math.nan, "negzero": -0.0,
    "s": 'say "hi"\\ \n\t tab é ☃', "empty": "", "lst": [1, -2, [3.5, None, "x"]], "nil": [],
    "dt": torch.bfloat16, "dev": torch.device("cpu"), "lay": torch.strided,
    "mf": torch.channels_last, "mf2": torch.contiguous_format, "nested": {"a": 1, "b": {"c": [True]}},
}


def test_every_literal_kind_roundtrips_as_attrs():
    g = Graph("lits")
    x = g.add_input(TensorType((2,), F32), "x")
    node = g.create_node(aten.neg.default, [x], attrs=dict(LITERALS))
    g.set_outputs([node.output])
    text = print_graph(g)
    for spelled in ['none = none', "t = true", "f = false", "neg = -7", "eps = 1e-05", "huge = 1e+300",
                    "inf = inf", "ninf = -inf", "nan = nan", "negzero = -0.0", r'"say \"hi\"\\ \n\t tab',
                    'lst = [1, -2, [3.5, none, "x"]]', "nil = []", "dt = dtype(bf16)", 'dev = device("cpu")',
                    "lay = layout(strided)", "mf = memory_format(channels_last)",
                    "nested = {a = 1, b = {c = [true]}}"]:
        assert spelled in text, spelled
    g2 = roundtrip(g)
    attrs = g2.nodes[0].attrs
    assert list(attrs) == list(LITERALS)
    for key, want in LITERALS.items():
        got = attrs[key]
        if isinstance(want, float) and math.isnan(want):
            assert math.isnan(got)
        else:
            assert got == want and type(got) is type(want), key
    assert math.copysign(1.0, attrs["negzero"]) == -1.0


def test_literals_and_kwargs_as_op_arguments():
    g = Graph("args")
    x = g.add_input(TensorType((1, 2, 3, 4), F32), "x")
    b = Builder(g)
    full = b.call(aten.full, [2, 3], -math.inf, dtype=F32, layout=torch.strided, device=torch.device("cpu"),
                  pin_memory=False)
    cl = b.call(aten.clone, x, memory_format=torch.channels_last)
    gelu = b.call(aten.gelu, x, approximate="tanh")
    add = b.call(aten.add.Tensor, x, 1, alpha=-2)
    fill = b.call(aten.full, [2], math.nan, dtype=torch.float64)
    g.set_outputs([full, cl, gelu, add, fill])
    text = print_graph(g)
    assert ('aten.full([2, 3], -inf, dtype=dtype(f32), layout=layout(strided), device=device("cpu"), '
            "pin_memory=false)") in text
    assert 'aten.clone(%x, memory_format=memory_format(channels_last)) : f32[1, 2, 3, 4] #{layout = ' \
           '"channels_last"}' in text
    assert 'aten.gelu(%x, approximate="tanh")' in text
    assert "aten.add.Tensor(%x, 1, alpha=-2)" in text
    g2 = roundtrip(g)
    assert g2.nodes[0].kwargs == {"dtype": F32, "layout": torch.strided, "device": torch.device("cpu"),
                                  "pin_memory": False}
    assert g2.nodes[1].results[0].type.layout == "channels_last"
    verify(g2)
    xin = torch.randn(1, 2, 3, 4)
    assert_same_outputs(g, g2, (xin,))
    assert to_fx(g2)(xin)[1].is_contiguous(memory_format=torch.channels_last)


def test_type_annotations_roundtrip():
    q = QuantParams("i8", "per_channel", (0.5, 0.25), (0, -3), axis=0)
    qg = QuantParams("i4", "per_group", (0.125,), (8,), axis=1, group_size=32)
    sp = SparsityInfo("n:m", 0.5, (2, 4))
    g = Graph("annotated")
    x = g.add_input(TensorType((1, 2, 3, 4), F32, "channels_last"), "x")
    g.add_input(TensorType((2, 64), torch.int8, quant=qg), "packed")
    g.add_input(TensorType((2, 8), F32, "strided", q, SparsityInfo("unstructured", 0.1)), "all")
    w = Builder(g).weight("w", torch.zeros(2, 8, dtype=torch.int8))
    w.type = w.type.with_(quant=q, sparsity=sp)
    g.set_outputs([x, w])
    text = print_graph(g)
    assert '#{layout = "channels_last"}' in text
    assert 'quant = {qdtype = "i8", scheme = "per_channel", scale = [0.5, 0.25], zero_point = [0, -3], ' \
           'axis = 0}' in text
    assert 'sparsity = {kind = "n:m", density = 0.5, block = [2, 4]}' in text
    g2 = roundtrip(g)
    assert g2.inputs[1].type.quant == qg
    assert g2.nodes[0].output.type.quant == q and g2.nodes[0].output.type.sparsity == sp
    verify(g2)  # annotations are kiln's own: the weight still matches its tensor


def _fused_graph() -> tuple[Graph, torch.Tensor]:
    scale = torch.tensor([1.0, -2.0, 0.5])
    sub = Graph("ew0")
    a = sub.add_input(TensorType((s0, 3), F32), "a")
    sb = Builder(sub)
    m = sb.call(aten.mul.Tensor, a, 0.5)
    s = sb.call(aten.mul.Tensor, m, sb.weight("scale", scale))
    r = sb.call(aten.relu, s)
    sub.set_outputs([r, m])
    g = Graph("outer")
    x = g.add_input(TensorType((s0, 3), F32), "x")
    fused = g.create_node(FUSED, [x], subgraph=sub, attrs={"kind": "pointwise"}, names=["y", "m"])
    z = Builder(g).call(aten.neg, fused.results[0])
    g.set_outputs([z, fused.results[1]])
    return g, scale


def test_nested_region_roundtrips_and_runs():
    g, scale = _fused_graph()
    text = print_graph(g)
    assert '%y, %m = kiln.fused(%x) {kind = "pointwise"} : (f32[s0, 3], f32[s0, 3]) graph @ew0(' in text
    assert "      %0 = aten.mul.Tensor(%a, 0.5) : f32[s0, 3]" in text  # region body indented one level more
    assert "      return %2, %0" in text
    g2 = roundtrip(g)
    sub2 = g2.nodes[0].subgraph
    assert sub2.name == "ew0" and [v.name for v in sub2.inputs] == ["a"]
    assert sub2.weights["scale"] is scale
    verify(g2)
    xin = torch.randn(5, 3)
    out = to_fx(g2)(xin)
    torch.testing.assert_close(out[0], -torch.relu(xin * 0.5 * scale), rtol=0, atol=0)
    torch.testing.assert_close(out[1], xin * 0.5, rtol=0, atol=0)


def test_region_scope_is_isolated():
    g, _ = _fused_graph()
    text = print_graph(g).replace("aten.mul.Tensor(%a, 0.5)", "aten.mul.Tensor(%x, 0.5)")
    with pytest.raises(KilnParseError, match="undefined value %x"):
        parse_graph(text)


def test_zero_result_node_roundtrips():
    g = Graph("asserts")
    g.add_input(TensorType((2,), F32), "x")
    flag = g.add_input(ScalarType("symbool"), "flag")
    node = g.create_node(aten._assert_scalar.default, [flag, "x must be positive"])
    assert node.results == []
    text = print_graph(g)
    assert '  aten._assert_scalar(%flag, "x must be positive") : ()' in text
    roundtrip(g)


def test_exported_model_roundtrip_and_clone_print_identically():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5)).eval()
    xin = torch.randn(2, 3, 6, 6)
    g = from_export(model, (xin,))
    assert print_graph(clone_graph(g)) == print_graph(g)
    g2 = roundtrip(g)
    verify(g2)
    with torch.no_grad():
        torch.testing.assert_close(to_fx(g2)(xin)[0], model(xin), rtol=1e-5, atol=1e-5)


def test_comments_are_whitespace():
    text = """## a comment line
graph @g(%x: f32[2]) -> (f32[2]) {  ## trailing comment
  %y = aten.neg(%x) : f32[2]
  return %y
}"""
    assert print_graph(parse_graph(text)) == "\n".join(
        ["graph @g(%x: f32[2]) -> (f32[2]) {", "  %y = aten.neg(%x) : f32[2]", "  return %y", "}"])


def test_parse_attaches_weights_by_name():
    g = Graph("w")
    w = torch.randn(3)
    g.set_outputs([Builder(g).weight("fc.weight", w)])
    text = print_graph(g)
    assert 'kiln.weight() {name = "fc.weight"} : f32[3]' in text
    assert parse_graph(text, weights={"fc.weight": w}).weights["fc.weight"] is w
    assert parse_graph(text).weights == {}  # no weights given: text only


def test_format_literal_rejects_unknown_objects():
    with pytest.raises(TypeError, match="no spelling"):
        format_literal(object())


# -- random pointwise graphs ------------------------------------------------------------------------------

UNARY = [aten.neg, aten.relu, aten.abs, aten.sigmoid, aten.tanh]
BINARY = [aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.maximum]
SCALAR_OPS = [aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor]
SHAPES = [(2, 3), (3,), (1, 3)]
NAMES = st.one_of(st.none(), st.text(alphabet="abcxyz_0123-.", min_size=1, max_size=4))


@st.composite
def pointwise_graphs(draw):
    g = Graph("rand")
    vals = [g.add_input(TensorType(draw(st.sampled_from(SHAPES)), F32), draw(NAMES))
            for _ in range(draw(st.integers(1, 3)))]
    b = Builder(g)
    for _ in range(draw(st.integers(1, 8))):
        a = draw(st.sampled_from(vals))
        kind = draw(st.sampled_from(["unary", "binary", "scalar"]))
        name = draw(NAMES)
        if kind == "unary":
            v = b.call(draw(st.sampled_from(UNARY)), a, name=name)
        elif kind == "binary":
            v = b.call(draw(st.sampled_from(BINARY)), a, draw(st.sampled_from(vals)), name=name)
        else:
            scalar = draw(st.one_of(st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True)))
            v = b.call(draw(st.sampled_from(SCALAR_OPS)), a, scalar, name=name)
        vals.append(v)
    g.set_outputs(draw(st.lists(st.sampled_from(vals), min_size=1, max_size=3)))
    return g


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pointwise_graphs())
def test_random_pointwise_graphs_roundtrip(g):
    g2 = roundtrip(g)
    verify(g2)
    gen = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(v.type.shape, generator=gen) for v in g.inputs)
    assert_same_outputs(g, g2, inputs)


# -- parse errors -------------------------------------------------------------------------------------------

GOOD = """graph @g(%x: f32[2, 3]) -> (f32[2, 3]) {
  %y = aten.neg(%x) : f32[2, 3]
  return %y
}"""


def _edit(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new, 1)


# (id, malformed text, marker: the error points at the first character of this (unique) substring, or
#  None for end of input; a fragment of the expected message)
PARSE_ERRORS = [
    ("missing-close-brace", GOOD[:-1], None, "expected '}', found 'end of input'"),
    ("missing-return", _edit("  return %y\n", ""), "}", "expected an op name, found '}'"),
    ("unterminated-graph", GOOD.split("  return")[0], None, "unterminated graph: expected 'return'"),
    ("undefined-value", _edit("aten.neg(%x)", "aten.neg(%z)"), "%z", "use of undefined value %z"),
    ("undefined-output", _edit("return %y", "return %w"), "%w", "use of undefined value %w"),
    ("duplicate-definition", _edit("  return", "  %y = aten.relu(%x) : f32[2, 3]\n  return"),
     "%y = aten.relu", "value %y is defined twice"),
    ("duplicate-input", _edit("%x: f32[2, 3])", "%x: f32[2, 3], %x: f32[3])"), "%x: f32[3]",
     "value %x is defined twice"),
    ("unknown-op", _edit("aten.neg", "aten.no_such_op"), "aten.no_such_op", "unknown op 'aten.no_such_op'"),
    ("unknown-namespace", _edit("aten.neg", "nosuchns.neg"), "nosuchns", "unknown op 'nosuchns.neg'"),
    ("bad-dtype", _edit(": f32[2, 3]\n", ": f33[2, 3]\n"), "f33", "expected a type, found 'f33'"),
    ("bad-dtype-literal", _edit("aten.neg(%x)", "aten.neg(%x, dtype(q8))"), "q8", "bad dtype literal 'q8'"),
    ("bad-layout-literal", _edit("aten.neg(%x)", "aten.neg(%x, layout(zigzag))"), "zigzag",
     "bad layout literal 'zigzag'"),
    ("bad-memory-format", _edit("aten.neg(%x)", "aten.neg(%x, memory_format(strided))"), "strided",
     "bad memory_format literal"),
    ("unterminated-string", _edit("aten.neg(%x)", 'aten.neg(%x) {note = "abc'), '"abc',
     "unterminated string"),
    ("unterminated-string-before-another", _edit("aten.neg(%x)", 'aten.neg(%x) {note = "abc}') + "\n" + '"',
     '"abc', "unterminated string"),
    ("garbage-char", _edit("aten.neg(%x)", "aten.neg(%x) $"), "$", "unexpected character '$'"),
    ("garbage-char-in-type", _edit("%x: f32[2, 3]", "%x: f32[2, 3]!"), "!", "unexpected character '!'"),
    ("too-many-result-types", _edit(": f32[2, 3]\n", ": (f32[2, 3], f32[2, 3])\n"), "aten.neg",
     "1 results named but 2 types given"),
    ("too-few-result-types", _edit("%y = aten.neg", "%y, %z = aten.neg"), "aten.neg",
     "2 results named but 1 types given"),
    ("return-type-mismatch", _edit("-> (f32[2, 3])", "-> (f32[2, 4])"), "return",
     "returned values do not match the declared result types"),
    ("float-dim", _edit("%x: f32[2, 3]", "%x: f32[2.5, 3]"), "2.5", "a dim must be an integer"),
    ("bad-symbolic-dim", _edit("%x: f32[2, 3]", "%x: f32[s0 +, 3]"), "s0 +", "bad symbolic expression 's0 +'"),
    ("unknown-annotation", _edit("%x: f32[2, 3]", "%x: f32[2, 3] #{color = 1}"), "{color",
     "unknown type annotation(s) ['color']"),
    ("bad-layout-annotation", _edit("%x: f32[2, 3]", '%x: f32[2, 3] #{layout = "nhwc"}'), "{layout",
     "unknown layout 'nhwc'"),
    ("positional-after-keyword", _edit("aten.neg(%x)", "aten.neg(a=1, %x)"), "%x) :", "positional argument after"),
    ("value-in-attrs", _edit("aten.neg(%x)", "aten.neg(%x) {a = %x}"), "%x}", "values are not allowed here"),
    ("missing-colon", _edit("aten.neg(%x) : f32", "aten.neg(%x) f32"), "f32[2, 3]\n  return",
     "expected ':', found 'f32'"),
    ("no-graph-keyword", _edit("graph @g", "grph @g"), "grph", "expected 'graph', found 'grph'"),
    ("no-graph-name", _edit("graph @g", "graph g"), "g(", "expected a graph name"),
    ("trailing-text", GOOD + "\nextra", "extra", "unexpected 'extra' after the graph"),
    ("empty-input", "", None, "expected 'graph', found 'end of input'"),
]


def _position(text: str, marker: str | None) -> tuple[int, int]:
    if marker is None:
        lines = text.split("\n")
        return len(lines), len(lines[-1]) + 1
    assert text.count(marker) >= 1, marker
    offset = text.index(marker)
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


@pytest.mark.parametrize("text, marker, message", [c[1:] for c in PARSE_ERRORS], ids=[c[0] for c in PARSE_ERRORS])
def test_parse_errors_point_at_the_offending_token(text, marker, message):
    with pytest.raises(KilnParseError) as info:
        parse_graph(text, source="model.kir")
    e = info.value
    assert message in str(e)
    line, column = _position(text, marker)
    assert (e.line, e.column) == (line, column), str(e)
    assert e.source == "model.kir"
    assert str(e).startswith(f"model.kir:{line}:{column}: ")


def test_the_good_text_parses():
    assert print_graph(parse_graph(GOOD)) == GOOD


def test_missing_weight_is_a_parse_error():
    text = """graph @g() -> (f32[3]) {
  %w = kiln.weight() {name = "fc.weight"} : f32[3]
  return %w
}"""
    with pytest.raises(KilnParseError, match="weight 'fc.weight' is not in the weights file") as info:
        parse_graph(text, weights={"other": torch.zeros(3)})
    assert (info.value.line, info.value.column) == (2, 8)


def test_parse_error_is_a_kiln_error():
    from kiln.errors import KilnError

    with pytest.raises(KilnError):
        parse_graph("graph")
