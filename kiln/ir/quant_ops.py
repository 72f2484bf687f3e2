"""kiln's quantized ops: quantize/dequantize and integer linear/conv/matmul, with exact reference semantics.

Contract:
- Every op is a kiln op (``kiln.<name>``, registered here with ``register_kiln_op``) whose ``target`` is
  its reference implementation, so ``to_fx`` runs it, and whose infer function gives the result type,
  with a ``QuantParams`` annotation on integer results (``qdtype``, ``scheme``, scales, zero points).
  Shapes come from the matching ATen op's fake-tensor inference, so symbolic dims work.
- Per-tensor parameters are literal args (``float`` scale, ``int`` zero point); per-channel and per-group
  parameters are tensor values (``f32`` scales, ``i32`` zero points; normally ``kiln.weight`` nodes).
- The semantics, exactly (all float arithmetic is IEEE float32, one rounding per operation, no FMA):
  * ``quantize``: ``q = cast(clamp(round_half_even(x / scale) + zp, qmin, qmax))``. NaN inputs are not
    defined. ``dequantize``: ``x = float32(int32(q) - zp) * scale``.
  * per-channel: the same with ``scale``/``zp`` indexed along ``axis``; per-group: along the last axis in
    consecutive groups of ``group_size`` (``scales``/``zps`` have shape ``[..., K / group_size]``).
  * ``qlinear``/``qconv2d``/``qmatmul``: the accumulator is the exact integer sum
    ``acc = sum (qx - x_zp) * (qw - w_zp)``, wrapped to int32 (two's complement); then
    ``y = float32(acc) * (float32(x_scale) * w_scale[n]) + bias[n]`` (each product/sum rounded once);
    with ``other`` (a fused residual): ``y = y + float32(other - other_zp) * other_scale``; ``post_op``
    ``"relu"`` gives ``max(y, 0)``; finally ``out_dtype`` f32 returns ``y``, an integer ``out_dtype``
    returns ``quantize(y, out_scale, out_zp, full range of out_dtype)``.
  * ``dynamic_qlinear``: activations are quantized at run time to ``[qmin, qmax]`` (asymmetric) with
    ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)``, ``scale = (hi - lo) / (qmax - qmin)`` (1.0 if that
    is 0), ``zp = clamp(round_half_even(qmin - lo / scale), qmin, qmax)``; then as ``qlinear`` with an
    f32 output.
  * ``wq_linear`` (weight-only): ``y = linear(x, dequantize_per_group(qw), bias)`` in float32; only the
    dequantized weight is exact, the float matmul is PyTorch's.
- The integer references accumulate in float64 (exact for integer sums below 2**53) and wrap to int32,
  so they agree bit for bit with a numpy integer implementation (``tests/passes/quantize`` checks it).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kiln.errors import KilnError
from kiln.ir.graph import Value
from kiln.ir.ops import WEIGHT, get_op, register_kiln_op
from kiln.ir.types import QuantParams, TensorType

F32 = torch.float32
INT_RANGES: dict[torch.dtype, tuple[int, int]] = {
    torch.int8: (-128, 127),
    torch.uint8: (0, 255),
    torch.int16: (-(2**15), 2**15 - 1),
    torch.int32: (-(2**31), 2**31 - 1),
}


def qdtype_name(dtype: torch.dtype, qmin: int, qmax: int) -> str:
    """``int8``, ``uint8``, ``int4``, ``uint4``...: the integer format a range of a container dtype holds."""
    bits = max(1, math.ceil(math.log2(qmax - qmin + 1)))
    bits = 4 if bits <= 4 else torch.iinfo(dtype).bits
    return f"{'' if qmin < 0 else 'u'}int{bits}"


def qdtype_bits(qdtype: str) -> int:
    return int(qdtype.removeprefix("u").removeprefix("int"))


def _wrap_int32(acc: torch.Tensor) -> torch.Tensor:
    """Exact integer-valued float64 -> int32 with two's-complement wraparound."""
    a = acc.to(torch.int64)
    return (((a + 2**31) % 2**32) - 2**31).to(torch.int32)


