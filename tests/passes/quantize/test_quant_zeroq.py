"""ZeroQ: synthetic inputs match the BatchNorm statistics far better than noise, and calibrating the digits
CNN with them (no data at all) gives an int8 model close to the one calibrated on real images."""

from __future__ import annotations

import pytest
import torch

from examples.models import digits
from kiln.errors import KilnError
from kiln.frontend.export import from_export
from kiln.ir.to_fx import to_fx
from kiln.passes.quantize import quantize_graph
from kiln.passes.quantize.zeroq import batchnorm_targets, synthesize, zeroq_loss


def test_synthetic_inputs_match_batchnorm_statistics(digits_graph):
    targets = batchnorm_targets(digits_graph)
    assert len(targets) == 3 and targets[0].mean.shape == (16,)
    noise = (torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(9)),)
    (synthetic,) = synthesize(digits_graph, batches=1, steps=40, batch_size=16)
    assert synthetic[0].shape == (16, 1, 8, 8)
    assert zeroq_loss(digits_graph, synthetic) < 0.5 * zeroq_loss(digits_graph, noise)


@pytest.mark.slow
def test_data_free_calibration_is_close_to_real_data(digits_cnn, digits_exported, digits_calib):
    from kiln.ir.clone import clone_graph

    model, data = digits_cnn
    real, free = clone_graph(digits_exported), clone_graph(digits_exported)
    quantize_graph(real, "int8", digits_calib)
    res = quantize_graph(free, "int8", "zeroq", zeroq_steps=80)
    assert res.stats["calibration"] == "zeroq"
    with torch.no_grad():
        fp32 = digits.accuracy(model(data.x_test), data.y_test)
        acc_real = digits.accuracy(to_fx(real)(data.x_test)[0], data.y_test)
        acc_free = digits.accuracy(to_fx(free)(data.x_test)[0], data.y_test)
    assert fp32 - acc_free <= 0.03 and acc_real - acc_free <= 0.03


def test_zeroq_needs_batchnorm():
    g = from_export(torch.nn.Linear(4, 2).eval(), (torch.randn(3, 4),))
    with pytest.raises(KilnError, match="has no eval-mode BatchNorm"):
        synthesize(g)
