"""kiln's quantized ops: each reference implementation agrees bit for bit with an independent numpy
implementation (round half to even, saturation, int32 wraparound, zero points in padding), the types
carry QuantParams, bad arguments are rejected with the op's name, and the ops print, parse and verify."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.errors import KilnError
from kiln.ir import quant_ops as Q
from kiln.ir.builder import Builder
from kiln.ir.graph import Graph
from kiln.ir.parser import parse_graph
from kiln.ir.printer import print_graph
from kiln.ir.to_fx import to_fx
from kiln.ir.types import QuantParams, TensorType, sym
from kiln.ir.verifier import verify

F32 = np.float32


# -- numpy references --------------------------------------------------------------------------------------

def np_quantize(x, scale, zp, qmin, qmax, dtype):
    t = np.round(x.astype(F32) / np.asarray(scale, dtype=F32))  # np.round is half-to-even
    return np.clip(t + np.asarray(zp, dtype=F32), qmin, qmax).astype(dtype)


def np_dequantize(q, scale, zp):
    return (q.astype(np.int32) - np.asarray(zp, dtype=np.int32)).astype(F32) * np.asarray(scale, dtype=F32)


def np_wrap32(a):
    return ((a.astype(np.int64) + 2**31) % 2**32 - 2**31).astype(np.int32)


def np_requant(acc, mult, bias, other, post, out_scale, out_zp, out_dtype):
    y = acc.astype(F32) * mult
    if bias is not None:
        y = y + bias
    if other is not None:
        y = y + other
    if post == "relu":
        y = np.maximum(y, F32(0))
    if out_dtype is None:
        return y
    lo, hi = np.iinfo(out_dtype).min, np.iinfo(out_dtype).max
    return np_quantize(y, out_scale, out_zp, lo, hi, out_dtype)


def np_conv_acc(qx, xz, qw, wz, stride, padding, dilation, groups):
    x = qx.astype(np.int64) - xz
    w = qw.astype(np.int64) - wz.reshape(-1, 1, 1, 1).astype(np.int64)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    x = np.pad(x, ((0, 0), (0, 0), (padding[0], padding[0]), (padding[1], padding[1])))  # real zero
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, o, oh, ow), dtype=np.int64)
    og = o // groups
    for g in range(groups):
        xs = x[:, g * cg:(g + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dilation[0]: i * dilation[0] + stride[0] * oh: stride[0],
                           j * dilation[1]: j * dilation[1] + stride[1] * ow: stride[1]]
                out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, w[g * og:(g + 1) * og, :, i, j])
    return np_wrap32(out)


def rand_int(shape, lo, hi, dtype, seed):
    return torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int64).to(dtype)


# -- per-tensor / per-channel / per-group -------------------------------------------------------------------

def test_quantize_rounds_half_to_even_and_saturates():
    x = torch.tensor([0.25, 0.75, 1.25, -0.25, -0.75, 1000.0, -1000.0, 0.0])
    q = Q.quantize(x, 0.5, 3, 0, 255, torch.uint8)
    # x / 0.5 = 0.5, 1.5, 2.5, -0.5, -1.5 -> 0, 2, 2, -0, -2 (+3); saturation at both ends
    assert q.tolist() == [3, 5, 5, 3, 1, 255, 0, 3]
    assert Q.dequantize(q, 0.5, 3).tolist() == [0.0, 1.0, 1.0, 0.0, -1.0, 126.0, -1.5, 0.0]


@pytest.mark.parametrize("dtype,qmin,qmax", [(torch.uint8, 0, 255), (torch.int8, -128, 127), (torch.int8, -8, 7)])
def test_per_tensor_bit_exact_with_numpy(dtype, qmin, qmax):
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1)) * 3
    scale, zp = 0.0371, (qmin + qmax + 1) // 2 - 3
    q = Q.quantize(x, scale, zp, qmin, qmax, dtype)
    npd = np.uint8 if dtype == torch.uint8 else np.int8
    assert np.array_equal(q.numpy(), np_quantize(x.numpy(), scale, zp, qmin, qmax, npd))
    assert np.array_equal(Q.dequantize(q, scale, zp).numpy(), np_dequantize(q.numpy(), scale, zp))


def test_per_channel_bit_exact_with_numpy():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 7, generator=gen)
    scales = torch.rand(5, generator=gen) * 0.05 + 0.01
    zps = torch.tensor([0, 1, -3, 5, 2], dtype=torch.int32)
    q = Q.quantize_per_channel(x, scales, zps, 1, -127, 127, torch.int8)
    s, z = scales.numpy().reshape(1, 5, 1), zps.numpy().reshape(1, 5, 1)
    assert np.array_equal(q.numpy(), np_quantize(x.numpy(), s, z, -127, 127, np.int8))
    assert np.array_equal(Q.dequantize_per_channel(q, scales, zps, 1).numpy(), np_dequantize(q.numpy(), s, z))


def test_per_group_bit_exact_with_numpy():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 64, generator=gen)
    scales = torch.rand(6, 2, generator=gen) * 0.2 + 0.05
    zps = torch.randint(0, 16, (6, 2), generator=gen, dtype=torch.int32)
    q = Q.quantize_per_group(w, scales, zps, 32, 0, 15, torch.uint8)
    s, z = np.repeat(scales.numpy(), 32, axis=1), np.repeat(zps.numpy(), 32, axis=1)
    assert np.array_equal(q.numpy(), np_quantize(w.numpy(), s, z, 0, 15, np.uint8))
    assert int(q.max()) <= 15
    assert np.array_equal(Q.dequantize_per_group(q, scales, zps, 32).numpy(), np_dequantize(q.numpy(), s, z))


# -- integer linear / conv / matmul ------------------------------------------------------------------------

@pytest.mark.parametrize("out_dtype,post,with_other", [(torch.uint8, "relu", False), (torch.float32, "none", False),
                                                       (torch.int8, "none", True), (torch.uint8, "relu", True)])
def test_qlinear_bit_exact_with_numpy(out_dtype, post, with_other):
    gen = torch.Generator().manual_seed(4)
    qx = rand_int((2, 5, 48), 0, 255, torch.uint8, 5)
    qw = rand_int((24, 48), -128, 127, torch.int8, 6)
    w_scales = torch.rand(24, generator=gen) * 0.01 + 0.001
    w_zps = torch.tensor([0, 3] * 12, dtype=torch.int32)
    bias = torch.randn(24, generator=gen)
    other = rand_int((2, 5, 24), 0, 255, torch.uint8, 7) if with_other else None
    out = Q.qlinear(qx, 0.02, 131, qw, w_scales, w_zps, bias, 0.05, 7 if out_dtype != torch.float32 else 0,
                    out_dtype, post, other, 0.03, 100)
    acc = np_wrap32(np.einsum("btk,nk->btn", qx.numpy().astype(np.int64) - 131,
                              qw.numpy().astype(np.int64) - w_zps.numpy()[:, None]))
    mult = F32(0.02) * w_scales.numpy()
    oth = np_dequantize(other.numpy(), 0.03, 100) if with_other else None
    npd = {torch.uint8: np.uint8, torch.int8: np.int8, torch.float32: None}[out_dtype]
    want = np_requant(acc, mult, bias.numpy(), oth, post, 0.05, 7, npd)
    assert out.dtype == out_dtype
    assert np.array_equal(out.numpy(), want)


@pytest.mark.parametrize("stride,padding,dilation,groups", [([1, 1], [1, 1], [1, 1], 1), ([2, 2], [0, 1], [1, 1], 2),
                                                            ([1, 2], [2, 2], [2, 1], 1)])
def test_qconv2d_bit_exact_with_numpy(stride, padding, dilation, groups):
    gen = torch.Generator().manual_seed(8)
    qx = rand_int((2, 4, 9, 8), 0, 255, torch.uint8, 9)
    qw = rand_int((6, 4 // groups, 3, 3), -127, 127, torch.int8, 10)
    w_scales = torch.rand(6, generator=gen) * 0.01 + 0.001
    w_zps = torch.zeros(6, dtype=torch.int32)
    bias = torch.randn(6, generator=gen)
    out = Q.qconv2d(qx, 0.04, 120, qw, w_scales, w_zps, bias, stride, padding, dilation, groups, 0.1, 3,
                    torch.uint8, "relu")
    acc = np_conv_acc(qx.numpy(), 120, qw.numpy(), w_zps.numpy(), stride, padding, dilation, groups)
    want = np_requant(acc, F32(0.04) * w_scales.numpy().reshape(1, 6, 1, 1), bias.numpy().reshape(1, 6, 1, 1), None,
                      "relu", 0.1, 3, np.uint8)
    assert np.array_equal(out.numpy(), want)
    # the residual operand (fused add) is dequantized and added before the ReLU
    other = rand_int(tuple(out.shape), 0, 255, torch.uint8, 11)
    out2 = Q.qconv2d(qx, 0.04, 120, qw, w_scales, w_zps, None, stride, padding, dilation, groups, 1.0, 0,
                     torch.float32, "none", other, 0.02, 9)
    want2 = np_requant(acc, F32(0.04) * w_scales.numpy().reshape(1, 6, 1, 1), None,
                       np_dequantize(other.numpy(), 0.02, 9), "none", 1.0, 0, None)
    assert np.array_equal(out2.numpy(), want2)


def test_int32_accumulator_wraps_around():
    k = 70000  # 255 * 127 * 70000 > 2**31
    qx = torch.full((1, k), 255, dtype=torch.uint8)
    qw = torch.full((1, k), 127, dtype=torch.int8)
    out = Q.qlinear(qx, 1.0, 0, qw, torch.ones(1), torch.zeros(1, dtype=torch.int32), None, 1.0, 0, torch.float32)
    exact = 255 * 127 * k
    assert float(out) == float(np.float32(np_wrap32(np.array([exact]))[0]))
    assert float(out) != float(exact)


def test_qmatmul_bit_exact_with_numpy():
    qa = rand_int((3, 4, 16), -128, 127, torch.int8, 12)
    qb = rand_int((3, 16, 5), 0, 255, torch.uint8, 13)
    out = Q.qmatmul(qa, 0.1, -2, qb, 0.05, 128, 0.2, 0, torch.int8)
    acc = np_wrap32(np.matmul(qa.numpy().astype(np.int64) + 2, qb.numpy().astype(np.int64) - 128))
    want = np_requant(acc, F32(0.1) * F32(0.05), None, None, "none", 0.2, 0, np.int8)
    assert np.array_equal(out.numpy(), want)


def test_dynamic_qlinear_bit_exact_with_numpy():
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(7, 32, generator=gen) + 0.5
    qw = rand_int((10, 32), -127, 127, torch.int8, 15)
    w_scales = torch.rand(10, generator=gen) * 0.01 + 0.001
    w_zps = torch.zeros(10, dtype=torch.int32)
    bias = torch.randn(10, generator=gen)
    out = Q.dynamic_qlinear(x, qw, w_scales, w_zps, bias)
    xn = x.numpy()
    lo, hi = min(F32(xn.min()), F32(0)), max(F32(xn.max()), F32(0))
    scale = F32((hi - lo) / F32(255))
    zp = int(np.clip(np.round(F32(0) - lo / scale), 0, 255))
    qx = np_quantize(xn, scale, zp, 0, 255, np.uint8)
    acc = np_wrap32((qx.astype(np.int64) - zp) @ qw.numpy().astype(np.int64).T)
    assert np.array_equal(out.numpy(), np_requant(acc, scale * w_scales.numpy(), bias.numpy(), None, "none", 1, 0,
                                                  None))


def test_wq_linear_is_linear_of_the_exact_dequantized_weight():
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(3, 64, generator=gen)
    qw = rand_int((8, 64), 0, 15, torch.uint8, 17)
    scales = torch.rand(8, 2, generator=gen) * 0.1
    zps = torch.randint(0, 16, (8, 2), generator=gen, dtype=torch.int32)
    w = np_dequantize(qw.numpy(), np.repeat(scales.numpy(), 32, 1), np.repeat(zps.numpy(), 32, 1))
    out = Q.wq_linear(x, qw, scales, zps, 32, None)
    np.testing.assert_allclose(out.numpy(), x.numpy() @ w.T, rtol=1e-5, atol=1e-5)


# -- IR: types, errors, text form ---------------------------------------------------------------------------

def _qlinear_graph(batch=4) -> Graph:
    g = Graph("ql")
    x = g.add_input(TensorType((batch, 16), torch.float32), "x")
    b = Builder(g)
    qw = b.weight("w.q", rand_int((8, 16), -127, 127, torch.int8, 18))
    ws, wz = b.weight("w.s", torch.full((8,), 0.01)), b.weight("w.z", torch.zeros(8, dtype=torch.int32))
    q = b.call(Q.QUANTIZE, x, 0.05, 128, 0, 255, torch.uint8)
    y = b.call(Q.QLINEAR, q, 0.05, 128, qw, ws, wz, None, 0.1, 0, torch.uint8, "relu", None, 1.0, 0)
    g.set_outputs([b.call(Q.DEQUANTIZE, y, 0.1, 0)])
    return g


def test_types_carry_quant_params_and_symbolic_shapes():
    g = _qlinear_graph(batch=sym("s0"))
    q, y = g.nodes[-3].output, g.nodes[-2].output
    assert q.type == TensorType((sym("s0"), 16), torch.uint8, quant=QuantParams("uint8", "per_tensor", (0.05,), (128,)))
    assert y.type.shape == (sym("s0"), 8) and y.type.quant.scale == (0.1,)
    assert g.outputs[0].type == TensorType((sym("s0"), 8), torch.float32)
    verify(g)


def test_print_parse_round_trip_and_reference_run():
    g = _qlinear_graph()
    text = print_graph(g)
    assert "kiln.qlinear(" in text and 'quant = {qdtype = "uint8"' in text
    g2 = parse_graph(text, weights=g.weights)
    assert print_graph(g2) == text
    verify(g2)
    x = torch.randn(4, 16)
    assert torch.equal(to_fx(g)(x)[0], to_fx(g2)(x)[0])


def test_bad_arguments_name_the_op():
    g = Graph("bad")
    x = g.add_input(TensorType((4, 16), torch.float32), "x")
    i8 = g.add_input(TensorType((4, 16), torch.int8), "q")
    b = Builder(g)
    with pytest.raises(KilnError, match="kiln.quantize: range"):
        b.call(Q.QUANTIZE, x, 0.1, 0, 0, 300, torch.uint8)
    with pytest.raises(KilnError, match="kiln.quantize: scale must be positive"):
        b.call(Q.QUANTIZE, x, 0.0, 0, 0, 255, torch.uint8)
    qw = b.weight("w", torch.zeros(8, 12, dtype=torch.int8))
    ws, wz = b.weight("s", torch.ones(8)), b.weight("z", torch.zeros(8, dtype=torch.int32))
    with pytest.raises(KilnError, match="kiln.qlinear: input has 16 features"):
        b.call(Q.QLINEAR, i8, 0.1, 0, qw, ws, wz, None, 1.0, 0, torch.float32)
    with pytest.raises(KilnError, match="kiln.qlinear: 'qx' must be"):
        b.call(Q.QLINEAR, x, 0.1, 0, qw, ws, wz, None, 1.0, 0, torch.float32)
    q = b.call(Q.QUANTIZE, x, 0.1, 3, 0, 255, torch.uint8)
    with pytest.raises(KilnError, match="annotated scale=0.1, zero_point=3"):
        b.call(Q.DEQUANTIZE, q, 0.2, 3)
    with pytest.raises(KilnError, match="group_size 5 must divide"):
        b.call(Q.DEQUANTIZE_PER_GROUP, i8, b.weight("gs", torch.ones(4, 3)), b.weight("gz", torch.zeros(4, 3)), 5)


def test_qdtype_names():
    assert Q.qdtype_name(torch.uint8, 0, 255) == "uint8"
    assert Q.qdtype_name(torch.int8, -127, 127) == "int8"
    assert Q.qdtype_name(torch.uint8, 0, 15) == "uint4"
    assert Q.qdtype_name(torch.int8, -8, 7) == "int4"
    assert Q.qdtype_bits("uint4") == 4
