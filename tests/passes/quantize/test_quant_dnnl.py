"""oneDNN's int8 convolution through its C API (``kiln.passes.quantize.dnnl``): each layer matches kiln.qconv2d's
reference within one quantization step (integer outputs) or 1e-5 of the output's magnitude (float outputs),
bad inputs raise kiln errors, and the lowering offers it as the ``dnnl`` candidate, whose packed weight
rebuilds from its recipe."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import KilnInputError
from kiln.ir import quant_ops
from kiln.passes.quantize import dnnl

pytestmark = pytest.mark.skipif(dnnl.available() is not None, reason=f"oneDNN: {dnnl.available()}")

CL = torch.channels_last


def _case(seed, n=2, c=8, h=9, w=9, o=16, k=3, stride=1, padding=1, dilation=1, groups=1, bias=True,
          x_dtype=torch.uint8, out_dtype=torch.uint8, post_op="none", other=False):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (0, 256) if x_dtype == torch.uint8 else (-128, 128)
    qx = torch.randint(lo, hi, (n, c, h, w), generator=g, dtype=torch.int32).to(x_dtype)
    qw = torch.randint(-127, 128, (o, c // groups, k, k), generator=g, dtype=torch.int32).to(torch.int8)
    w_scales = torch.rand(o, generator=g) * 0.01 + 0.001
    b = torch.randn(o, generator=g) if bias else None
    x_zp = 7 if x_dtype == torch.uint8 else -3
    out_zp = 5 if out_dtype == torch.uint8 else (-4 if out_dtype == torch.int8 else 0)
    spec = dnnl.QConvSpec(input_shape=tuple(qx.shape), out_channels=o, kernel=(k, k), stride=(stride, stride),
                          padding=(padding, padding), dilation=(dilation, dilation), groups=groups, x_scale=0.05,
                          x_zp=x_zp, x_dtype=str(x_dtype).removeprefix("torch."), w_scales=tuple(w_scales.tolist()),
                          bias=bias, out_dtype=str(out_dtype).removeprefix("torch."), out_scale=0.5, out_zp=out_zp,
                          post_op=post_op, other=(0.25, 3) if other else None)
    acc = None
    if other:
        lo, hi = quant_ops.INT_RANGES[out_dtype]
        acc = torch.randint(lo, hi + 1, spec.output_shape, generator=g, dtype=torch.int32).to(out_dtype)
    ref = quant_ops.qconv2d(qx, 0.05, x_zp, qw, w_scales, torch.zeros(o, dtype=torch.int64), b, [stride] * 2,
                            [padding] * 2, [dilation] * 2, groups, 0.5, out_zp, out_dtype, post_op,
                            acc, 0.25, 3)
    return spec, qx.contiguous(memory_format=CL), qw, b, acc, ref


def _check(got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape and got.is_contiguous(memory_format=CL)
    if ref.is_floating_point():
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    else:
        assert int((got.to(torch.int32) - ref.to(torch.int32)).abs().max()) <= 1


@pytest.mark.parametrize("kwargs", [
    {},
    {"post_op": "relu"},
    {"out_dtype": torch.float32},
    {"out_dtype": torch.int8, "x_dtype": torch.int8},
    {"bias": False, "stride": 2, "padding": 0, "k": 1},
    {"groups": 8, "o": 8, "post_op": "relu"},  # depthwise
    {"dilation": 2, "padding": 2},
    {"other": True, "post_op": "relu"},  # a residual accumulated in place, then relu
])
def test_layer_matches_the_reference(kwargs):
    spec, qx, qw, b, acc, ref = _case(0, **kwargs)
    layer = dnnl.QConv(spec, qw, b)
    got = layer(qx, None if acc is None else acc.contiguous(memory_format=CL))
    _check(got, ref)
    assert layer.impl  # oneDNN names the implementation it chose


def test_layer_runs_again_on_new_inputs():
    spec, qx, qw, b, _, _ = _case(1)
    layer = dnnl.QConv(spec, qw, b)
    for seed in (2, 3):
        _, qx2, _, _, _, _ = _case(seed)
        ref = quant_ops.qconv2d(qx2, spec.x_scale, spec.x_zp, qw, torch.tensor(spec.w_scales),
                                torch.zeros(16, dtype=torch.int64), b, [1, 1], [1, 1], [1, 1], 1, spec.out_scale,
                                spec.out_zp, torch.uint8)
        _check(layer(qx2), ref)


def test_any_batch_layer_builds_one_primitive_per_batch_size():
    spec, _, qw, b, _, _ = _case(5, post_op="relu")
    layer = dnnl.QConv(dnnl.QConvSpec(**{**vars(spec), "input_shape": (None, *spec.input_shape[1:])}), qw, b)
    for n in (3, 1, 3):
        _, qx, _, _, _, _ = _case(6 + n, n=n)
        ref = quant_ops.qconv2d(qx, spec.x_scale, spec.x_zp, qw, torch.tensor(spec.w_scales),
                                torch.zeros(16, dtype=torch.int64), b, [1, 1], [1, 1], [1, 1], 1, spec.out_scale,
                                spec.out_zp, torch.uint8, "relu")
        _check(layer(qx), ref)
    assert sorted(layer._by_batch) == [1, 3]
    fixed = dnnl.QConv(spec, qw, b)
    with pytest.raises(KilnInputError, match="input must be"):
        fixed(_case(7, n=3)[1])


def test_bad_inputs_raise_kiln_errors():
    spec, qx, qw, b, _, _ = _case(0)
    layer = dnnl.QConv(spec, qw, b)
    with pytest.raises(KilnInputError, match="channels-last"):
        layer(qx.contiguous())
    with pytest.raises(KilnInputError, match="input must be"):
        layer(qx.to(torch.int8).contiguous(memory_format=CL))
    with pytest.raises(KilnInputError, match="weight must be int8"):
        dnnl.QConv(spec, qw.to(torch.int32), b)


def test_packed_weight_rebuilds_from_its_recipe():
    from kiln.passes.quantize.lower import dnnl_qconv, dnnl_qconv_pack

    spec, qx, qw, b, _, ref = _case(4, post_op="relu")
    as_dict = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(spec).items()}
    packed = dnnl_qconv_pack(as_dict, [qw, b])
    loader, saved, sources = packed.kiln_recipe
    again = loader(saved, sources)
    args = (spec.out_channels, list(spec.kernel), list(spec.stride), list(spec.padding), list(spec.dilation),
            torch.uint8, spec.out_scale, spec.out_zp)
    first = dnnl_qconv(qx, packed, None, *args)
    _check(first, ref)
    assert torch.equal(dnnl_qconv(qx.contiguous(), again, None, *args), first)  # NCHW input: made channels-last


def test_lowering_offers_and_checks_the_dnnl_candidate():
    from examples.models import REGISTRY
    from kiln.frontend.export import from_export
    from kiln.passes.quantize import quantize_graph
    from kiln.passes.quantize.lower import lower_graph

    model, inputs = REGISTRY["resnet18"](size="small", seed=0)
    graph = from_export(model.eval(), inputs)
    quantize_graph(graph, "int8", [inputs])
    report = lower_graph(graph, inputs, rounds=1, reps=1)
    convs = [r for r in report.rows if r["op"] == "kiln.qconv2d"]
    assert convs and all(isinstance(r["candidates"]["dnnl"], float) for r in convs), convs[0]["candidates"]
