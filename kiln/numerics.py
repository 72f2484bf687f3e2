"""Numerical comparison with explicit per-dtype tolerances — the one definition of "matches".

Contract: ``TOLERANCES[dtype] = (rtol, atol)``; ``compare(actual, expected, what) -> str | None`` returns
None when every tensor matches (same structure, shapes, dtypes, and values within tolerance; NaNs must be
in the same places) or a one-line description of the first mismatch. ``assert_match`` raises
``NumericsError`` with that description.

``magnitude=M`` widens atol to ``rtol * M``: the right test for gradients of deep or badly conditioned
nets, pass the largest gradient element of the whole model. Their small elements carry absolute rounding
error of the order of the largest one: e.g. a bias before a train-mode BatchNorm has a true gradient of
1e-13 that eager float32 computes as ~6e-5, and on the zoo's MobileNetV2 eager float32 differs from
float64 by up to 134 where the largest gradient is 2140.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from kiln.errors import KilnError

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.complex64: (1e-4, 1e-5),
    torch.complex128: (1e-7, 1e-7),
}


class NumericsError(KilnError):
    pass


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> tuple[float, float]:
    rtol, atol = TOLERANCES.get(dtype, (0.0, 0.0))
    return rtol * scale, atol * scale


def compare(actual: Any, expected: Any, what: str = "output", scale: float = 1.0,
            magnitude: float | None = None) -> str | None:
    a_leaves, a_spec = pytree.tree_flatten(actual)
    e_leaves, e_spec = pytree.tree_flatten(expected)
    if len(a_leaves) != len(e_leaves):
        return f"{what}: {len(a_leaves)} values, expected {len(e_leaves)}"
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        where = f"{what}[{i}]" if len(e_leaves) > 1 else what
        if isinstance(e, torch.Tensor):
            if not isinstance(a, torch.Tensor):
                return f"{where}: got {type(a).__name__}, expected a tensor"
            if a.shape != e.shape or a.dtype != e.dtype:
                return f"{where}: got {a.dtype}{list(a.shape)}, expected {e.dtype}{list(e.shape)}"
            rtol, atol = tolerance(e.dtype, scale)
            if magnitude is not None:
                atol = max(atol, rtol * magnitude)
            try:
                torch.testing.assert_close(a.detach(), e.detach(), rtol=rtol, atol=atol, equal_nan=True)
            except AssertionError as err:
                lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
                return f"{where} ({e.dtype}, rtol={rtol:g}, atol={atol:g}): " + "; ".join(lines[:3])
        elif a != e and not (a != a and e != e):
            return f"{where}: got {a!r}, expected {e!r}"
    return None


def assert_match(actual: Any, expected: Any, what: str = "output", scale: float = 1.0,
                 magnitude: float | None = None) -> None:
    msg = compare(actual, expected, what, scale, magnitude)
    if msg is not None:
        raise NumericsError(msg)
