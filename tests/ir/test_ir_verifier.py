"""The verifier accepts well-formed graphs (exported, parsed, built) and rejects each kind of malformed
graph with a VerificationError whose message names the offending node and what is wrong."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from kiln.errors import VerificationError
from kiln.frontend.export import from_export
from kiln.ir.builder import Builder
from kiln.ir.clone import clone_graph
from kiln.ir.graph import Graph
from kiln.ir.ops import FUSED, WEIGHT, aten
from kiln.ir.parser import parse_graph
from kiln.ir.to_fx import to_fx
from kiln.ir.types import NoneType, QuantParams, ScalarType, TensorType, sym
from kiln.ir.verifier import verify

F32 = torch.float32


@pytest.fixture(scope="module")
def mlp_graph() -> Graph:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    return from_export(model, (torch.randn(3, 4),))


@pytest.fixture
def g(mlp_graph) -> Graph:
    """A fresh copy of the exported MLP to break."""
    return clone_graph(mlp_graph)


def addmm_of(g: Graph):
    return g.find(aten.addmm)[0]


def rejects(g: Graph, *fragments: str, infer_types: bool = True) -> str:
    with pytest.raises(VerificationError) as info:
        verify(g, infer_types=infer_types)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


# -- accepted ---------------------------------------------------------------------------------------------

def test_accepts_exported_sequential(mlp_graph):
    assert [n.op.name for n in mlp_graph.nodes if n.op is not WEIGHT] == \
        ["aten.permute", "aten.addmm", "aten.relu", "aten.permute", "aten.addmm"]
    verify(mlp_graph)


def test_accepts_exported_conv_net_with_dynamic_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3),
                                torch.nn.LogSoftmax(-1)).eval()
    g = from_export(model, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: Dim("batch", min=2, max=32)},))
    assert not g.inputs[0].type.is_static
    verify(g)
    verify(parse_graph(str(g), weights=g.weights))


def test_accepts_parsed_and_built_graphs():
    verify(parse_graph("""graph @g(%x: f32[2, 3], %n: symint(s0)) -> (f32[3, 2] #{layout = "strided"}, f32[2]) {
  %t = aten.permute(%x, [1, 0]) : f32[3, 2] #{layout = "strided"}
  %s = aten.sum.dim_IntList(%x, [1]) : f32[2]
  return %t, %s
}"""))
    g = Graph("b")
    x = g.add_input(TensorType((sym("s0"), 4), F32), "x")
    b = Builder(g)
    g.set_outputs(b.call(aten.max.dim, x, 0) + [b.call(aten.relu, x)])
    verify(g)
    verify(Graph("empty"))


# -- wrong declared result types -----------------------------------------------------------------------------

@pytest.mark.parametrize("bad, shown", [
    (TensorType((3, 9), F32), "declared f32[3, 9] but the op produces f32[3, 8]"),
    (TensorType((3, 8), torch.float64), "declared f64[3, 8] but the op produces f32[3, 8]"),
    (TensorType((8, 3), F32), "declared f32[8, 3]"),
    (TensorType((3, 8, 1), F32), "declared f32[3, 8, 1]"),
    (TensorType((sym("s0"), 8), F32), "declared f32[s0, 8]"),
    (ScalarType("int"), "declared int but the op produces f32[3, 8]"),
    (NoneType(), "declared none"),
])
def test_rejects_wrong_declared_result_type(g, bad, shown):
    addmm_of(g).results[0].type = bad
    rejects(g, "%addmm", "aten.addmm", shown)


def test_rejects_wrong_number_of_results(g):
    relu = g.find(aten.relu)[0]
    relu.results.append(type(relu.results[0])(relu.results[0].type, "extra", relu, 1))
    rejects(g, "%relu", "aten.relu", "has 2 results but the op produces 1")


def test_layout_and_annotations_are_advisory(g):
    node = addmm_of(g)
    node.results[0].type = node.results[0].type.with_(layout="strided",
                                                       quant=QuantParams("i8", "per_tensor", (0.1,), (0,)))
    verify(g)


def test_type_check_can_be_skipped(g):
    addmm_of(g).results[0].type = TensorType((3, 9), F32)
    verify(g, infer_types=False)


# -- SSA ---------------------------------------------------------------------------------------------------

def test_rejects_use_before_definition(g):
    addmm, relu = addmm_of(g), g.find(aten.relu)[0]
    g.nodes.remove(addmm)
    g.nodes.insert(g.index_of(relu) + 1, addmm)  # now after its user
    rejects(g, "%relu = aten.relu", "uses %addmm before its definition", "a later node or nowhere")


def test_rejects_use_of_value_from_another_graph(g):
    other = Graph("other")
    foreign = other.add_input(TensorType((3, 4), F32), "foreign")
    node = addmm_of(g)
    node.set_args((node.args[0], foreign, node.args[2]))
    rejects(g, "%addmm = aten.addmm", "uses %foreign before its definition (defined in another graph)")


def test_rejects_output_from_another_graph(g):
    other = Graph("other")
    g.set_outputs([other.add_input(TensorType((3, 2), F32), "elsewhere")])
    rejects(g, "output %elsewhere is not defined in this graph")


def test_rejects_node_owned_by_another_graph(g):
    addmm_of(g).graph = Graph("other")
    rejects(g, "%addmm = aten.addmm", "does not belong to this graph")


def test_rejects_result_not_pointing_back(g):
    relu = g.find(aten.relu)[0]
    relu.results[0].producer = addmm_of(g)
    rejects(g, "%relu = aten.relu", "does not point back")


def test_rejects_duplicate_value_names(g):
    addmm_of(g).results[0].name = "relu"
    rejects(g, "defined more than once: %relu")


def test_rejects_duplicate_input_names():
    g = Graph("dup")
    a = g.add_input(TensorType((2,), F32), "a")
    b = g.add_input(TensorType((2,), F32), "b")
    b.name = "a"
    g.set_outputs([Builder(g).call(aten.add.Tensor, a, b)])
    rejects(g, "defined more than once: %a")


def test_rejects_stale_use_lists(g):
    node = addmm_of(g)
    node.results[0].uses.append(node)  # a use that does not exist
    rejects(g, "%addmm = aten.addmm", "use list of %addmm is stale (2 recorded, 1 real)")
    node.results[0].uses.clear()  # a use that is not recorded
    rejects(g, "%addmm = aten.addmm", "use list of %addmm is stale (0 recorded, 1 real)")


def test_rejects_raw_args_mutation_without_relinking(g):
    relu = g.find(aten.relu)[0]
    relu.args = (g.inputs[0],)  # bypasses set_args: use lists now lie
    msg = rejects(g, "stale", infer_types=False)
    assert "%addmm" in msg or "%input" in msg


# -- arity and argument kinds -----------------------------------------------------------------------------------

def test_rejects_too_many_positional_args(g):
    node = addmm_of(g)
    node.set_args(tuple(node.args) + (1, 1, 7))
    rejects(g, "%addmm = aten.addmm", "takes at most 3 positional arguments, got 6")


def test_rejects_missing_required_arg(g):
    node = addmm_of(g)
    node.set_args(tuple(node.args[:2]))
    rejects(g, "%addmm = aten.addmm", "missing required argument 'mat2'")


def test_rejects_unknown_kwarg(g):
    node = addmm_of(g)
    node.set_args(node.args, {"gamma": 2})
    rejects(g, "%addmm = aten.addmm", "unknown keyword argument 'gamma'")


def test_rejects_argument_given_twice(g):
    node = addmm_of(g)
    node.set_args(node.args, {"mat1": node.args[1]})
    rejects(g, "%addmm = aten.addmm", "argument 'mat1' given twice")


@pytest.mark.parametrize("bad, shown", [("hello", "'hello'"), (None, "None"), ([1, 2], "[1, 2]")])
def test_rejects_non_tensor_where_tensor_required(g, bad, shown):
    node = addmm_of(g)
    node.set_args((node.args[0], bad, node.args[2]))
    rejects(g, "%addmm = aten.addmm", f"argument 'mat1' must be a tensor value, got {shown}")


def test_rejects_non_tensor_in_tensor_list():
    g = Graph("cat")
    x = g.add_input(TensorType((2, 3), F32), "x")
    n = g.add_input(ScalarType("int"), "n")
    node = g.create_node(aten.cat.default, [[x, n]], result_types=[TensorType((4, 3), F32)], names=["cat"])
    g.set_outputs([node.output])
    rejects(g, "%cat = aten.cat", "argument 'tensors' must hold tensor values, got %n: int")
    node.set_args((x,))
    rejects(g, "%cat = aten.cat", "argument 'tensors' must be a list of tensors")


def test_rejects_tensor_where_int_list_required(g):
    relu = g.find(aten.relu)[0]
    perm = g.find(aten.permute)[0]
    perm.set_args((perm.args[0], relu.output))
    msg = rejects(g, "%permute = aten.permute")
    assert "before its definition" in msg or "cannot be a tensor value" in msg


def test_number_in_place_of_tensor_is_aten_convention():
    """ATen graphs pass Python numbers where a 0-d tensor is meant (mul.Tensor(x, 0.5))."""
    g = Graph("num")
    x = g.add_input(TensorType((2,), F32), "x")
    g.set_outputs([Builder(g).call(aten.mul.Tensor, x, 0.5)])
    verify(g)


# -- weights -----------------------------------------------------------------------------------------------

def first_weight(g: Graph):
    return g.find(WEIGHT)[0]


@pytest.mark.parametrize("tensor", [torch.zeros(5, 5), torch.zeros(8, 4, dtype=torch.float64), torch.zeros(8)])
def test_rejects_weight_type_not_matching_its_tensor(g, tensor):
    w = first_weight(g)
    g.weights[w.attrs["name"]] = tensor
    rejects(g, "%p_0_weight = kiln.weight", "declared f32[8, 4] but the attached tensor is")


def test_rejects_weight_with_bad_attrs_or_args(g):
    w = first_weight(g)
    w.attrs["name"] = 3
    rejects(g, "%p_0_weight = kiln.weight", "needs a string attribute 'name'")
    w.attrs["name"] = "0.weight"
    w.set_args((g.inputs[0],))
    rejects(g, "%p_0_weight = kiln.weight", "takes no arguments")


def test_weight_without_attached_tensor_is_accepted(g):
    del g.weights["0.weight"]  # text-only graphs carry no tensors
    verify(g)


# -- regions -----------------------------------------------------------------------------------------------

def _region_graph():
    sub = Graph("ew")
    a = sub.add_input(TensorType((2, 3), F32), "a")
    sub.set_outputs([Builder(sub).call(aten.relu, a)])
    g = Graph("outer")
    x = g.add_input(TensorType((2, 3), F32), "x")
    node = g.create_node(FUSED, [x], subgraph=sub, names=["y"])
    g.set_outputs([node.output])
    return g, node, sub


def test_accepts_region():
    g, _, _ = _region_graph()
    verify(g)


def test_rejects_region_result_type_mismatch():
    g, node, _ = _region_graph()
    node.results[0].type = TensorType((2, 4), F32)
    rejects(g, "%y = kiln.fused", "result types do not match the subgraph's output types")


def test_rejects_region_argument_type_mismatch():
    g, node, sub = _region_graph()
    sub.inputs[0].type = TensorType((3, 2), F32)
    rejects(g, "%y = kiln.fused", "argument types do not match the subgraph's input types")
    g, node, sub = _region_graph()
    node.set_args((node.args[0], node.args[0]))
    rejects(g, "%y = kiln.fused", "argument types do not match")


def test_rejects_malformed_subgraph_with_path():
    g, node, sub = _region_graph()
    sub.nodes[0].results[0].type = TensorType((2, 3), torch.int64)
    sub.outputs[0].type = TensorType((2, 3), torch.int64)
    node.results[0].type = TensorType((2, 3), torch.int64)
    rejects(g, "@outer/@ew", "aten.relu", "declared i64[2, 3] but the op produces f32[2, 3]")


def test_region_cannot_see_outer_values():
    g, node, sub = _region_graph()
    relu = sub.nodes[0]
    relu.set_args((g.inputs[0],))  # isolated from above: %x is not visible inside
    rejects(g, "@outer/@ew", "uses %x before its definition (defined in another graph)")


def test_error_carries_the_node(g):
    node = addmm_of(g)
    node.results[0].type = TensorType((1,), F32)
    with pytest.raises(VerificationError) as info:
        verify(g)
    assert info.value.node is node


# -- type inference behind the verifier ----------------------------------------------------------------------

def test_inferred_types_distinguish_int_float_and_bool_literals():
    """1 == 1.0 == True in Python, but they promote differently; the inference cache must not mix them."""
    g = Graph("promote")
    i = g.add_input(TensorType((3,), torch.int64), "i")
    flags = g.add_input(TensorType((3,), torch.bool), "flags")
    b = Builder(g)
    outs = [b.call(aten.mul.Tensor, i, 1), b.call(aten.mul.Tensor, i, 1.0),
            b.call(aten.add.Tensor, flags, 1), b.call(aten.add.Tensor, flags, True)]
    assert [o.type.dtype for o in outs] == [torch.int64, F32, torch.int64, torch.bool]
    g.set_outputs(outs)
    verify(g)
    real = to_fx(g)(torch.arange(3), torch.ones(3, dtype=torch.bool))
    assert [t.dtype for t in real] == [o.type.dtype for o in outs]
    outs[1].type = TensorType((3,), torch.int64)  # what a conflating cache would have said
    rejects(g, "%1 = aten.mul.Tensor", "declared i64[3] but the op produces f32[3]")
