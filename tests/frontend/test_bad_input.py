"""Bad input gives a kiln error type with a message that names what is wrong, never a bare traceback
from deep inside torch or kiln: ``kiln.compile`` arguments, ``CompiledModel`` calls,
``torch.compile(..., backend="kiln", options=...)``, malformed IR text, and models torch.export rejects.
"""

from __future__ import annotations

import re

import pytest
import torch

import kiln
from kiln.errors import KilnError, KilnInputError, KilnParseError
from kiln.ir.parser import parse_graph
from kiln.ir.printer import print_graph
from kiln.numerics import assert_match


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and every exception it wraps (cause, context, Dynamo's ``inner_exception``)."""
    seen: list[BaseException] = []
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or any(x is s for s in seen):
            continue
        seen.append(x)
        todo += [x.__cause__, x.__context__, getattr(x, "inner_exception", None)]
    return seen


def _kiln_error(e: BaseException, kind: type[KilnError]) -> KilnError:
    found = [x for x in _chain(e) if isinstance(x, kind)]
    assert found, f"no {kind.__name__} in the exception chain of {type(e).__name__}: {e}"
    return found[0]


class TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x).relu()


class DataDependent(torch.nn.Module):
    """Python control flow on a tensor value: torch.export cannot capture it, Dynamo graph-breaks."""

    def forward(self, x):
        y = x * 3
        if y.sum() > 0:
            return y.sin() + 1
        return y.cos() - 1


@pytest.fixture(scope="module")
def compiled_linear():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).eval()
    return model, kiln.compile(model, (torch.randn(2, 8),))


# -- kiln.compile: the model -------------------------------------------------------------------------

@pytest.mark.parametrize("model, kind", [(lambda x: x + 1, "function"), (3, "int"), ("model", "str")])
def test_compile_rejects_non_module(model, kind):
    with pytest.raises(KilnInputError, match=rf"expected a torch\.nn\.Module, got {kind}"):
        kiln.compile(model, (torch.randn(2, 8),))


# -- kiln.compile: example inputs ---------------------------------------------------------------------

@pytest.mark.parametrize("inputs, expected", [
    ({"x": torch.randn(2, 8)}, r"example_inputs must be a tuple of tensors, got dict"),
    ("x", r"example_inputs must be a tuple of tensors, got str"),
    (None, r"example_inputs must be a tuple of tensors, got NoneType"),
    (["a"], r"example input 0 is a str; kiln takes tensors"),
    ([torch.randn(2, 8), {"b": 1}], r"example input 1 is a dict; kiln takes tensors"),
])
def test_compile_rejects_wrong_input_types(inputs, expected):
    with pytest.raises(KilnInputError, match=expected):
        kiln.compile(torch.nn.Linear(8, 4), inputs)


@pytest.mark.parametrize("model, name", [(torch.nn.Linear(8, 4), "Linear"), (TinyClassifier(), "TinyClassifier")])
def test_compile_rejects_wrong_input_shape(model, name):
    with pytest.raises(KilnInputError) as info:
        kiln.compile(model.eval(), (torch.randn(2, 3),))
    msg = str(info.value)
    assert f"torch.export failed for {name}" in msg  # names the model ...
    assert "[2, 3] X [8, 4]" in msg  # ... and the failure: the shapes that do not fit
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's own error stays chained for details
    assert "\n" not in msg  # one clear line, not torch's multi-page report


def test_compile_rejects_bad_options():
    m, x = torch.nn.Linear(8, 4), (torch.randn(2, 8),)
    with pytest.raises(KilnInputError, match=r"unknown target 'bogus'; known targets: .*reference"):
        kiln.compile(m, x, target="bogus")
    with pytest.raises(KilnInputError, match=r"unknown pass or pipeline 'bogus'.*passes: .*cse"):
        kiln.compile(m, x, pipeline="cse,bogus")
    with pytest.raises(KilnInputError, match=r"unknown kiln option\(s\) \['nope'\]"):
        kiln.compile(m, x, nope=1)
    with pytest.raises(KilnInputError, match=r"option 'verify' must be True or False"):
        kiln.compile(m, x, verify="yes")


# -- calling a CompiledModel ----------------------------------------------------------------------------

def test_compiled_model_runs_good_input(compiled_linear):
    model, cm = compiled_linear
    x = torch.randn(2, 8)
    assert_match(cm(x), model(x))


@pytest.mark.parametrize("args, expected", [
    ((torch.randn(2, 3),), r"input 0 \(%\w+\): expected f32\[2, 8\], got f32\[2, 3\]"),
    ((torch.randn(3, 8),), r"input 0 \(%\w+\): expected f32\[2, 8\], got f32\[3, 8\]"),
    ((torch.randn(2, 8, 1),), r"input 0 \(%\w+\): expected f32\[2, 8\], got f32\[2, 8, 1\]"),
    ((torch.randn(2, 8, dtype=torch.float64),), r"input 0 \(%\w+\): expected f32\[2, 8\], got f64\[2, 8\]"),
    ((torch.ones(2, 8, dtype=torch.int64),), r"input 0 \(%\w+\): expected f32\[2, 8\], got i64\[2, 8\]"),
    (("x",), r"input 0 \(%\w+\): expected a tensor f32\[2, 8\], got str"),
    ((torch.randn(2, 8), torch.randn(2, 8)), r"graph 'linear' takes 1 input\(s\) \(f32\[2, 8\]\), got 2"),
    ((), r"graph 'linear' takes 1 input\(s\) \(f32\[2, 8\]\), got 0"),
])
def test_compiled_model_rejects_bad_call(compiled_linear, args, expected):
    _, cm = compiled_linear
    with pytest.raises(KilnInputError, match=expected):
        cm(*args)


