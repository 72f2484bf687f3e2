"""The pass registry and manager: pipelines by name, instruments (timing, IR dumps, verify-after,
numerics), and errors that name the pass at fault."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import kiln.passes.base as passes_base
import kiln.passes.manager as manager
from kiln.errors import KilnError, KilnInputError, VerificationError
from kiln.ir.builder import Builder
from kiln.ir.graph import Graph
from kiln.ir.ops import aten
from kiln.ir.parser import parse_graph
from kiln.ir.printer import print_graph
from kiln.ir.to_fx import to_fx
from kiln.ir.types import TensorType
from kiln.ir.verifier import verify
from kiln.numerics import NumericsError, assert_match
from kiln.passes.base import Pass, PassContext, PassResult, get_pass, register_pass, registered_passes
from kiln.passes.manager import (
    PIPELINES,
    DumpIRInstrument,
    Instrument,
    NumericsInstrument,
    PassManager,
    TimingInstrument,
    VerifyInstrument,
    parse_pipeline,
    register_pipeline,
)

F32 = torch.float32
O1 = ["canonicalize", "constant-fold", "cse", "dce"]


@pytest.fixture
def registry(monkeypatch):
    """Private copies of the pass and pipeline registries: test passes do not leak into other tests."""
    registered_passes()
    monkeypatch.setattr(passes_base, "_PASSES", dict(passes_base._PASSES))
    monkeypatch.setattr(manager, "PIPELINES", dict(manager.PIPELINES))
    return passes_base._PASSES


def sample_graph() -> tuple[Graph, tuple]:
    """Something for every O1 pass to do."""
    torch.manual_seed(0)
    g = Graph("sample")
    x = g.add_input(TensorType((2, 4), F32), "x")
    b = Builder(g)
    wt = b.call(aten.permute, b.weight("w", torch.randn(3, 4)), [1, 0])   # constant-fold
    h = b.call(aten.mm, b.call(aten.clone, x), wt)                         # canonicalize (clone)
    a1 = b.call(aten.relu, h)
    a2 = b.call(aten.relu, h)                                              # cse
    b.call(aten.neg, a1)                                                   # dce
    g.set_outputs([b.call(aten.add.Tensor, a1, a2)])
    return g, (torch.randn(2, 4),)


# -- pipelines ---------------------------------------------------------------------------------------------

def test_builtin_pipelines():
    assert parse_pipeline("O0") == []
    assert parse_pipeline("O1") == O1
    assert parse_pipeline("O2")[:4] == O1
    assert set(PIPELINES) >= {"O0", "O1", "O2"}


@pytest.mark.parametrize("spec, expected", [
    ("cse", ["cse"]),
    ("canonicalize,cse,dce", ["canonicalize", "cse", "dce"]),
    (" canonicalize , cse ,dce ", ["canonicalize", "cse", "dce"]),
    ("cse,,dce,", ["cse", "dce"]),
    ("O1,cse", O1 + ["cse"]),
    ("dce,O0,dce", ["dce", "dce"]),
    (["cse", "O1"], ["cse"] + O1),
    ("", []),
    (None, []),
])
def test_parse_pipeline(spec, expected):
    assert parse_pipeline(spec) == expected


@pytest.mark.parametrize("spec", ["no-such-pass", "cse,no-such-pass", "O3", "CSE"])
def test_unknown_pass_lists_known_names(spec):
    with pytest.raises(KilnInputError) as info:
        parse_pipeline(spec)
    msg = str(info.value)
    bad = [s.strip() for s in spec.split(",") if s.strip() not in ("cse",)][0]
    assert f"unknown pass or pipeline {bad!r}" in msg
    for known in O1 + ["O0", "O1", "O2"]:
        assert known in msg


def test_register_pipeline(registry):
    register_pipeline("cleanup", ["dce", "cse"])
    register_pipeline("mine", ["canonicalize", "cleanup"])
    assert parse_pipeline("mine") == ["canonicalize", "dce", "cse"]
    assert [p.name for p in PassManager.from_pipeline("mine").passes] == ["canonicalize", "dce", "cse"]


# -- the registry --------------------------------------------------------------------------------------------

def test_get_pass_and_options():
    p = get_pass("constant-fold", max_growth=4.0)
    assert p.name == "constant-fold" and p.max_growth == 4.0
    assert {"canonicalize", "constant-fold", "cse", "dce"} <= set(registered_passes())
    with pytest.raises(KilnInputError, match="known passes: .*canonicalize.*cse.*dce"):
        get_pass("nope")
    with pytest.raises(KilnInputError, match=r"has no option\(s\) \['bogus'\]"):
        get_pass("cse", bogus=1)


def test_register_pass_rejects_duplicate_names(registry):
    @register_pass("kilntest-dup")
    @dataclass(frozen=True)
    class First(Pass):
        def run(self, graph, ctx):
            return PassResult(False)

    assert register_pass("kilntest-dup")(First) is First  # same class again: fine
    with pytest.raises(KilnInputError, match="already registered"):
        @register_pass("kilntest-dup")
        class Second(Pass):
            pass


def test_registry_fixture_isolates(registry):
    @register_pass("kilntest-temporary")
    class Temp(Pass):
        def run(self, graph, ctx):
            return PassResult(False)

    assert "kilntest-temporary" in parse_pipeline("kilntest-temporary")


def test_registry_fixture_cleaned_up():
    assert "kilntest-temporary" not in registered_passes()


# -- running ---------------------------------------------------------------------------------------------

def test_o1_on_sample_graph_and_records():
    g, inputs = sample_graph()
    expected = to_fx(g)(*inputs)
    records = PassManager.from_pipeline("O1", [VerifyInstrument()]).run(g, PassContext(example_inputs=inputs))
    assert [(r.index, r.name) for r in records] == list(enumerate(O1))
    assert all(r.changed for r in records)
    assert records[0].stats == {"rewrites": 1}
    assert records[1].stats == {"folded": 1}
    assert records[2].stats == {"merged": 1}
    assert records[3].stats["removed"] >= 1
    for r in records:
        assert r.seconds >= 0
    assert records[0].nodes_before == 8
    for prev, nxt in zip(records, records[1:]):
        assert prev.nodes_after == nxt.nodes_before
    assert records[-1].nodes_after == len(g.nodes) == 4
    assert g.meta["pass_records"] == records
    assert [n.op.name for n in g.nodes] == ["kiln.weight", "aten.mm", "aten.relu", "aten.add.Tensor"]
    verify(g)
    assert_match(list(to_fx(g)(*inputs)), list(expected))
    again = PassManager.from_pipeline("O1").run(g)
    assert not any(r.changed for r in again)
    assert len(g.meta["pass_records"]) == 8


def test_timing_instrument_is_always_on():
    pm = PassManager(["dce"])
    assert isinstance(pm.instruments[0], TimingInstrument)
    g, _ = sample_graph()
    (record,) = pm.run(g)
    assert record.seconds >= 0 and record.nodes_before == 8 and record.nodes_after == 7


def test_instruments_see_every_pass_in_order():
    events = []

    class Spy(Instrument):
        def before_pass(self, record, p, graph, ctx):
            events.append(("before", record.name, len(graph.nodes)))

        def after_pass(self, record, p, graph, ctx):
            events.append(("after", record.name, record.changed))

    g, _ = sample_graph()
    PassManager(["cse", "dce"], [Spy()]).run(g)
    assert events == [("before", "cse", 8), ("after", "cse", True), ("before", "dce", 7), ("after", "dce", True)]


def test_pass_returning_wrong_type(registry):
    @register_pass("kilntest-bad-return")
    class BadReturn(Pass):
        def run(self, graph, ctx):
            return True

    g, _ = sample_graph()
    with pytest.raises(KilnError, match="pass 'kilntest-bad-return' returned bool, expected PassResult"):
        PassManager(["kilntest-bad-return"]).run(g)


def test_pass_context_defaults():
    ctx = PassContext()
    assert ctx.options == {} and ctx.example_inputs is None


# -- DumpIRInstrument ----------------------------------------------------------------------------------------

def test_dump_ir_writes_before_and_after_files(tmp_path):
    g, inputs = sample_graph()
    out = tmp_path / "dumps"
    PassManager.from_pipeline("canonicalize,cse", [DumpIRInstrument(out)]).run(g)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00-after-canonicalize.kir", "00-before-canonicalize.kir", "01-after-cse.kir",
                     "01-before-cse.kir"]
    before = (out / "00-before-canonicalize.kir").read_text()
    after = (out / "00-after-canonicalize.kir").read_text()
    assert "aten.clone" in before and "aten.clone" not in after
    assert (out / "01-before-cse.kir").read_text() == after
    assert (out / "01-after-cse.kir").read_text() == print_graph(g) + "\n"
    for p in out.iterdir():  # every dump is valid IR text
        text = p.read_text()
        assert print_graph(parse_graph(text, weights=g.weights, source=str(p))) + "\n" == text


# -- VerifyInstrument -----------------------------------------------------------------------------------------

def test_verify_instrument_names_the_pass_that_broke_the_ir(registry):
    @register_pass("kilntest-break-types")
    @dataclass(frozen=True)
    class BreakTypes(Pass):
        def run(self, graph, ctx):
            node = graph.find(aten.mm)[0]
            node.results[0].type = TensorType((7, 7), F32)
            return PassResult(changed=True)

    g, _ = sample_graph()
    pm = PassManager.from_pipeline("canonicalize,kilntest-break-types,cse", [VerifyInstrument()])
    with pytest.raises(VerificationError) as info:
        pm.run(g)
    msg = str(info.value)
    assert "after pass 'kilntest-break-types'" in msg
    assert "aten.mm" in msg and "declared f32[7, 7]" in msg
    assert info.value.node is g.find(aten.mm)[0]


def test_verify_instrument_catches_broken_ssa(registry):
    @register_pass("kilntest-reorder")
    class Reorder(Pass):
        def run(self, graph, ctx):
            graph.nodes.reverse()
            return PassResult(changed=True)

    g, _ = sample_graph()
    with pytest.raises(VerificationError, match="after pass 'kilntest-reorder'.*before its definition"):
        PassManager(["cse", "kilntest-reorder", "dce"], [VerifyInstrument()]).run(g)


def test_without_verify_instrument_broken_ir_goes_unnoticed(registry):
    @register_pass("kilntest-break-quietly")
    class Quiet(Pass):
        def run(self, graph, ctx):
            graph.find(aten.mm)[0].results[0].type = TensorType((7, 7), F32)
            return PassResult(changed=True)

    g, _ = sample_graph()
    PassManager(["kilntest-break-quietly"]).run(g)  # no instrument, no error


# -- NumericsInstrument ---------------------------------------------------------------------------------------

def test_numerics_instrument_names_the_pass_that_changed_results(registry):
    @register_pass("kilntest-add-to-sub")
    @dataclass(frozen=True)
    class AddToSub(Pass):
        def run(self, graph, ctx):
            for node in graph.find(aten.add.Tensor):
                new = Builder.before(node).call(aten.sub.Tensor, *node.args, **node.kwargs)
                graph.replace_all_uses(node.output, new)
                graph.erase(node)
            return PassResult(changed=True)

    g, inputs = sample_graph()
    pm = PassManager.from_pipeline("canonicalize,cse,kilntest-add-to-sub,dce",
                                   [VerifyInstrument(), NumericsInstrument(inputs)])
    with pytest.raises(NumericsError, match="pass 'kilntest-add-to-sub' changed the results"):
        pm.run(g)
    assert g.find(aten.sub.Tensor)  # the IR itself is well-formed: only numerics tell


def test_numerics_instrument_accepts_correct_pipeline():
    g, inputs = sample_graph()
    inst = NumericsInstrument(inputs)
    PassManager.from_pipeline("O1", [VerifyInstrument(), inst]).run(g)
    assert inst.expected is not None and len(inst.expected) == 1


def test_numerics_instrument_tolerance_scale(registry):
    @register_pass("kilntest-nudge")
    class Nudge(Pass):
        """Adds 1e-4 to the output: beyond f32 tolerance (atol 1e-5), within 100x of it."""

        def run(self, graph, ctx):
            out = graph.outputs[0]
            graph.set_outputs([Builder(graph).call(aten.add.Tensor, out, 1e-4)])
            return PassResult(changed=True)

    g, inputs = sample_graph()
    with pytest.raises(NumericsError, match="kilntest-nudge"):
        PassManager(["kilntest-nudge"], [NumericsInstrument(inputs)]).run(g)
    g, inputs = sample_graph()
    PassManager(["kilntest-nudge"], [NumericsInstrument(inputs, scale=100.0)]).run(g)
