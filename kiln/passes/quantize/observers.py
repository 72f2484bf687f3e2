"""Observers: statistics of a tensor seen during calibration, turned into quantization parameters.

Contract:
- An observer is fed float tensors with ``observe(x)`` and returns ``qparams() -> (scale, zero_point)``,
  each a float32 / int32 tensor of shape ``[]`` (per-tensor) or ``[C]`` (per-channel along ``axis``).
- ``QSpec(dtype, qmin, qmax, symmetric, axis)`` says what integers the parameters map to. ``symmetric``
  fixes the zero point (0 for signed ranges, the middle for unsigned ones) and uses ``max(|lo|, |hi|)``;
  asymmetric ranges always include 0 so that zero (padding, ReLU) is exact.
- The range estimators, all reducing to a range ``[lo, hi]`` per channel:
  * ``MinMaxObserver``: running min and max.
  * ``MovingAverageMinMaxObserver(momentum)``: exponential moving average of each batch's min/max
    (the first batch initialises it).
  * ``PercentileObserver(percentile)``: the percentiles of all values seen (kept on a fixed histogram
    once the range is known, so memory stays bounded).
  * ``MSEObserver``: the clipping range (a shrink of the min/max range, searched on a grid) that
    minimises the mean squared quantization error of the values seen.
  * ``HistogramObserver``: TensorRT-style entropy calibration: the clipping threshold minimising the KL
    divergence between the value histogram and its quantized version.
- From a range: ``scale = (hi - lo) / (qmax - qmin)`` and ``zero_point = round(qmin - lo / scale)``
  (asymmetric), or ``scale = max(|lo|, |hi|) / ((qmax - qmin) / 2)`` (symmetric); a zero range gets
  the float32 ``eps`` as its scale, never 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.errors import KilnError

EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class QSpec:
    """The integer target of a set of quantization parameters."""

    dtype: torch.dtype = torch.uint8
    qmin: int = 0
    qmax: int = 255
    symmetric: bool = False
    axis: int | None = None  # None: per-tensor

    @property
    def per_channel(self) -> bool:
        return self.axis is not None


UINT8_ASYM = QSpec(torch.uint8, 0, 255, symmetric=False)
INT8_ASYM = QSpec(torch.int8, -128, 127, symmetric=False)
INT8_SYM_PER_CHANNEL = QSpec(torch.int8, -128, 127, symmetric=True, axis=0)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale f32, zero_point i32) for each [lo, hi] (tensors of the same shape)."""
    lo = torch.clamp_max(lo.to(torch.float32), 0.0)
    hi = torch.clamp_min(hi.to(torch.float32), 0.0)
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        scale = amax / ((spec.qmax - spec.qmin) / 2)
        scale = torch.clamp_min(scale, EPS)
        mid = 0 if spec.qmin < 0 else (spec.qmin + spec.qmax + 1) // 2
        zp = torch.full_like(scale, mid, dtype=torch.int32)
        return scale, zp
    scale = torch.clamp_min((hi - lo) / float(spec.qmax - spec.qmin), EPS)
    zp = torch.clamp(torch.round(spec.qmin - lo / scale), spec.qmin, spec.qmax).to(torch.int32)
    return scale, zp


def _reduce_dims(x: torch.Tensor, axis: int | None) -> list[int]:
    if axis is None:
        return list(range(x.dim()))
    axis = axis % x.dim()
    return [d for d in range(x.dim()) if d != axis]


def _channels_first(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """[C, N] view of x (C = 1 for per-tensor)."""
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis % x.dim(), 0).reshape(x.shape[axis], -1)


class Observer:
    def __init__(self, spec: QSpec = UINT8_ASYM):
        self.spec = spec
        self.count = 0

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float32)
        if x.numel() == 0:
            return
        self._observe(x)
        self.count += 1

    def _observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count == 0:
            raise KilnError(f"{type(self).__name__} has observed nothing; calibrate before asking for qparams")
        lo, hi = self.range()
        scale, zp = qparams_from_range(lo, hi, self.spec)
        if self.spec.axis is None:
            return scale.reshape(()), zp.reshape(())
        return scale, zp


class MinMaxObserver(Observer):
    def __init__(self, spec: QSpec = UINT8_ASYM):
        super().__init__(spec)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = _reduce_dims(x, self.spec.axis)
        return torch.amin(x, dim=dims), torch.amax(x, dim=dims)

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def range(self):
        return self.lo, self.hi


