"""Flat plans: a compiled model flattened, saved and loaded computes bit-for-bit what it computed, keeps
its weights' aliasing, refuses what it cannot name, and names the file when one is damaged."""

from __future__ import annotations

import json
import math
import operator

import pytest
import torch
import torch.fx as fx

import kiln
from examples.models import REGISTRY
from kiln.errors import ArtifactError
from kiln.ir.to_fx import _CallableModule
from kiln.runtime.plan import PLAN_FILE, PlanUnsupported, _decode, _encode, flatten, load_plan, save_plan


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["mlp", "transformer", "resnet18"])
def test_reference_round_trip_is_bit_exact(name, tmp_path):
    model, inputs = REGISTRY[name]()
    compiled = kiln.compile(model, inputs, pipeline="O2", compile_cache=False)
    flat = flatten(compiled.compiled.module)
    assert not any(n.op == "call_module" for n in flat.graph.nodes)  # one straight-line program
    save_plan(flat, tmp_path)
    loaded, named = load_plan(tmp_path)
    assert named == {}
    with torch.no_grad():
        expected = compiled.compiled.module(*inputs)
        assert _equal(flat(*inputs), expected)
        assert _equal(loaded(*inputs), expected)


def test_views_of_one_weight_share_one_storage_after_loading(tmp_path):
    w = torch.randn(4, 6)
    root = torch.nn.Module()
    root.register_buffer("a", w)
    root.register_buffer("b", w.t())
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(torch.ops.aten.mm.default, (x, g.get_attr("a")))
    z = g.call_function(torch.ops.aten.mm.default, (y, g.get_attr("b")))
    g.output((z,))
    gm = fx.GraphModule(root, g)
    save_plan(flatten(gm), tmp_path, extra_tensors={"w_copy": w.clone()})
    loaded, named = load_plan(tmp_path)
    a, b = loaded.t0, loaded.t1
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert b.stride() == (1, 6)
    assert named["w_copy"].untyped_storage().data_ptr() == a.untyped_storage().data_ptr()  # same bytes: once
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x)[0], gm(x)[0])


def test_constants_round_trip():
    values = (None, True, 3, -2.5, math.inf, -math.inf, "mean", [1, (2, 3)], {"k": 1.0}, slice(1, None, 2),
              torch.float16, torch.device("cpu"), torch.channels_last, torch.strided, Ellipsis)
    encoded = json.loads(json.dumps(_encode(values, {}), allow_nan=False))
    assert _decode(encoded, []) == values
    nan = _decode(json.loads(json.dumps(_encode(math.nan, {}))), [])
    assert math.isnan(nan)


def test_unnameable_things_are_refused():
    root = torch.nn.Module()
    root.add_module("closure", _CallableModule(lambda x: (x + 1,)))
    g = fx.Graph()
    x = g.placeholder("x")
    call = g.call_module("closure", (x,))
    g.output((g.call_function(operator.getitem, (call, 0)),))
    with pytest.raises(PlanUnsupported, match="to_plan"):
        flatten(fx.GraphModule(root, g))

    g = fx.Graph()
    x = g.placeholder("x")
    g.output((g.call_function(lambda t: t * 2, (x,)),))
    with pytest.raises(PlanUnsupported, match="cannot be named"):
        flatten(fx.GraphModule(torch.nn.Module(), g))
    with pytest.raises(PlanUnsupported, match="constant"):
        _encode(object(), {})


def _saved(tmp_path):
    g = fx.Graph()
    x = g.placeholder("x")
    g.output((g.call_function(torch.ops.aten.relu.default, (x,)),))
    save_plan(flatten(fx.GraphModule(torch.nn.Module(), g)), tmp_path)
    return json.loads((tmp_path / PLAN_FILE).read_text())


@pytest.mark.parametrize("damage", ["not json", "version", "target outside kiln", "bad node"])
def test_damaged_plans_name_the_file(tmp_path, damage):
    plan = _saved(tmp_path)
    path = tmp_path / PLAN_FILE
    if damage == "not json":
        path.write_text("{ nope")
    else:
        if damage == "version":
            plan["format_version"] = 99
        elif damage == "target outside kiln":
            plan["nodes"][1]["target"] = {"py": "os:system"}
        else:
            plan["nodes"][1]["args"] = {"$n": 42}
        path.write_text(json.dumps(plan))
    with pytest.raises(ArtifactError, match=PLAN_FILE):
        load_plan(tmp_path)
