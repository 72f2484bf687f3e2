"""``kiln.compile(..., quantize=...)``: the quantize pass runs before the pipeline, the compiled model runs the
lowered integer kernels, and it matches the quantized graph's exact reference semantics."""

from __future__ import annotations

import pytest
import torch

import kiln
from examples.models import REGISTRY
from kiln.errors import KilnInputError, UnsupportedError
from kiln.numerics import assert_match
from kiln.options import CompileOptions
from kiln.passes.manager import run_reference


def _quantized(name: str, scheme: str, pipeline: str = "O1"):
    model, inputs = REGISTRY[name](size="small", seed=0)
    cm = kiln.compile(model, inputs, pipeline=pipeline, quantize=scheme)
    with torch.no_grad():
        return model, inputs, cm, cm(*inputs), model(*inputs)


@pytest.mark.parametrize("name, scheme, pipeline, ops", [
    ("mlp", "int8-dynamic", "O1", {"kiln.dynamic_qlinear"}),
    ("mlp", "int4-weight", "O2", {"kiln.wq_linear"}),
    ("resnet18", "int8", "O1", {"kiln.qconv2d", "kiln.qlinear"}),
    ("transformer", "int8", "O2", {"kiln.qlinear"}),
])
def test_compile_quantized_matches_its_reference_graph(name, scheme, pipeline, ops):
    _, inputs, cm, out, eager = _quantized(name, scheme, pipeline)
    assert cm.pass_records[0].name == "quantize" and cm.pass_records[0].changed
    assert ops <= {n.op.name for n in cm.graph.nodes}  # the compiled model's graph keeps the exact ops
    lowering = cm.compiled.quant_lowering
    assert lowering is not None and lowering.rows  # ... and runs lowered kernels
    reference = run_reference(cm.graph, inputs)[0]
    out = out if isinstance(out, torch.Tensor) else out[0]
    assert_match(out, reference, magnitude=10 * float(reference.abs().max()))
    eager = eager if isinstance(eager, torch.Tensor) else eager[0]
    # quantization error is real but bounded: under 10% of the output's range on these random nets
    assert 0 < float((out - eager).abs().max()) < 0.1 * float(eager.abs().max())


def test_mixed_uses_the_int8_byte_budget():
    from kiln.options import MIXED_BUDGET

    _, _, cm, _, _ = _quantized("mlp", "mixed")
    stats = cm.pass_records[0].stats
    assert stats["cost"] <= stats["budget"] == int(MIXED_BUDGET * stats["float32_cost"])


def test_static_int8_needs_calibration_inputs():
    from kiln.api import optimize
    from kiln.frontend.export import from_export

    model, inputs = REGISTRY["mlp"](size="small", seed=0)
    graph = from_export(model, inputs)
    with pytest.raises(KilnInputError, match="int8-dynamic or int4-weight"):
        optimize(graph, CompileOptions(quantize="int8"))


def test_tune_trials_only_for_the_tvm_target():
    with pytest.raises(UnsupportedError, match="applies to the tvm target"):
        CompileOptions.from_dict({"tune_trials": 4})
    assert CompileOptions(tune_trials=4, backend_options={"gemm": "auto"}).backend_config() == \
        {"gemm": "auto", "tune_trials": 4}
