"""kiln's TVM int8 GEMM (AVX-512 VNNI): the packed layout, and the kernel bit-exact against kiln's reference
``qlinear``/``dynamic_qlinear`` over ragged shapes, int8/uint8 activations, relu, requantization and bias."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm", reason="the TVM int8 kernels need apache-tvm")

from kiln.backends.tvm import int8  # noqa: E402
from kiln.errors import KilnInputError, UnsupportedError  # noqa: E402
from kiln.ir import quant_ops as Q  # noqa: E402

try:
    int8.vnni_target()
    NO_VNNI = None
except UnsupportedError as e:
    NO_VNNI = str(e)

needs_vnni = pytest.mark.skipif(NO_VNNI is not None, reason=f"no AVX-512 VNNI here: {NO_VNNI}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(n: int, k: int, seed: int, bias: bool = True):
    g = _gen(seed)
    qw = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, generator=g) * 0.01 + 1e-3
    b = torch.randn(n, generator=g) if bias else None
    return qw, scales, b


def test_pack_weight_layout_and_padding():
    qw = torch.randint(-128, 128, (20, 7), dtype=torch.int8, generator=_gen(0))
    p = int8.pack_weight(qw)
    assert p.shape == (2, 2, 16, 4) and p.dtype == torch.int8
    for n in range(32):
        for k in range(8):
            want = int(qw[n, k]) if n < 20 and k < 7 else 0
            assert int(p[n // 16, k // 4, n % 16, k % 4]) == want
    with pytest.raises(KilnInputError, match="int8"):
        int8.pack_weight(qw.to(torch.uint8))


def test_spec_refuses_what_it_does_not_handle_and_tiles_divide():
    with pytest.raises(UnsupportedError, match="post_op"):
        int8.GemmSpec(4, 16, 16, post_op="gelu")
    with pytest.raises(UnsupportedError, match="out_dtype"):
        int8.GemmSpec(4, 16, 16, out_dtype="int32")
    for m, n in [(1, 1000), (5, 33), (64, 512), (6, 48), (256, 4096)]:
        s = int8.GemmSpec(m, n, 64)
        mr, nr = s.tile()
        assert s.m % mr == 0 and (s.np_ // 16) % nr == 0 and mr * nr <= 16


CASES = [  # m, n, k, x dtype, post_op, out dtype, bias
    (1, 16, 4, torch.uint8, "none", torch.float32, True),
    (5, 33, 70, torch.uint8, "relu", torch.uint8, True),
    (3, 20, 9, torch.int8, "none", torch.int8, False),
    (7, 48, 17, torch.int8, "relu", torch.float32, True),
    (64, 256, 256, torch.uint8, "relu", torch.uint8, True),  # 4M multiply-adds: the parallel schedule
    (2, 1000, 64, torch.uint8, "none", torch.float32, False),
]


@needs_vnni
@pytest.mark.parametrize("m,n,k,xdt,post_op,out_dtype,bias", CASES)
def test_static_kernel_is_bit_exact_with_the_reference(m, n, k, xdt, post_op, out_dtype, bias):
    qw, scales, b = _layer(n, k, seed=m + n + k, bias=bias)
    lo, hi = Q.INT_RANGES[xdt]
    qx = torch.randint(lo, hi + 1, (m, k), dtype=xdt, generator=_gen(k))
    x_scale, x_zp = 0.021, (9 if xdt == torch.uint8 else -3)
    out_scale, out_zp = 0.37, (5 if out_dtype == torch.uint8 else -2)
    lin = int8.Int8Linear(qw, scales, b, post_op, out_dtype, out_scale, out_zp)
    got = lin(qx, x_scale, x_zp)
    ref = Q.qlinear(qx, x_scale, x_zp, qw, scales, torch.zeros(n, dtype=torch.int32), b, out_scale, out_zp,
                    out_dtype, post_op)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.equal(got, ref), f"max difference {(got.double() - ref.double()).abs().max()}"
    if out_dtype != torch.float32:  # the integer outputs are not trivially saturated
        assert len(torch.unique(got)) > 10


@needs_vnni
def test_leading_batch_dims_and_repeated_calls():
    qw, scales, b = _layer(32, 24, seed=3)
    qx = torch.randint(0, 256, (2, 3, 24), dtype=torch.uint8, generator=_gen(4))
    lin = int8.Int8Linear(qw, scales, b)
    zeros = torch.zeros(32, dtype=torch.int32)
    ref = Q.qlinear(qx, 0.05, 128, qw, scales, zeros, b, 1.0, 0, torch.float32)
    assert torch.equal(lin(qx, 0.05, 128), ref)
    assert torch.equal(lin(qx, 0.05, 128), ref)  # the cached kernel and vectors
    ref2 = Q.qlinear(qx, 0.07, 3, qw, scales, zeros, b, 1.0, 0, torch.float32)
    assert torch.equal(lin(qx, 0.07, 3), ref2)  # other activation parameters, same packed weight


@needs_vnni
@pytest.mark.parametrize("qmin,qmax,shape", [(0, 255, (4, 40)), (-128, 127, (1, 3, 40)), (0, 127, (9, 40))])
def test_dynamic_kernel_is_bit_exact_with_the_reference(qmin, qmax, shape):
    qw, scales, b = _layer(24, 40, seed=7)
    x = torch.randn(*shape, generator=_gen(8)) * 3 + 0.5
    got = int8.Int8Linear(qw, scales, b).dynamic(x, qmin, qmax)
    ref = Q.dynamic_qlinear(x, qw, scales, torch.zeros(24, dtype=torch.int32), b, qmin, qmax)
    assert torch.equal(got, ref), f"max difference {(got - ref).abs().max()}"


@needs_vnni
def test_gemm_rejects_mismatched_inputs():
    p = int8.PackedLinear.of(*_layer(16, 8, seed=1))
    corr, mult = p.static_vectors(0.1, 0, torch.uint8)
    with pytest.raises(KilnInputError, match="uint8"):
        int8.gemm(torch.zeros(2, 8, dtype=torch.int8), p.packed, corr, mult, p.bias, p.n)
    with pytest.raises(KilnInputError, match="does not fit"):
        int8.gemm(torch.zeros(2, 12, dtype=torch.uint8), p.packed, corr, mult, p.bias, p.n)


def test_a_cpu_without_vnni_is_refused(monkeypatch):
    monkeypatch.setattr(int8.codegen, "target_has_features", lambda feature, target=None: False)
    int8.vnni_target.cache_clear()
    try:
        with pytest.raises(UnsupportedError, match="VNNI"):
            int8.vnni_target()
        with pytest.raises(UnsupportedError, match="VNNI"):
            int8.Int8Linear(*_layer(16, 8, seed=1))
    finally:
        int8.vnni_target.cache_clear()


@needs_vnni
def test_accumulator_wraps_like_int32_and_empty_batches_work():
    k = 70_000  # 255 * 127 * k > 2**31: the int32 accumulator wraps, as kiln's semantics say it does
    qw = torch.full((16, k), 127, dtype=torch.int8)
    qx = torch.full((1, k), 255, dtype=torch.uint8)
    scales = torch.full((16,), 1e-3)
    lin = int8.Int8Linear(qw, scales, None)
    ref = Q.qlinear(qx, 0.5, 0, qw, scales, torch.zeros(16, dtype=torch.int32), None, 1.0, 0, torch.float32)
    assert float(ref[0, 0]) < 0  # wrapped
    assert torch.equal(lin(qx, 0.5, 0), ref)
    assert lin(torch.zeros(0, k, dtype=torch.uint8), 0.5, 0).shape == (0, 16)
