"""GPTQ rounding: error-compensating quantization of a linear layer's weight, given its input activations.

Contract:
- ``gptq_round(w, x, scales, zero_points, group_size, qmin, qmax, dtype, damp=0.01) -> QuantizedWeight``
  quantizes the ``[N, K]`` weight ``w`` on the given per-group grid (``scales``/``zero_points`` of shape
  ``[N, K / group_size]``, fixed up front: GPTQ's "static groups") so that the layer's output on the
  ``[rows, K]`` activations ``x`` stays close to ``x w^T``. Frantar et al., "GPTQ" (2022): with the Hessian
  ``H = 2 x^T x / rows`` (plus ``damp`` times its mean diagonal), columns are quantized one at a time in
  decreasing order of ``diag(H)`` ("act order"), and each column's rounding error is spread over the
  not-yet-quantized columns through the upper Cholesky factor of ``H^-1`` (lazy batch updates in blocks of
  ``block`` columns). Input channels that never fire (``diag(H) == 0``) are zeroed, as in GPTQ.
- The integer values use the exact rounding of ``kiln.quantize_per_group`` (round half to even, clamp to
  ``[qmin, qmax]``), so ``result.dequantize()`` is what ``kiln.wq_linear`` computes with.
- ``H`` that is not positive definite even after damping (10x more damping, three times) raises
  ``KilnError``.
"""

from __future__ import annotations

import torch

from kiln.errors import KilnError
from kiln.passes.quantize.weights import QuantizedWeight


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (h + damping)^-1, raising the damping until h is positive definite."""
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    level = damp * float(torch.diag(h).mean())
    for _ in range(4):
        chol, info = torch.linalg.cholesky_ex(h + level * eye)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
        level *= 10
    raise KilnError(f"GPTQ: the activation Hessian ({h.shape[0]} channels) is not positive definite even with "
                    f"damping {level / 10:.3g}")


def gptq_round(w: torch.Tensor, x: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
               group_size: int, qmin: int, qmax: int, dtype: torch.dtype, damp: float = 0.01,
               block: int = 128) -> QuantizedWeight:
    n, k = w.shape
    if x.shape[-1] != k or k % group_size or tuple(scales.shape) != (n, k // group_size):
        raise KilnError(f"GPTQ: weight {list(w.shape)}, activations {list(x.shape)} and scales "
                        f"{list(scales.shape)} do not match group size {group_size}")
    x = x.to(torch.float64)
    h = (x.t() @ x) * (2.0 / x.shape[0])
    w = w.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diag(h), descending=True, stable=True)
    w, h = w[:, order], h[order][:, order]
    hinv = _inverse_cholesky(h, damp)
    s = scales.to(torch.float32)[:, order // group_size]  # [N, K]: each (permuted) column's grid
    z = zero_points.to(torch.int32)[:, order // group_size]
    q = torch.empty(n, k, dtype=torch.int32)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[:, b0:b1].clone()
        errs = torch.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            qc = torch.clamp(torch.round(wb[:, i].to(torch.float32) / s[:, col]).to(torch.int32) + z[:, col],
                             qmin, qmax)
            q[:, col] = qc
            err = (wb[:, i] - ((qc - z[:, col]).to(torch.float32) * s[:, col]).to(torch.float64)) / hb[i, i]
            wb[:, i:] -= err[:, None] * hb[i, i:][None, :]
            errs[:, i] = err
        w[:, b1:] -= errs @ hinv[b0:b1, b1:]
    q = q[:, torch.argsort(order)].to(dtype).contiguous()
    return QuantizedWeight(q, scales.to(torch.float32), zero_points.to(torch.int32), "per_group", qmin, qmax,
                           group_size)
