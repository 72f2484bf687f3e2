"""kiln's vectorisable float32 log/log1p against float64 PyTorch, special values included."""

from __future__ import annotations

import pytest
import torch

tvm = pytest.importorskip("tvm")

from tvm import te  # noqa: E402

from kiln.backends.tvm.fast_math import fast_log, fast_log1p  # noqa: E402
from kiln.backends.tvm.kernel import cpu_target  # noqa: E402
from kiln.backends.tvm.schedule import schedule_cpu  # noqa: E402

N = 1 << 16
REL_TOL = 4e-7  # a few float32 ulps


def _run(fn, x):
    a = te.placeholder((x.numel(),), "float32", name="a")
    kernel = tvm.compile(schedule_cpu(te.create_prim_func([a, fn(a)])), target=cpu_target())["main"]
    out = torch.empty_like(x)
    kernel(x, out)
    return out


def _check(got, ref, inputs):
    ref32 = ref.float()
    same_special = (torch.isnan(got) == torch.isnan(ref32)) & (torch.isinf(ref32) <= (got == ref32))
    assert same_special.all(), list(zip(inputs[~same_special].tolist(), got[~same_special].tolist()))
    finite = torch.isfinite(ref) & (ref != 0)
    rel = ((got.double() - ref).abs() / ref.abs())[finite]
    assert rel.max().item() < REL_TOL


def test_fast_log_over_the_float32_range_and_special_values():
    gen = torch.Generator().manual_seed(0)
    x = torch.exp(torch.empty(N).uniform_(-87, 88, generator=gen))
    special = torch.tensor([0.0, -0.0, 1e-45, 1e-40, 1.17549435e-38, 1.0, 0.5, 2.0, 0.70710677, 1.4142135,
                            0.99999994, 1.0000001, 3.4e38, float("inf"), float("nan"), -1.0])
    x[: len(special)] = special
    got = _run(fast_log, x)
    _check(got, torch.log(x.double()), x)
    assert got[0] == float("-inf") and torch.isnan(got[-1 + len(special)]) and got[5] == 0.0


def test_fast_log1p_keeps_relative_accuracy_for_tiny_arguments():
    gen = torch.Generator().manual_seed(1)
    u = torch.cat([torch.empty(N // 2).uniform_(-1, 1, generator=gen),
                   torch.exp(torch.empty(N // 2).uniform_(-80, 80, generator=gen)),
                   -torch.exp(torch.empty(N // 4).uniform_(-80, -1e-3, generator=gen))])
    special = torch.tensor([0.0, -1.0, -2.0, 1e-10, -1e-10, 5.96e-8, 1e-30, 3e38, float("inf"), float("nan")])
    u[: len(special)] = special
    got = _run(fast_log1p, u)
    _check(got, torch.log1p(u.double()), u)
    assert got[1] == float("-inf") and torch.isnan(got[2]) and got[3].item() == pytest.approx(1e-10, rel=1e-6)
