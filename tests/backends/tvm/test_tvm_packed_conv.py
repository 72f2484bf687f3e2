"""Channels-last convolutions on oneDNN-packed weights with their activation fused: rewritten where legal."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from kiln.backends.driver import compile_graph  # noqa: E402
from kiln.backends.tvm.packed_conv import CONV_POINTWISE  # noqa: E402
from kiln.frontend.export import from_export  # noqa: E402
from kiln.numerics import assert_match  # noqa: E402
from kiln.passes.manager import PassManager, context_for, parse_pipeline  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch without oneDNN")


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.b = torch.nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = torch.nn.functional.relu6(self.a(x))  # ReLU6: hardtanh(0, 6) folded into the conv
        z = torch.sigmoid(self.dw(y))  # no bias, sigmoid folded
        return self.b(z) + z[:, :8]  # a residual add (of a strided slice): oneDNN's binary post-op


def _compile_on_tvm(model, x):
    """(the compiled graph, its TVM executable) for ``model`` at O2 on the tvm target."""
    graph = from_export(model, (x,))
    PassManager(parse_pipeline("O2")).run(graph, context_for("tvm"))
    compiled = compile_graph(graph, "tvm")
    (exe,) = [m.fn for m in compiled.module.modules() if hasattr(m, "fn")]
    return compiled, exe


def test_conv_net_on_the_tvm_target_runs_packed_convolutions_with_fused_activations():
    model = _ConvNet().eval()
    x = torch.randn(2, 3, 12, 12)
    compiled, exe = _compile_on_tvm(model, x)
    packed = [p for p in exe.kernel_paths if any(op.startswith(CONV_POINTWISE) for op in p["ops"])]
    assert len(packed) == 3 and all(p["path"] == "torch" for p in packed)
    assert [p["ops"] for p in packed].count([CONV_POINTWISE]) == 2
    assert not any(op in p["ops"] for p in exe.kernel_paths for op in ("aten.hardtanh", "aten.sigmoid"))
    with torch.no_grad():
        assert_match(compiled(x)[0], model(x))


class _ResidualBlock(torch.nn.Module):
    """resnet's basic block tail: relu(conv(y) + x), and a plain residual add without activation."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c = torch.nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = torch.relu(self.b(torch.relu(self.a(x))) + x)  # add + relu folded into b
        return y + self.c(y)  # add folded into c (the residual on the left), no activation


def test_residual_add_and_its_activation_fold_into_the_convolution():
    from kiln.backends.tvm.packed_conv import CONV_POINTWISE_BINARY

    model = _ResidualBlock().eval()
    x = torch.randn(2, 8, 10, 10)
    compiled, exe = _compile_on_tvm(model, x)
    ops = [op for p in exe.kernel_paths for op in p["ops"]]
    assert ops.count(CONV_POINTWISE_BINARY) == 2 and ops.count(CONV_POINTWISE) == 1
    assert "aten.add.Tensor" not in ops and "aten.relu" not in ops
    with torch.no_grad():
        assert_match(compiled(x)[0], model(x))
