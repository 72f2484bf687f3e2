"""Observers on hand-computed cases: ranges, scales and zero points, per-tensor and per-channel, symmetric
and asymmetric; percentile, MSE and entropy clip outliers where min/max does not."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import KilnError
from kiln.passes.quantize.observers import (
    EPS,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    QSpec,
    make_observer,
    qparams_from_range,
)

U8 = QSpec(torch.uint8, 0, 255)
I8_SYM = QSpec(torch.int8, -128, 127, symmetric=True)
I8_SYM_CH = QSpec(torch.int8, -127, 127, symmetric=True, axis=0)


def test_minmax_asymmetric_uint8_by_hand():
    obs = MinMaxObserver(U8)
    obs.observe(torch.tensor([-1.0, 0.5, 2.0]))
    obs.observe(torch.tensor([3.0, -0.5]))
    scale, zp = obs.qparams()
    # range [-1, 3]: scale 4/255, zero point round(0 - (-1) / (4/255)) = round(63.75) = 64
    assert scale.shape == () and zp.shape == ()
    assert float(scale) == pytest.approx(4 / 255)
    assert int(zp) == 64


def test_range_always_contains_zero():
    obs = MinMaxObserver(U8)
    obs.observe(torch.tensor([2.0, 5.0]))  # all positive: the range is [0, 5]
    scale, zp = obs.qparams()
    assert float(scale) == pytest.approx(5 / 255) and int(zp) == 0


def test_minmax_symmetric_int8_by_hand():
    obs = MinMaxObserver(I8_SYM)
    obs.observe(torch.tensor([-3.0, 1.0, 2.5]))
    scale, zp = obs.qparams()
    assert float(scale) == pytest.approx(3.0 / 127.5) and int(zp) == 0


def test_symmetric_unsigned_puts_zero_in_the_middle():
    scale, zp = qparams_from_range(torch.tensor(-2.0), torch.tensor(1.0), QSpec(torch.uint8, 0, 255, symmetric=True))
    assert float(scale) == pytest.approx(2.0 / 127.5) and int(zp) == 128


def test_per_channel_symmetric_by_hand():
    obs = MinMaxObserver(I8_SYM_CH)
    w = torch.tensor([[1.0, -2.0, 0.5], [0.1, 0.2, -0.3], [0.0, 0.0, 0.0]])
    obs.observe(w)
    scale, zp = obs.qparams()
    assert scale.shape == (3,) and zp.tolist() == [0, 0, 0]
    assert scale[0].item() == pytest.approx(2.0 / 127) and scale[1].item() == pytest.approx(0.3 / 127)
    assert scale[2].item() == EPS  # an all-zero channel gets the smallest scale, never 0


def test_per_channel_along_another_axis():
    obs = MinMaxObserver(QSpec(torch.uint8, 0, 255, axis=1))
    obs.observe(torch.tensor([[0.0, -1.0], [2.0, 1.0]]))
    lo, hi = obs.range()
    assert lo.tolist() == [0.0, -1.0] and hi.tolist() == [2.0, 1.0]


def test_moving_average_by_hand():
    obs = MovingAverageMinMaxObserver(U8, momentum=0.5)
    obs.observe(torch.tensor([-1.0, 1.0]))
    obs.observe(torch.tensor([-3.0, 5.0]))
    lo, hi = obs.range()
    assert float(lo) == -2.0 and float(hi) == 3.0  # -1 + 0.5 * (-3 - -1), 1 + 0.5 * (5 - 1)


def test_percentile_ignores_a_rare_outlier():
    x = torch.cat([torch.linspace(0, 1, 10000), torch.tensor([100.0])])
    obs = PercentileObserver(U8, percentile=99.9)
    obs.observe(x)
    lo, hi = obs.range()
    assert float(lo) == pytest.approx(0.0, abs=0.06)
    assert 0.9 < float(hi) < 1.1  # the 99.9th percentile of mostly [0, 1] data, not the outlier at 100


def test_percentile_regrids_when_the_range_grows():
    obs = PercentileObserver(U8, percentile=100.0, bins=512)
    obs.observe(torch.linspace(0, 1, 1000))
    obs.observe(torch.linspace(0, 4, 1000))
    lo, hi = obs.range()
    assert float(hi) == pytest.approx(4.0, rel=0.01)
    assert float(obs.hist.sum()) == 2000


def test_mse_clips_the_tail_at_low_bit_width_and_beats_minmax():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=gen)  # max ~ 4 sigma; the 4-bit MSE-optimal clip is ~ 2.5 sigma
    spec = QSpec(torch.int8, -7, 7, symmetric=True)
    mse, mm = MSEObserver(spec), MinMaxObserver(spec)
    mse.observe(x)
    mm.observe(x)

    def err(obs):
        s, z = obs.qparams()
        q = torch.clamp(torch.round(x / s) + z, -7, 7)
        return float(((q - z) * s - x).pow(2).mean())

    assert 2.0 < float(mse.range()[1]) < 3.3 < float(mm.range()[1])
    assert err(mse) < 0.8 * err(mm)


def test_mse_keeps_a_single_outlier_when_clipping_it_costs_more():
    # one value at 40 among 20000 N(0, 1): clipping it costs ~36**2 / 20001 of MSE, more than the coarser step
    x = torch.cat([torch.randn(20000, generator=torch.Generator().manual_seed(0)), torch.tensor([40.0])])
    obs = MSEObserver(QSpec(torch.int8, -128, 127, symmetric=True))
    obs.observe(x)
    assert float(obs.range()[1]) > 30.0


def test_entropy_clips_a_long_tail_but_keeps_a_uniform_range():
    gen = torch.Generator().manual_seed(1)
    tail = HistogramObserver(U8)
    tail.observe(torch.cat([torch.rand(50000, generator=gen), torch.tensor([30.0])]))
    assert float(tail.range()[1]) < 5.0
    uniform = HistogramObserver(U8)
    uniform.observe(torch.rand(50000, generator=gen) * 2)
    assert float(uniform.range()[1]) == pytest.approx(2.0, rel=0.05)


def test_unknown_observer_and_empty_observer():
    with pytest.raises(KilnError, match="unknown observer 'bogus'"):
        make_observer("bogus", U8)
    with pytest.raises(KilnError, match="observed nothing"):
        MinMaxObserver(U8).qparams()
    with pytest.raises(KilnError, match="momentum"):
        MovingAverageMinMaxObserver(U8, momentum=0.0)