class MovingAverageMinMaxObserver(MinMaxObserver):
    def __init__(self, spec: QSpec = UINT8_ASYM, momentum: float = 0.1):
        super().__init__(spec)
        if not 0 < momentum <= 1:
            raise KilnError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.lo + self.momentum * (lo - self.lo)
            self.hi = self.hi + self.momentum * (hi - self.hi)


class _HistogramBase(Observer):
    """Keeps a per-channel histogram over a range fixed by the first batch (grown by re-binning)."""

    def __init__(self, spec: QSpec = UINT8_ASYM, bins: int = 2048):
        super().__init__(spec)
        self.bins = bins
        self.hist: torch.Tensor | None = None  # [C, bins] float64 counts
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _observe(self, x: torch.Tensor) -> None:
        rows = _channels_first(x, self.spec.axis)
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        if self.hist is None:
            self.lo, self.hi = lo, torch.maximum(hi, lo + EPS)
            self.hist = torch.zeros(rows.shape[0], self.bins, dtype=torch.float64)
        elif bool((lo < self.lo).any() or (hi > self.hi).any()):
            self._regrid(torch.minimum(self.lo, lo), torch.maximum(self.hi, hi))
        self.hist += self._histogram(rows, self.lo, self.hi)

    def _histogram(self, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        width = (hi - lo) / self.bins
        idx = ((rows - lo[:, None]) / width[:, None]).floor().clamp(0, self.bins - 1).to(torch.int64)
        out = torch.zeros(rows.shape[0], self.bins, dtype=torch.float64)
        out.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
        return out

    def _regrid(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Move the counts onto a wider grid (each old bin's mass goes to the new bin of its centre)."""
        old_w = (self.hi - self.lo) / self.bins
        centres = self.lo[:, None] + old_w[:, None] * (torch.arange(self.bins) + 0.5)
        new_w = (hi - lo) / self.bins
        idx = ((centres - lo[:, None]) / new_w[:, None]).floor().clamp(0, self.bins - 1).to(torch.int64)
        out = torch.zeros_like(self.hist)
        out.scatter_add_(1, idx, self.hist)
        self.hist, self.lo, self.hi = out, lo, hi

    def bin_edges(self) -> torch.Tensor:
        return self.lo[:, None] + (self.hi - self.lo)[:, None] * torch.linspace(0, 1, self.bins + 1)


class PercentileObserver(_HistogramBase):
    """Clips to the [100 - p, p] percentiles of the values seen (interpolated within a bin)."""

    def __init__(self, spec: QSpec = UINT8_ASYM, percentile: float = 99.99, bins: int = 2048):
        super().__init__(spec, bins)
        if not 50 < percentile <= 100:
            raise KilnError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def range(self):
        cdf = torch.cumsum(self.hist, dim=1)
        total = cdf[:, -1:]
        edges = self.bin_edges()

        def quantile(q: float) -> torch.Tensor:
            target = total * q
            i = torch.searchsorted(cdf, target).clamp(max=self.bins - 1)  # first bin reaching q
            before = torch.gather(cdf, 1, (i - 1).clamp(min=0)) * (i > 0)
            in_bin = torch.gather(self.hist, 1, i).clamp_min(1e-12)
            frac = ((target - before) / in_bin).clamp(0, 1)
            left = torch.gather(edges, 1, i)
            right = torch.gather(edges, 1, i + 1)
            return (left + frac * (right - left)).squeeze(1).to(torch.float32)

        p = self.percentile / 100
        return quantile(1 - p), quantile(p)


class MSEObserver(MinMaxObserver):
    """Searches a shrink factor of the min/max range that minimises the quantization MSE of what it saw.

    Keeps a bounded sample (``max_samples`` values per channel) to evaluate candidate ranges.
    """

    def __init__(self, spec: QSpec = UINT8_ASYM, grid: int = 100, max_samples: int = 65536):
        super().__init__(spec)
        self.grid = grid
        self.max_samples = max_samples
        self.samples: torch.Tensor | None = None
        self._gen = torch.Generator().manual_seed(0)

    def _observe(self, x: torch.Tensor) -> None:
        super()._observe(x)
        rows = _channels_first(x, self.spec.axis)
        if rows.shape[1] > self.max_samples:
            keep = torch.randperm(rows.shape[1], generator=self._gen)[: self.max_samples]
            rows = rows[:, keep]
        self.samples = rows if self.samples is None else torch.cat([self.samples, rows], dim=1)
        if self.samples.shape[1] > self.max_samples:
            keep = torch.randperm(self.samples.shape[1], generator=self._gen)[: self.max_samples]
            self.samples = self.samples[:, keep]

    def range(self):
        lo, hi = torch.clamp_max(self.lo, 0.0), torch.clamp_min(self.hi, 0.0)
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for i in range(self.grid):
            f = 1.0 - i / self.grid
            c_lo, c_hi = lo * f, hi * f
            err = quant_mse(self.samples, c_lo, c_hi, self.spec)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, c_lo, best_lo)
            best_hi = torch.where(better, c_hi, best_hi)
        return best_lo, best_hi


def fake_quant_rows(rows: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Quantize-dequantize [C, N] rows with per-row parameters (the kiln.quantize formula)."""
    s, z = scale.reshape(-1, 1), zp.reshape(-1, 1).to(torch.float32)
    q = torch.clamp(torch.round(rows / s) + z, spec.qmin, spec.qmax)
    return (q - z) * s


def quant_mse(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QSpec) -> torch.Tensor:
    scale, zp = qparams_from_range(lo, hi, spec)
    return ((fake_quant_rows(rows, scale, zp, spec) - rows) ** 2).mean(dim=1).reshape(lo.shape)


class HistogramObserver(_HistogramBase):
    """Entropy calibration: the threshold whose quantized histogram is closest (KL) to the real one.

    Works on |x| for symmetric specs and on the histogram's own range otherwise, keeping the side that
    holds less mass unclipped (TensorRT's procedure, generalised to asymmetric ranges by clipping the
    upper end of a non-negative distribution and both ends of a signed one proportionally).
    """

    def __init__(self, spec: QSpec = UINT8_ASYM, bins: int = 2048, start: int = 128):
        super().__init__(spec, bins)
        self.start = start

    def range(self):
        lo_out, hi_out = [], []
        edges = self.bin_edges()
        levels = self.spec.qmax - self.spec.qmin + 1
        for c in range(self.hist.shape[0]):
            lo, hi = float(self.lo[c]), float(self.hi[c])
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            hist = self.hist[c]
            # fold onto |x| bins: threshold t clips to [-t, t] (signed) or [0, t] (non-negative data)
            amax = max(-lo, hi)
            mags = (edges[c, :-1] + edges[c, 1:]).abs() / 2
            folded = torch.zeros(self.bins, dtype=torch.float64)
            idx = (mags / amax * self.bins).floor().clamp(0, self.bins - 1).to(torch.int64)
            folded.scatter_add_(0, idx, hist)
            n_levels = levels if lo >= 0 else levels // 2  # signed data: half the levels per side
            t_bin = _kl_threshold(folded, max(n_levels, 2), self.start)
            t = amax * t_bin / self.bins
            lo_out.append(max(lo, -t))
            hi_out.append(min(hi, t))
        return torch.tensor(lo_out, dtype=torch.float32), torch.tensor(hi_out, dtype=torch.float32)


def _kl_threshold(hist: torch.Tensor, levels: int, start: int) -> int:
    """The number of leading bins to keep (TensorRT entropy calibration) for a magnitude histogram."""
    nbins = hist.numel()
    nonzero = torch.nonzero(hist).flatten()
    if nonzero.numel() == 0:
        return nbins
    last = int(nonzero[-1]) + 1
    best_i, best_kl = last, float("inf")
    first = min(max(start, levels), last)
    step = max(1, (last - first) // 256)  # bounded cost: at most ~256 candidate thresholds
    for i in range(first, last + 1, step):
        p = hist[:i].clone()
        p[i - 1] += hist[i:].sum()  # outliers clipped into the last kept bin
        q = _quantize_histogram(hist[:i], levels)
        kl = _kl(p, q)
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i


def _quantize_histogram(p: torch.Tensor, levels: int) -> torch.Tensor:
    """Merge ``p`` into ``levels`` equal chunks and spread each chunk evenly over its non-empty bins."""
    n = p.numel()
    chunk = torch.div(torch.arange(n) * levels, n, rounding_mode="floor")
    sums = torch.zeros(levels, dtype=torch.float64).scatter_add_(0, chunk, p)
    nonempty = (p > 0).to(torch.float64)
    counts = torch.zeros(levels, dtype=torch.float64).scatter_add_(0, chunk, nonempty)
    per_bin = sums / counts.clamp_min(1)
    return per_bin[chunk] * nonempty


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    p = p / p.sum()
    q = q / q.sum().clamp_min(1e-300)
    mask = p > 0
    qm = q[mask].clamp_min(1e-12)
    return float((p[mask] * torch.log(p[mask] / qm)).sum())


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": HistogramObserver,
}


def make_observer(name: str, spec: QSpec, **options) -> Observer:
    try:
        cls = OBSERVERS[name]
    except KeyError:
        raise KilnError(f"unknown observer {name!r}; known observers: {', '.join(OBSERVERS)}") from None
    return cls(spec, **options)
