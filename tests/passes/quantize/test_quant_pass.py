"""The ``quantize`` pass: registered by name, options validated, calibration from the pass context, and
runnable from a pipeline with the verifier after it; casting schemes keep results close."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import KilnInputError
from kiln.frontend.export import from_export
from kiln.ir.to_fx import to_fx
from kiln.passes.base import PassContext, get_pass
from kiln.passes.manager import PassManager, VerifyInstrument
from kiln.passes.quantize import quantize_graph


def _mlp():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    x = torch.randn(8, 16)
    return m, x


def test_pass_takes_calibration_from_the_context():
    m, x = _mlp()
    g = from_export(m, (x,))
    result = get_pass("quantize", scheme="int8", observer="minmax").run(g, PassContext(example_inputs=(x,)))
    assert result.changed and result.stats["quantized_layers"] == ["0", "2"]
    with torch.no_grad():
        ref = m(x)
    assert (to_fx(g)(x)[0] - ref).abs().max() < 0.05 * ref.abs().max()


def test_pass_in_a_pipeline_with_the_verifier_and_lowering():
    m, x = _mlp()
    g = from_export(m, (x,))
    ctx = PassContext(options={"calib_inputs": [(x,)]}, example_inputs=(x,))
    pm = PassManager([get_pass("quantize", scheme="int8", lower=True)], [VerifyInstrument()])
    records = pm.run(g, ctx)
    assert records[-1].stats["kernels"]  # which kernel each quantized op went to
    assert not any(n.op.name.startswith("kiln.q") for n in g.nodes)


def test_unknown_option_is_an_input_error():
    with pytest.raises(KilnInputError, match="has no option"):
        get_pass("quantize", bits=3)


@pytest.mark.parametrize("scheme,tol", [("bf16", 0.05), ("fp16", 0.01)])
def test_casting_schemes(scheme, tol):
    m, x = _mlp()
    g = from_export(m, (x,))
    res = quantize_graph(g, scheme)
    assert res.stats["quantized_layers"] == ["0", "2"]
    dtype = torch.bfloat16 if scheme == "bf16" else torch.float16
    assert any(n.op.name == "kiln.weight" and n.output.type.dtype == dtype for n in g.nodes)
    with torch.no_grad():
        ref = m(x)
        out = to_fx(g)(x)[0]
    assert out.dtype == torch.float32 and (out - ref).abs().max() < tol * ref.abs().max()


def test_bf16_where_faster_follows_its_own_measurements():
    from kiln.passes.quantize.cast import cast_where_faster

    m, x = _mlp()
    g = from_export(m, (x,))
    stats = cast_where_faster(g, torch.bfloat16, (x,), reps=3)
    times = stats["timings_us"]
    assert set(times) == {"0", "2"} and all(set(t) == {"fp32", "bf16"} and min(t.values()) > 0 for t in times.values())
    faster = sorted(k for k, t in times.items() if t["bf16"] < t["fp32"])
    assert stats["quantized_layers"] == faster
    with torch.no_grad():
        ref = m(x)
    assert (to_fx(g)(x)[0] - ref).abs().max() < 0.05 * ref.abs().max()


def test_latency_costs_are_measured_per_layer_and_precision():
    from kiln.passes.quantize.mixed import layer_costs

    m, x = _mlp()
    g = from_export(m, (x,))
    costs = layer_costs(g, ("fp32", "int8", "int4"), cost="latency", batches=[(x,)])
    assert set(costs) == {"0", "2"}
    assert set(costs["0"]) == {"fp32", "int8"}  # 16 input features: no group of 32 for int4
    assert all(v > 0 for c in costs.values() for v in c.values())
