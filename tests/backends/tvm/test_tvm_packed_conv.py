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
        return self.b(z) + z[:, :8]  # the conv's result has a non-activation reader: plain packed conv


def test_conv_net_on_the_tvm_target_runs_packed_convolutions_with_fused_activations():
    model = _ConvNet().eval()
    x = torch.randn(2, 3, 12, 12)
    graph = from_export(model, (x,))
    PassManager(parse_pipeline("O2")).run(graph, context_for("tvm"))
    compiled = compile_graph(graph, "tvm")
    (exe,) = [m.fn for m in compiled.module.modules() if hasattr(m, "fn")]
    packed = [p for p in exe.kernel_paths if CONV_POINTWISE in p["ops"]]
    assert len(packed) == 3 and all(p["path"] == "torch" for p in packed)
    assert not any(op in p["ops"] for p in exe.kernel_paths for op in ("aten.hardtanh", "aten.sigmoid"))
    with torch.no_grad():
        assert_match(compiled(x)[0], model(x))
