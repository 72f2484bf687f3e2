"""GPTQ rounding: on the grid it is given, it beats round-to-nearest on the layer's output; exact kiln rounding
of the values it keeps; dead channels; shape errors."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import KilnError
from kiln.passes.quantize.gptq import gptq_round
from kiln.passes.quantize.weights import group_qparams, quantize_per_group


def _layer(seed: int = 0, n: int = 48, k: int = 128, rows: int = 1024):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    # correlated activations with a few large channels: where error compensation has something to work with
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    x = (torch.randn(rows, k, generator=gen) @ mix) * torch.where(torch.arange(k) % 17 == 0, 8.0, 1.0)
    return w, x


def _out_err(x: torch.Tensor, w: torch.Tensor, deq: torch.Tensor) -> float:
    return float((x @ deq.t() - x @ w.t()).pow(2).mean())


@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_beats_round_to_nearest_on_the_same_grid(symmetric):
    w, x = _layer()
    scales, zps, qmin, qmax, dtype = group_qparams(w, 32, 4, symmetric)
    rtn = quantize_per_group(w, 32, 4, symmetric, scales, zps)
    gq = gptq_round(w, x, scales, zps, 32, qmin, qmax, dtype)
    assert gq.q.dtype == dtype and int(gq.q.min()) >= qmin and int(gq.q.max()) <= qmax
    assert torch.equal(gq.scales, rtn.scales) and torch.equal(gq.zero_points, rtn.zero_points)
    assert not torch.equal(gq.q, rtn.q)  # it did change some roundings...
    assert _out_err(x, w, gq.dequantize()) < 0.8 * _out_err(x, w, rtn.dequantize())  # ...for a better output


def test_gptq_keeps_weights_already_on_the_grid():
    w, x = _layer(1)
    exact = quantize_per_group(w, 32).dequantize()  # every value sits on its group's grid: zero error to spread
    scales, zps, qmin, qmax, dtype = group_qparams(exact, 32, 4, False)
    gq = gptq_round(exact, x, scales, zps, 32, qmin, qmax, dtype)
    assert torch.allclose(gq.dequantize(), exact, atol=1e-6)


def test_dead_input_channels_are_zeroed():
    w, x = _layer(2)
    x[:, 5] = 0.0
    scales, zps, qmin, qmax, dtype = group_qparams(w, 32, 4, False)
    gq = gptq_round(w, x, scales, zps, 32, qmin, qmax, dtype)
    assert gq.dequantize()[:, 5].abs().max() <= 0.5 * scales[:, 0].max()  # the grid point nearest to 0


def test_mismatched_shapes_are_rejected():
    w, x = _layer(3)
    scales, zps, qmin, qmax, dtype = group_qparams(w, 32, 4, False)
    with pytest.raises(KilnError, match="group size"):
        gptq_round(w, x[:, :64], scales, zps, 32, qmin, qmax, dtype)
