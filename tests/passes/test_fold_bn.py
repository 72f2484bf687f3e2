"""BatchNorm folding: inference-mode BN after a conv (plain, grouped, transposed) or a linear layer folds
into new weights computed in float64; a conv output read twice, a training-mode BN and BN statistics
that are graph inputs do not fold; the zoo's conv nets keep their outputs and lose every BN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kiln.passes.fold_bn  # noqa: F401  (registers the pass)
from examples.models import REGISTRY
from kiln.frontend.export import from_export
from kiln.ir.builder import Builder
from kiln.ir.clone import clone_graph
from kiln.ir.graph import Graph
from kiln.ir.ops import WEIGHT, aten
from kiln.ir.parser import parse_graph
from kiln.ir.printer import print_graph
from kiln.ir.to_fx import to_fx
from kiln.ir.types import TensorType
from kiln.ir.verifier import verify
from kiln.numerics import assert_match
from kiln.passes.base import PassContext, get_pass

F32 = torch.float32


def fold(g: Graph, inputs: tuple) -> dict[str, int]:
    """Run fold-bn; check verifier, text round trip and outputs against the unfolded graph."""
    before = clone_graph(g)
    result = get_pass("fold-bn").run(g, PassContext())
    verify(g)
    text = print_graph(g)
    assert print_graph(parse_graph(text, weights=g.weights)) == text
    with torch.no_grad():
        assert_match(list(to_fx(g)(*inputs)), list(to_fx(before)(*inputs)), "after fold-bn")
    assert result.changed == (sum(result.stats.values()) > 0)
    return result.stats


def batch_norms(g: Graph) -> list[str]:
    return [n.op.name for n in g.nodes if "batch_norm" in n.op.name]


def randomized(bn: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) + 0.5)
            bn.bias.copy_(torch.rand(bn.bias.shape, generator=gen) - 0.5)
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.1)
    return bn


def exported(model: nn.Module, *inputs: torch.Tensor) -> Graph:
    return from_export(model.eval(), inputs)


def test_conv_bn_folds_into_a_conv_with_new_float64_computed_weights():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), randomized(nn.BatchNorm2d(8, eps=1e-3))
    x = torch.randn(2, 3, 10, 10)
    g = exported(nn.Sequential(conv, bn), x)
    originals = {k: v.clone() for k, v in g.weights.items()}
    assert fold(g, (x,)) == {"conv": 1, "linear": 0}
    assert batch_norms(g) == []
    (node,) = g.find(aten.convolution)
    wname, bname = (v.producer.attrs["name"] for v in node.inputs[1:3])
    assert (wname, bname) == ("0.weight.fold_bn.0", "0.weight.fold_bn_bias.0")
    scale = bn.weight.double() / (bn.running_var.double() + 1e-3).sqrt()
    expected_w = (conv.weight.double() * scale.view(-1, 1, 1, 1)).float()
    expected_b = (bn.bias.double() - bn.running_mean.double() * scale).float()
    assert torch.equal(g.weights[wname], expected_w.detach())
    assert torch.equal(g.weights[bname], expected_b.detach())
    assert set(g.weights) == {wname, bname, "1.num_batches_tracked"}  # unread BN/conv weights are gone
    for k, v in originals.items():  # the model's own tensors are never written
        assert torch.equal(v, dict(nn.Sequential(conv, bn).state_dict())[k])
    with torch.no_grad():
        assert_match(to_fx(g)(x)[0], nn.Sequential(conv, bn)(x), "folded vs eager")


@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(4, 6, 3, bias=True),
    lambda: nn.Conv2d(6, 6, 3, groups=6, bias=False),  # depthwise
    lambda: nn.Conv1d(4, 6, 3, groups=2),
    lambda: nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2),
    lambda: nn.Conv3d(4, 6, 1),
], ids=["bias", "depthwise", "conv1d-groups", "transposed-groups", "conv3d"])
@pytest.mark.parametrize("affine", [True, False])
def test_every_conv_flavour_folds(make, affine):
    torch.manual_seed(1)
    conv = make()
    bn_cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[conv.weight.dim() - 2]
    bn = randomized(bn_cls(conv.out_channels, affine=affine))
    x = torch.randn(2, conv.in_channels, *[6] * (conv.weight.dim() - 2))
    model = nn.Sequential(conv, bn).eval()
    g = exported(model, x)
    assert fold(g, (x,))["conv"] == 1
    assert batch_norms(g) == []
    with torch.no_grad():
        assert_match(to_fx(g)(x)[0], model(x), "folded vs eager")


@pytest.mark.parametrize("bias", [True, False])
def test_linear_then_batchnorm1d_folds_into_addmm(bias):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 7, bias=bias), randomized(nn.BatchNorm1d(7)), nn.ReLU()).eval()
    x = torch.randn(4, 5)
    g = exported(model, x)
    assert fold(g, (x,)) == {"conv": 0, "linear": 1}
    assert batch_norms(g) == [] and len(g.find(aten.addmm)) == 1 and not g.find(aten.mm)
    with torch.no_grad():
        assert_match(to_fx(g)(x)[0], model(x), "folded vs eager")


def test_linear_fold_after_constant_fold_scales_the_pretransposed_weight():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), randomized(nn.BatchNorm1d(7))).eval()
    x = torch.randn(4, 5)
    g = exported(model, x)
    get_pass("constant-fold").run(g, PassContext())  # permute(weight) becomes a strided weight
    assert fold(g, (x,))["linear"] == 1
    mat2 = g.find(aten.addmm)[0].inputs[2]
    assert mat2.producer.op is WEIGHT and mat2.type.layout == "strided"  # the strides are kept
    with torch.no_grad():
        assert_match(to_fx(g)(x)[0], model(x), "folded vs eager")


def test_eps_and_float64_models():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), randomized(nn.BatchNorm2d(3, eps=0.5))).double().eval()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    g = exported(model, x)
    assert fold(g, (x,))["conv"] == 1
    (node,) = g.find(aten.convolution)
    assert all(v.type.dtype == torch.float64 for v in node.inputs[1:3])
    with torch.no_grad():
        torch.testing.assert_close(to_fx(g)(x)[0], model(x), rtol=1e-12, atol=1e-12)


def test_fresh_names_never_overwrite_existing_weights():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), randomized(nn.BatchNorm2d(3))).eval()
    x = torch.randn(1, 2, 4, 4)
    g = exported(model, x)
    taken = torch.zeros(1)
    g.weights["0.weight.fold_bn.0"] = taken
    fold(g, (x,))
    (node,) = g.find(aten.convolution)
    assert node.inputs[1].producer.attrs["name"] == "0.weight.fold_bn.1"


# -- near misses ------------------------------------------------------------------------------------------

class ConvReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), randomized(nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y.relu()


def test_conv_output_read_twice_does_not_fold():
    x = torch.randn(1, 3, 6, 6)
    g = exported(ConvReadTwice(), x)
    assert fold(g, (x,)) == {"conv": 0, "linear": 0}
    assert len(batch_norms(g)) == 1


def conv_bn_graph(bn_op, stats_as_inputs: bool = False, training: bool = False) -> tuple[Graph, tuple]:
    """x -> conv -> BN by hand: training mode, or the statistics as graph inputs (AOTAutograd style)."""
    torch.manual_seed(6)
    g = Graph("conv_bn")
    x = g.add_input(TensorType((2, 3, 5, 5), F32), "x")
    inputs = [torch.randn(2, 3, 5, 5)]
    b = Builder(g)
    w = b.weight("conv.weight", torch.randn(4, 3, 3, 3))
    y = b.call(aten.convolution, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    params = [torch.rand(4) + 0.5, torch.randn(4), torch.randn(4), torch.rand(4) + 0.5]
    if stats_as_inputs:
        vals = [g.add_input(TensorType((4,), F32), n) for n in ("gamma", "beta", "mean", "var")]
        inputs += params
    else:
        vals = [b.weight(n, t) for n, t in zip(("bn.weight", "bn.bias", "bn.mean", "bn.var"), params)]
    if bn_op is aten.native_batch_norm:
        out = b.call(aten.native_batch_norm, y, *vals, training, 0.1, 1e-5)[0]
    elif bn_op is aten._native_batch_norm_legit_functional:
        out = b.call(aten._native_batch_norm_legit_functional, y, *vals, training, 0.1, 1e-5)[0]
    else:
        out = b.call(aten._native_batch_norm_legit_no_training, y, *vals, 0.1, 1e-5)[0]
    g.set_outputs([out])
    return g, tuple(inputs)


@pytest.mark.parametrize("bn_op", [aten.native_batch_norm, aten._native_batch_norm_legit_functional])
def test_training_mode_batch_norm_never_folds(bn_op):
    g, inputs = conv_bn_graph(bn_op, training=True)
    assert fold(g, inputs) == {"conv": 0, "linear": 0}
    # the same op in inference mode does fold
    g, inputs = conv_bn_graph(bn_op, training=False)
    assert fold(g, inputs)["conv"] == 1


def test_batch_norm_statistics_as_graph_inputs_do_not_fold():
    g, inputs = conv_bn_graph(aten._native_batch_norm_legit_no_training, stats_as_inputs=True)
    assert fold(g, inputs) == {"conv": 0, "linear": 0}
    g, inputs = conv_bn_graph(aten._native_batch_norm_legit_no_training)
    assert fold(g, inputs)["conv"] == 1


def test_saved_statistics_read_elsewhere_block_the_fold():
    g, inputs = conv_bn_graph(aten.native_batch_norm)
    bn = g.find(aten.native_batch_norm)[0]
    g.set_outputs([*g.outputs, bn.results[1]])
    assert fold(g, inputs) == {"conv": 0, "linear": 0}


# -- the zoo ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "unet", pytest.param("mobilenetv2", marks=pytest.mark.slow)])
def test_zoo_conv_nets_lose_every_batch_norm(name):
    model, inputs = REGISTRY[name]()
    g = from_export(model, inputs)
    n_bn = len(batch_norms(g))
    assert fold(g, inputs) == {"conv": n_bn, "linear": 0}
    assert batch_norms(g) == []
    with torch.no_grad():
        assert_match(to_fx(g)(*inputs)[0], model(*inputs), f"{name} folded vs eager")


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_models_without_batch_norm_are_untouched(name):
    model, inputs = REGISTRY[name]()
    g = from_export(model, inputs)
    text = print_graph(g)
    assert fold(g, inputs) == {"conv": 0, "linear": 0}
    assert print_graph(g) == text