def _round_clamp(t: torch.Tensor, zp, qmin: int, qmax: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.clamp(torch.round(t) + zp, qmin, qmax).to(dtype)


def _channel_view(v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _group_expand(v: torch.Tensor, group_size: int) -> torch.Tensor:
    return v.repeat_interleave(group_size, dim=-1)


# -- reference implementations ---------------------------------------------------------------------------

def quantize(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int,
             dtype: torch.dtype) -> torch.Tensor:
    return _round_clamp(x.to(F32) / scale, zero_point, qmin, qmax, dtype)


def dequantize(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return (q.to(torch.int32) - zero_point).to(F32) * scale


def quantize_per_channel(x: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, axis: int,
                         qmin: int, qmax: int, dtype: torch.dtype) -> torch.Tensor:
    s = _channel_view(scales.to(F32), x.dim(), axis)
    z = _channel_view(zero_points.to(torch.int32), x.dim(), axis)
    return _round_clamp(x.to(F32) / s, z, qmin, qmax, dtype)


def dequantize_per_channel(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                           axis: int) -> torch.Tensor:
    s = _channel_view(scales.to(F32), q.dim(), axis)
    z = _channel_view(zero_points.to(torch.int32), q.dim(), axis)
    return (q.to(torch.int32) - z).to(F32) * s


def quantize_per_group(x: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, group_size: int,
                       qmin: int, qmax: int, dtype: torch.dtype) -> torch.Tensor:
    s = _group_expand(scales.to(F32), group_size)
    z = _group_expand(zero_points.to(torch.int32), group_size)
    return _round_clamp(x.to(F32) / s, z, qmin, qmax, dtype)


def dequantize_per_group(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                         group_size: int) -> torch.Tensor:
    s = _group_expand(scales.to(F32), group_size)
    z = _group_expand(zero_points.to(torch.int32), group_size)
    return (q.to(torch.int32) - z).to(F32) * s


def _epilogue(acc: torch.Tensor, x_scale, w_scales: torch.Tensor, bias, channel_axis: int,
              out_scale: float, out_zp: int, out_dtype: torch.dtype, post_op: str,
              other, other_scale: float, other_zp: int) -> torch.Tensor:
    """int32 accumulator -> float32 (scale, bias, residual, relu) -> requantized or float output."""
    mult = torch.as_tensor(x_scale, dtype=F32) * w_scales.to(F32)
    y = acc.to(F32) * _channel_view(mult, acc.dim(), channel_axis)
    if bias is not None:
        y = y + _channel_view(bias.to(F32), acc.dim(), channel_axis)
    if other is not None:
        y = y + (other.to(torch.int32) - other_zp).to(F32) * other_scale
    if post_op == "relu":
        y = torch.clamp_min(y, 0.0)
    elif post_op != "none":
        raise KilnError(f"unknown post_op {post_op!r}; expected 'none' or 'relu'")
    if out_dtype == F32:
        return y
    qmin, qmax = INT_RANGES[out_dtype]
    return quantize(y, out_scale, out_zp, qmin, qmax, out_dtype)


def qlinear(qx: torch.Tensor, x_scale: float, x_zp: int, qw: torch.Tensor, w_scales: torch.Tensor,
            w_zps: torch.Tensor, bias: torch.Tensor | None, out_scale: float, out_zp: int,
            out_dtype: torch.dtype, post_op: str = "none", other: torch.Tensor | None = None,
            other_scale: float = 1.0, other_zp: int = 0) -> torch.Tensor:
    xi = qx.to(torch.float64) - x_zp
    wi = qw.to(torch.float64) - w_zps.to(torch.float64)[:, None]
    acc = _wrap_int32(torch.matmul(xi, wi.t()))
    return _epilogue(acc, x_scale, w_scales, bias, -1, out_scale, out_zp, out_dtype, post_op,
                     other, other_scale, other_zp)


def qconv2d(qx: torch.Tensor, x_scale: float, x_zp: int, qw: torch.Tensor, w_scales: torch.Tensor,
            w_zps: torch.Tensor, bias: torch.Tensor | None, stride: list[int], padding: list[int],
            dilation: list[int], groups: int, out_scale: float, out_zp: int, out_dtype: torch.dtype,
            post_op: str = "none", other: torch.Tensor | None = None, other_scale: float = 1.0,
            other_zp: int = 0) -> torch.Tensor:
    # zero padding pads the *real* zero, i.e. the integer x_zp: subtract the zero point first
    xi = qx.to(torch.float64) - x_zp
    wi = qw.to(torch.float64) - _channel_view(w_zps.to(torch.float64), 4, 0)
    acc = _wrap_int32(F.conv2d(xi.contiguous(), wi, None, stride, padding, dilation, groups))
    return _epilogue(acc, x_scale, w_scales, bias, 1, out_scale, out_zp, out_dtype, post_op,
                     other, other_scale, other_zp)


def qmatmul(qa: torch.Tensor, a_scale: float, a_zp: int, qb: torch.Tensor, b_scale: float, b_zp: int,
            out_scale: float, out_zp: int, out_dtype: torch.dtype) -> torch.Tensor:
    acc = _wrap_int32(torch.matmul(qa.to(torch.float64) - a_zp, qb.to(torch.float64) - b_zp))
    y = acc.to(F32) * (torch.tensor(a_scale, dtype=F32) * torch.tensor(b_scale, dtype=F32))
    if out_dtype == F32:
        return y
    qmin, qmax = INT_RANGES[out_dtype]
    return quantize(y, out_scale, out_zp, qmin, qmax, out_dtype)


def dynamic_qparams(x: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run-time (scale, zero point) of ``dynamic_qlinear``, as 0-d f32 / i32 tensors."""
    lo = torch.clamp_max(x.min().to(F32), 0.0)
    hi = torch.clamp_min(x.max().to(F32), 0.0)
    scale = (hi - lo) / float(qmax - qmin)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.clamp(torch.round(float(qmin) - lo / scale), qmin, qmax).to(torch.int32)
    return scale, zp


def dynamic_qlinear(x: torch.Tensor, qw: torch.Tensor, w_scales: torch.Tensor, w_zps: torch.Tensor,
                    bias: torch.Tensor | None, qmin: int = 0, qmax: int = 255) -> torch.Tensor:
    scale, zp = dynamic_qparams(x, qmin, qmax)
    qx = torch.clamp(torch.round(x.to(F32) / scale) + zp, qmin, qmax)
    xi = qx.to(torch.float64) - zp.to(torch.float64)
    wi = qw.to(torch.float64) - w_zps.to(torch.float64)[:, None]
    acc = _wrap_int32(torch.matmul(xi, wi.t()))
    y = acc.to(F32) * (scale * w_scales.to(F32))
    return y + bias.to(F32) if bias is not None else y


def wq_linear(x: torch.Tensor, qw: torch.Tensor, w_scales: torch.Tensor, w_zps: torch.Tensor,
              group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    w = dequantize_per_group(qw, w_scales, w_zps, group_size)
    return F.linear(x.to(F32), w, bias)


# -- type inference ---------------------------------------------------------------------------------------

def _bind(fn: Callable, op, args: tuple, kwargs: dict) -> dict:
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as e:
        raise KilnError(f"{op.name}: {e}") from None
    bound.apply_defaults()
    return bound.arguments


def _tensor(op, a: dict, name: str) -> TensorType:
    v = a[name]
    if not isinstance(v, Value) or not isinstance(v.type, TensorType):
        raise KilnError(f"{op.name}: argument '{name}' must be a tensor value, got {v!r}")
    return v.type


def _ints(op, a: dict, name: str, allowed: tuple[torch.dtype, ...]) -> TensorType:
    t = _tensor(op, a, name)
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise KilnError(f"{op.name}: '{name}' must be {names}, got {str(t.dtype).removeprefix('torch.')}")
    return t


def _check_range(op, qmin: int, qmax: int, dtype: torch.dtype) -> None:
    if dtype not in INT_RANGES:
        raise KilnError(f"{op.name}: integer dtype expected, got {dtype}")
    lo, hi = INT_RANGES[dtype]
    if not lo <= qmin < qmax <= hi:
        raise KilnError(f"{op.name}: range [{qmin}, {qmax}] does not fit {dtype}")


def _check_input_quant(op, t: TensorType, name: str, scale: float, zp: int) -> None:
    """An annotated integer input must agree with the parameters the op is given."""
    q = t.quant
    if q is not None and q.scheme == "per_tensor" and (q.scale != (float(scale),) or q.zero_point != (int(zp),)):
        raise KilnError(f"{op.name}: '{name}' is annotated scale={q.scale[0]}, zero_point={q.zero_point[0]} "
                        f"but the op is given scale={scale}, zero_point={zp}")


def _per_tensor(dtype: torch.dtype, qmin: int, qmax: int, scale: float, zp: int) -> QuantParams:
    return QuantParams(qdtype_name(dtype, qmin, qmax), "per_tensor", (float(scale),), (int(zp),))


def _weight_values(v: Value) -> torch.Tensor | None:
    p = v.producer
    if p is not None and p.op is WEIGHT and v.graph is not None:
        return v.graph.weights.get(p.attrs["name"])
    return None


def _vector_params(op, a: dict, scheme: str, dtype, qmin, qmax, axis=None, group_size=None) -> QuantParams:
    scales, zps = _weight_values(a["scales"]), _weight_values(a["zero_points"])
    if scales is None or zps is None:
        raise KilnError(f"{op.name}: scales and zero points must be kiln.weight values with tensors attached")
    return QuantParams(qdtype_name(dtype, qmin, qmax), scheme, tuple(float(s) for s in scales.flatten()),
                       tuple(int(z) for z in zps.flatten()), axis=axis, group_size=group_size)


def _infer_quantize(op, args, kwargs, attrs, subgraph):
    a = _bind(quantize, op, args, kwargs)
    t = _tensor(op, a, "x")
    _check_range(op, a["qmin"], a["qmax"], a["dtype"])
    if not a["scale"] > 0:
        raise KilnError(f"{op.name}: scale must be positive, got {a['scale']}")
    return [TensorType(t.shape, a["dtype"], t.layout,
                       _per_tensor(a["dtype"], a["qmin"], a["qmax"], a["scale"], a["zero_point"]))]


def _infer_dequantize(op, args, kwargs, attrs, subgraph):
    a = _bind(dequantize, op, args, kwargs)
    t = _ints(op, a, "q", tuple(INT_RANGES))
    _check_input_quant(op, t, "q", a["scale"], a["zero_point"])
    return [TensorType(t.shape, F32, t.layout)]


def _check_channels(op, t: TensorType, a: dict, axis: int) -> None:
    for name in ("scales", "zero_points"):
        p = _tensor(op, a, name)
        if p.rank != 1 or p.shape[0] != t.shape[axis]:
            raise KilnError(f"{op.name}: '{name}' must have shape [{t.shape[axis]}] (dim {axis}), got {list(p.shape)}")


def _infer_quantize_per_channel(op, args, kwargs, attrs, subgraph):
    a = _bind(quantize_per_channel, op, args, kwargs)
    t = _tensor(op, a, "x")
    _check_range(op, a["qmin"], a["qmax"], a["dtype"])
    _check_channels(op, t, a, a["axis"])
    quant = _vector_params(op, a, "per_channel", a["dtype"], a["qmin"], a["qmax"], axis=a["axis"])
    return [TensorType(t.shape, a["dtype"], t.layout, quant)]


def _infer_dequantize_per_channel(op, args, kwargs, attrs, subgraph):
    a = _bind(dequantize_per_channel, op, args, kwargs)
    t = _ints(op, a, "q", tuple(INT_RANGES))
    _check_channels(op, t, a, a["axis"])
    return [TensorType(t.shape, F32, t.layout)]


def _check_groups(op, t: TensorType, a: dict) -> None:
    g = a["group_size"]
    k = t.shape[-1]
    if not isinstance(g, int) or g <= 0 or not isinstance(k, int) or k % g:
        raise KilnError(f"{op.name}: group_size {g} must divide the last dim {k}")
    want = [*t.shape[:-1], k // g]
    for name in ("scales", "zero_points"):
        if list(_tensor(op, a, name).shape) != want:
            raise KilnError(f"{op.name}: '{name}' must have shape {want}, got {list(_tensor(op, a, name).shape)}")


def _infer_quantize_per_group(op, args, kwargs, attrs, subgraph):
    a = _bind(quantize_per_group, op, args, kwargs)
    t = _tensor(op, a, "x")
    _check_range(op, a["qmin"], a["qmax"], a["dtype"])
    _check_groups(op, t, a)
    quant = _vector_params(op, a, "per_group", a["dtype"], a["qmin"], a["qmax"], axis=t.rank - 1,
                           group_size=a["group_size"])
    return [TensorType(t.shape, a["dtype"], t.layout, quant)]


def _infer_dequantize_per_group(op, args, kwargs, attrs, subgraph):
    a = _bind(dequantize_per_group, op, args, kwargs)
    t = _ints(op, a, "q", tuple(INT_RANGES))
    _check_groups(op, t, a)
    return [TensorType(t.shape, F32, t.layout)]


def _f32_like(t: TensorType) -> Value:
    return Value(TensorType(t.shape, F32, t.layout), "_infer")


def _out_type(op, a: dict, shape, layout: str) -> TensorType:
    dt = a["out_dtype"]
    if dt == F32:
        return TensorType(shape, F32, layout)
    if dt not in (torch.int8, torch.uint8):
        raise KilnError(f"{op.name}: out_dtype must be f32, i8 or u8, got {dt}")
    lo, hi = INT_RANGES[dt]
    return TensorType(shape, dt, layout, _per_tensor(dt, lo, hi, a["out_scale"], a["out_zp"]))


def _check_weight(op, a: dict, rank: int, x_k, k_dim: int) -> TensorType:
    w = _ints(op, a, "qw", (torch.int8, torch.uint8))
    if w.rank != rank:
        raise KilnError(f"{op.name}: qw must have rank {rank}, got {list(w.shape)}")
    for name in ("w_scales", "w_zps"):
        p = _tensor(op, a, name)
        if p.rank != 1 or p.shape[0] != w.shape[0]:
            raise KilnError(f"{op.name}: '{name}' must have shape [{w.shape[0]}], got {list(p.shape)}")
    if x_k is not None and w.shape[k_dim] != x_k:
        raise KilnError(f"{op.name}: input has {x_k} features but qw {list(w.shape)} expects {w.shape[k_dim]}")
    if a.get("bias") is not None and list(_tensor(op, a, "bias").shape) != [w.shape[0]]:
        raise KilnError(f"{op.name}: bias must have shape [{w.shape[0]}]")
    return w


def _check_other(op, a: dict, out: TensorType) -> None:
    if a["other"] is None:
        return
    o = _ints(op, a, "other", (torch.int8, torch.uint8))
    if list(o.shape) != list(out.shape):
        raise KilnError(f"{op.name}: 'other' must have the output shape {list(out.shape)}, got {list(o.shape)}")
    _check_input_quant(op, o, "other", a["other_scale"], a["other_zp"])


def _infer_qlinear(op, args, kwargs, attrs, subgraph):
    a = _bind(qlinear, op, args, kwargs)
    x = _ints(op, a, "qx", (torch.int8, torch.uint8))
    _check_input_quant(op, x, "qx", a["x_scale"], a["x_zp"])
    w = _check_weight(op, a, 2, x.shape[-1], 1)
    out = _out_type(op, a, (*x.shape[:-1], w.shape[0]), "contiguous")
    _check_other(op, a, out)
    return [out]


def _infer_qconv2d(op, args, kwargs, attrs, subgraph):
    a = _bind(qconv2d, op, args, kwargs)
    x = _ints(op, a, "qx", (torch.int8, torch.uint8))
    _check_input_quant(op, x, "qx", a["x_scale"], a["x_zp"])
    w = _check_weight(op, a, 4, None, 1)
    conv = get_op("aten.convolution").infer(
        (_f32_like(x), _f32_like(w), None, a["stride"], a["padding"], a["dilation"], False, [0, 0], a["groups"]),
        {}, {}, None)[0]
    out = _out_type(op, a, conv.shape, conv.layout)
    _check_other(op, a, out)
    return [out]


def _infer_qmatmul(op, args, kwargs, attrs, subgraph):
    a = _bind(qmatmul, op, args, kwargs)
    ta = _ints(op, a, "qa", (torch.int8, torch.uint8))
    tb = _ints(op, a, "qb", (torch.int8, torch.uint8))
    _check_input_quant(op, ta, "qa", a["a_scale"], a["a_zp"])
    _check_input_quant(op, tb, "qb", a["b_scale"], a["b_zp"])
    mm = get_op("aten.matmul").infer((_f32_like(ta), _f32_like(tb)), {}, {}, None)[0]
    return [_out_type(op, a, mm.shape, mm.layout)]


def _infer_dynamic_qlinear(op, args, kwargs, attrs, subgraph):
    a = _bind(dynamic_qlinear, op, args, kwargs)
    x = _tensor(op, a, "x")
    w = _check_weight(op, a, 2, x.shape[-1], 1)
    _check_range(op, a["qmin"], a["qmax"], torch.uint8 if a["qmin"] >= 0 else torch.int8)
    return [TensorType((*x.shape[:-1], w.shape[0]), F32)]


def _infer_wq_linear(op, args, kwargs, attrs, subgraph):
    a = _bind(wq_linear, op, args, kwargs)
    x = _tensor(op, a, "x")
    w = _ints(op, a, "qw", (torch.int8, torch.uint8))
    if w.rank != 2 or w.shape[1] != x.shape[-1]:
        raise KilnError(f"{op.name}: qw {list(w.shape)} does not take {x.shape[-1]} input features")
    _check_groups(op, w, {"group_size": a["group_size"], "scales": a["w_scales"], "zero_points": a["w_zps"]})
    if a["bias"] is not None and list(_tensor(op, a, "bias").shape) != [w.shape[0]]:
        raise KilnError(f"{op.name}: bias must have shape [{w.shape[0]}]")
    return [TensorType((*x.shape[:-1], w.shape[0]), F32)]


def _register(name: str, target: Callable, infer: Callable, doc: str):
    return register_kiln_op(name, infer=infer, target=target, doc=doc)


QUANTIZE = _register("quantize", quantize, _infer_quantize,
                     "kiln.quantize(x, scale, zero_point, qmin, qmax, dtype): per-tensor affine quantization")
DEQUANTIZE = _register("dequantize", dequantize, _infer_dequantize,
                       "kiln.dequantize(q, scale, zero_point) -> f32")
QUANTIZE_PER_CHANNEL = _register("quantize_per_channel", quantize_per_channel, _infer_quantize_per_channel,
                                 "kiln.quantize_per_channel(x, scales, zero_points, axis, qmin, qmax, dtype)")
DEQUANTIZE_PER_CHANNEL = _register("dequantize_per_channel", dequantize_per_channel,
                                   _infer_dequantize_per_channel,
                                   "kiln.dequantize_per_channel(q, scales, zero_points, axis) -> f32")
QUANTIZE_PER_GROUP = _register("quantize_per_group", quantize_per_group, _infer_quantize_per_group,
                               "kiln.quantize_per_group(x, scales, zero_points, group_size, qmin, qmax, dtype)")
DEQUANTIZE_PER_GROUP = _register("dequantize_per_group", dequantize_per_group, _infer_dequantize_per_group,
                                 "kiln.dequantize_per_group(q, scales, zero_points, group_size) -> f32")
QLINEAR = _register("qlinear", qlinear, _infer_qlinear,
                    "kiln.qlinear(qx, x_scale, x_zp, qw, w_scales, w_zps, bias, out_scale, out_zp, out_dtype, "
                    "post_op, other, other_scale, other_zp): int8 x int8 -> int32 linear, requantized")
QCONV2D = _register("qconv2d", qconv2d, _infer_qconv2d,
                    "kiln.qconv2d(qx, x_scale, x_zp, qw, w_scales, w_zps, bias, stride, padding, dilation, "
                    "groups, out_scale, out_zp, out_dtype, post_op, other, other_scale, other_zp)")
QMATMUL = _register("qmatmul", qmatmul, _infer_qmatmul,
                    "kiln.qmatmul(qa, a_scale, a_zp, qb, b_scale, b_zp, out_scale, out_zp, out_dtype)")
DYNAMIC_QLINEAR = _register("dynamic_qlinear", dynamic_qlinear, _infer_dynamic_qlinear,
                            "kiln.dynamic_qlinear(x, qw, w_scales, w_zps, bias, qmin, qmax): run-time "
                            "activation quantization, int32 accumulation, f32 output")
WQ_LINEAR = _register("wq_linear", wq_linear, _infer_wq_linear,
                      "kiln.wq_linear(x, qw, w_scales, w_zps, group_size, bias): weight-only quantized linear")

QUANT_OPS = (QUANTIZE, DEQUANTIZE, QUANTIZE_PER_CHANNEL, DEQUANTIZE_PER_CHANNEL, QUANTIZE_PER_GROUP,
             DEQUANTIZE_PER_GROUP, QLINEAR, QCONV2D, QMATMUL, DYNAMIC_QLINEAR, WQ_LINEAR)
