"""Channels-last layout: with a channels_last preference, conv nets run NHWC between one conversion in
and one out; every layout annotation equals the strides PyTorch really produces; outputs are unchanged;
without a preference (or on a net without convs) nothing happens."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kiln.passes.fold_bn  # noqa: F401  (registers the passes)
import kiln.passes.layout  # noqa: F401
from examples.models import REGISTRY
from kiln.errors import KilnInputError
from kiln.frontend.export import from_export
from kiln.ir.clone import clone_graph
from kiln.ir.graph import Graph, map_values
from kiln.ir.ops import WEIGHT, aten
from kiln.ir.parser import parse_graph
from kiln.ir.printer import print_graph
from kiln.ir.to_fx import to_fx
from kiln.ir.types import TensorType, layout_of
from kiln.ir.verifier import verify
from kiln.numerics import assert_match
from kiln.passes.base import PassContext, get_pass


def to_nhwc(g: Graph, inputs: tuple, ctx: PassContext | None = None, **options) -> dict[str, int]:
    """Run the layout pass; check verifier, text round trip, outputs, and annotations vs real strides."""
    before = clone_graph(g)
    result = get_pass("layout", **options).run(g, ctx or PassContext())
    verify(g)
    text = print_graph(g)
    assert print_graph(parse_graph(text, weights=g.weights)) == text
    with torch.no_grad():
        outs = to_fx(g)(*inputs)
        assert_match(list(outs), list(to_fx(before)(*inputs)), "after layout")
    assert [layout_of(o) for o in outs] == [layout_of(o) for o in to_fx(before)(*inputs)]
    check_layouts_are_real(g, inputs)
    return result.stats


def check_layouts_are_real(g: Graph, inputs: tuple) -> None:
    """Run the graph node by node and compare each 4-d result's declared layout with its real strides."""
    env = dict(zip(g.inputs, inputs))
    with torch.no_grad():
        for node in g.nodes:
            if node.op is WEIGHT:
                env[node.output] = g.weights[node.attrs["name"]]
            else:
                out = node.op.target(*map_values(node.args, env.__getitem__),
                                     **{k: map_values(a, env.__getitem__) for k, a in node.kwargs.items()})
                env.update(zip(node.results, out if node.op.multi_result else [out]))
            for r in node.results:
                if isinstance(r.type, TensorType) and r.type.rank == 4:
                    assert r.type.layout == layout_of(env[r]), f"%{r.name} is declared {r.type.layout}"


def clones(g: Graph, fmt: torch.memory_format) -> list:
    return [n for n in g.nodes if n.is_a(aten.clone) and n.kwargs.get("memory_format") == fmt]


class ConvChain(nn.Module):
    """conv -> relu -> conv -> (+ residual) -> conv -> flatten -> linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        y = self.c1(x).relu()
        y = self.c3(self.c2(y) + y)
        return self.fc(y.flatten(1)), y


def chain() -> tuple[Graph, tuple]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    return from_export(ConvChain().eval(), (x,)), (x,)


def test_a_chain_converts_once_in_and_once_per_exit():
    g, inputs = chain()
    stats = to_nhwc(g, inputs, prefer="channels_last")
    assert stats == {"region_nodes": 5, "to_channels_last": 1, "to_contiguous": 1, "weights": 2, "retyped": 5}
    (into,) = clones(g, torch.channels_last)
    (out_of,) = clones(g, torch.contiguous_format)
    assert into.inputs[0] is g.inputs[0]
    # the converted value feeds both the flatten (a view) and the second graph output
    assert {u.op.name for u in out_of.output.users} == {"aten.view"} and g.outputs[1] is out_of.output
    for conv in g.find(aten.convolution):
        assert conv.output.type.layout == "channels_last" and conv.inputs[0].type.layout == "channels_last"
    names = {n.attrs["name"] for n in g.nodes if n.op is WEIGHT}
    assert {"c1.weight.channels_last", "c2.weight.channels_last", "c3.weight"} <= names  # 1x1: same order
    assert "c1.weight" not in g.weights and g.weights["c1.weight.channels_last"].is_contiguous(
        memory_format=torch.channels_last)


def test_running_twice_changes_nothing_the_second_time():
    g, inputs = chain()
    to_nhwc(g, inputs, prefer="channels_last")
    text = print_graph(g)
    result = get_pass("layout", prefer="channels_last").run(g, PassContext())
    assert result.changed is False and print_graph(g) == text
    assert result.stats == {"region_nodes": 5, "to_channels_last": 0, "to_contiguous": 0, "weights": 0, "retyped": 0}


def test_no_preference_means_no_change():
    g, inputs = chain()
    text = print_graph(g)
    for options in ({}, {"prefer": "contiguous"}):
        assert get_pass("layout", **options).run(g, PassContext()).changed is False
        assert print_graph(g) == text
    with pytest.raises(KilnInputError, match="prefer"):
        get_pass("layout", prefer="nhwc").run(g, PassContext())


def test_preference_from_the_pass_context():
    g, inputs = chain()
    assert to_nhwc(g, inputs, PassContext(options={"prefer_layout": "channels_last"}))["region_nodes"] == 5


def test_global_pool_reads_channels_last_without_converting_back():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    x = torch.randn(1, 3, 9, 9)
    g = from_export(model.eval(), (x,))
    stats = to_nhwc(g, (x,), prefer="channels_last")
    assert stats["to_contiguous"] == 0 and stats["region_nodes"] == 3  # conv, relu, mean
    (mean,) = g.find(aten.mean)
    assert mean.inputs[0].type.layout == "channels_last" and mean.output.type.layout == "contiguous"


@pytest.mark.parametrize("name", ["resnet18", pytest.param("mobilenetv2", marks=pytest.mark.slow),
                                  pytest.param("unet", marks=pytest.mark.slow)])
def test_zoo_conv_nets(name):
    model, inputs = REGISTRY[name]()
    g = from_export(model, inputs)
    get_pass("fold-bn").run(g, PassContext())  # as a pipeline would: BN folded first
    stats = to_nhwc(g, inputs, prefer="channels_last")
    assert stats["region_nodes"] > 0 and stats["to_channels_last"] == 1  # the image, once
    assert stats["to_contiguous"] == (1 if name == "unet" else 0)  # unet returns an image
    with torch.no_grad():
        assert_match(to_fx(g)(*inputs)[0], model(*inputs), f"{name} channels-last vs eager")


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_nets_without_convs_are_untouched(name):
    model, inputs = REGISTRY[name]()
    g = from_export(model, inputs)
    text = print_graph(g)
    assert to_nhwc(g, inputs, prefer="channels_last")["region_nodes"] == 0
    assert print_graph(g) == text