def test_compiled_model_checks_symbolic_dims_agree():
    class Add(torch.nn.Module):
        def forward(self, a, b):
            return a + b

    batch = torch.export.Dim("batch", min=2, max=64)
    cm = kiln.compile(Add(), (torch.randn(4, 3), torch.randn(4, 3)),
                      dynamic_shapes=({0: batch}, {0: batch}))
    a = torch.randn(6, 3)
    assert_match(cm(a, a), a + a)  # a different batch size is fine ...
    with pytest.raises(KilnInputError, match=r"input 1 \(%\w+\): dim \w+ is 5 here but 6 in an earlier input"):
        cm(a, torch.randn(5, 3))  # ... but both inputs must agree on it


# -- torch.compile(backend="kiln", options=...) -------------------------------------------------------

@pytest.mark.parametrize("options, expected", [
    ({"nope": 1}, "unknown kiln option(s) ['nope']; valid options: ['backend_options', 'check',"),
    ({"target": "bogus"}, "unknown target 'bogus'; known targets: reference"),
    ({"pipeline": "cse,bogus"}, "unknown pass or pipeline 'bogus'; pipelines: O0, O1, O2; passes:"),
    ({"verify": 1}, "option 'verify' must be True or False, got 1"),
    ({"pipeline": 3}, "option 'pipeline' must be a string, got int"),
])
def test_torch_compile_rejects_bad_options(options, expected):
    fn = torch.compile(torch.nn.Linear(8, 4), backend="kiln", options=options)
    with pytest.raises(Exception) as info:  # noqa: B017 - Dynamo may wrap it in BackendCompilerFailed
        fn(torch.randn(2, 8))
    err = _kiln_error(info.value, KilnInputError)
    assert expected in str(err)
    assert expected in str(info.value)  # what the user sees at the top names the problem too


def test_torch_compile_unknown_target_lists_valid_targets():
    fn = torch.compile(torch.nn.Linear(8, 4), backend="kiln", options={"target": "bogus"})
    with pytest.raises(Exception) as info:  # noqa: B017
        fn(torch.randn(2, 8))
    msg = str(_kiln_error(info.value, KilnInputError))
    from kiln.backends.base import available_backends

    for target in available_backends():
        assert target in msg


# -- malformed IR text ---------------------------------------------------------------------------------

def _valid_ir() -> str:
    g = kiln.compile(torch.nn.Linear(8, 4), (torch.randn(2, 8),)).graph
    text = print_graph(g)
    parse_graph(text)  # the baseline parses
    return text


@pytest.fixture(scope="module")
def valid_ir() -> str:
    return _valid_ir()


def _position(text: str, needle: str) -> tuple[int, int]:
    """1-based line and column of the first occurrence of ``needle``."""
    i = text.index(needle)
    line = text.count("\n", 0, i) + 1
    return line, i - (text.rfind("\n", 0, i) + 1) + 1


@pytest.mark.parametrize("corrupt, at, expected", [
    (lambda t: t.replace("aten.addmm", "aten.no_such_op"), "aten.no_such_op", "unknown op 'aten.no_such_op'"),
    (lambda t: t.replace(": f32[2, 4]", ": q32[2, 4]", 1), "q32", "expected a type, found 'q32'"),
    (lambda t: t.replace("aten.addmm(", "aten.addmm(?", 1), "?", "unexpected character '?'"),
    (lambda t: t.replace("return %addmm", "return %nowhere"), "%nowhere", "undefined value %nowhere"),
])
def test_parse_error_has_line_and_column(valid_ir, corrupt, at, expected):
    text = corrupt(valid_ir)
    line, col = _position(text, at)
    with pytest.raises(KilnParseError) as info:
        parse_graph(text, source="bad.kir")
    e = info.value
    assert (e.line, e.column) == (line, col), str(e)
    assert str(e).startswith(f"bad.kir:{line}:{col}: ")
    assert expected in str(e)


@pytest.mark.parametrize("text, expected", [
    ("", r"^<ir>:1:1: expected 'graph'"),
    ("graph @g(%x: f32[2]) -> (f32[2]) {\n  %y = aten.relu(%x) : f32[2]\n  return %y\n", r"^<ir>:4:1: expected '}'"),
    ("graph @g(%x: f32[2]) -> (f32[2]) {\n  %y = aten.relu(%x) : f32[2\n  return %y\n}", r"^<ir>:\d+:\d+: "),
])
def test_parse_error_truncated_text(text, expected):
    with pytest.raises(KilnParseError, match=expected) as info:
        parse_graph(text)
    assert re.match(r"<ir>:\d+:\d+: \S", str(info.value))


# -- a model torch.export cannot capture ---------------------------------------------------------------

def test_export_failure_is_input_error_but_dynamo_graph_breaks():
    model = DataDependent()
    with pytest.raises(KilnInputError, match=r"torch\.export failed for DataDependent") as info:
        kiln.compile(model, (torch.randn(5),))
    assert "\n" not in str(info.value)
    assert info.value.__cause__ is not None  # torch's explanation stays reachable

    n = len(kiln.fallback_reports())
    compiled = torch.compile(model, backend="kiln")
    for sign in (1.0, -1.0):  # both branches of the Python `if`
        x = torch.rand(5) * sign
        assert_match(compiled(x), model(x), f"branch sign={sign}")
    reports = kiln.fallback_reports()[n:]
    assert len(reports) >= 2, reports  # a graph break: the code around the `if` is several graphs
    assert all(r["reason"] is None for r in reports), reports  # each compiled by kiln, not eager
