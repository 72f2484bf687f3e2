"""Weight-only int4: per-group weights, AWQ's scale search (never worse than round-to-nearest on its
calibration rows), folding 1/s into a LayerNorm, and a zoo GPT that still predicts what it did."""

from __future__ import annotations

import pytest
import torch

from examples.models import gpt
from kiln.errors import KilnInputError
from kiln.frontend.export import from_export
from kiln.ir import quant_ops as Q
from kiln.ir.clone import clone_graph
from kiln.ir.graph import Value
from kiln.ir.ops import aten
from kiln.ir.to_fx import to_fx
from kiln.ir.verifier import verify
from kiln.passes.quantize import quantize_graph
from kiln.passes.quantize.int4 import WeightOnlyConfig, awq_search
from kiln.passes.quantize.lower import lower_graph
from kiln.passes.quantize.weights import quantize_per_group


def test_per_group_weights_by_hand():
    w = torch.tensor([[0.0, 1.5, 3.0, -1.5] * 8 + [1.0] * 32])  # two groups of 32
    qw = quantize_per_group(w, 32)
    assert qw.q.dtype == torch.uint8 and int(qw.q.max()) <= 15 and qw.bits == 4
    # group 0: range [-1.5, 3] -> scale 0.3, zero point 5; group 1: [0, 1] -> scale 1/15, zero point 0
    assert torch.allclose(qw.scales, torch.tensor([[0.3, 1 / 15]]))
    assert qw.zero_points.tolist() == [[5, 0]]
    assert torch.allclose(qw.dequantize(), w, atol=1e-6)  # these values sit on the grid
    assert qw.quant_params().scheme == "per_group" and qw.quant_params().group_size == 32


def test_awq_is_never_worse_than_round_to_nearest_on_its_rows():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen) * 0.05
    # activations with a few large channels: the case AWQ is for
    x = torch.randn(512, 128, generator=gen) * torch.where(torch.arange(128) < 4, 20.0, 1.0)
    cfg = WeightOnlyConfig(group_size=32)
    alpha, s = awq_search(w, x, cfg)

    def err(scale):
        q = quantize_per_group(w * scale[None, :], 32).dequantize()
        return float(((x / scale[None, :]) @ q.t() - x @ w.t()).pow(2).mean())

    assert err(s) <= err(torch.ones(128))
    assert alpha > 0 and err(s) < 0.9 * err(torch.ones(128))


@pytest.mark.slow
def test_gpt_int4_weight_only_predicts_like_fp32():
    model, (tokens,) = gpt.make_gpt("small")
    g = from_export(model, (tokens,))
    calib = [(torch.randint(0, 64, tokens.shape, generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    res = quantize_graph(g, "int4-weight", calib, group_size=32)
    verify(g)
    assert len(res.stats["quantized_layers"]) == 9 and not res.stats["float_layers"]
    assert len(g.find(Q.WQ_LINEAR)) == 9 and not g.find(aten.addmm) and not g.find(aten.mm)
    assert set(res.stats["awq_alpha"]) == set(res.stats["quantized_layers"])
    qweights = [n for n in g.nodes if n.op.name == "kiln.weight" and n.output.type.quant is not None]
    assert len(qweights) == 9 and all(n.output.type.quant.qdtype == "uint4" for n in qweights)
    with torch.no_grad():
        ref = model(tokens)
        out = to_fx(g)(tokens)[0]
    assert float((out - ref).norm() / ref.norm()) < 0.1
    # lowered onto PyTorch's int4 kernel, the graph computes what its reference computes
    reference = to_fx(clone_graph(g))
    report = lower_graph(g, (tokens,), rounds=2, reps=1)
    assert {r["op"] for r in report.rows} == {"kiln.wq_linear"}
    with torch.no_grad():
        a, b = to_fx(g)(tokens)[0], reference(tokens)[0]
    assert (a - b).abs().max() <= 1e-3 * b.abs().max() + 1e-6


def test_awq_scales_fold_into_a_layer_norm_that_feeds_only_the_layer():
    model, (tokens,) = gpt.make_gpt("small")
    g = from_export(model, (tokens,))
    calib = [(tokens,)]
    quantize_graph(g, "int4-weight", calib, group_size=32)
    lns = g.find(aten.native_layer_norm)
    folded = [n for n in lns if "awq" in n.args[2].producer.attrs["name"]]
    muls = [n for n in g.nodes if n.is_a(aten.mul.Tensor) and isinstance(n.args[1], Value)
            and n.args[1].producer is not None and "awq_inv_scale" in n.args[1].producer.attrs.get("name", "")]
    assert folded or muls  # the searched scales went somewhere: into a LayerNorm or an explicit multiply
    for ln in folded:  # qkv and mlp.0 read LayerNorm outputs through views only
        assert ln.results[0].users[0].is_a(aten.view) or ln.results[0].users[0].op is Q.WQ_LINEAR


def test_layers_that_do_not_divide_stay_float():
    model, (tokens,) = gpt.make_gpt("small")
    g = from_export(model, (tokens,))
    res = quantize_graph(g, "int4-weight", None, group_size=256, awq=False)  # d_model 32: nothing divides
    assert res.stats["quantized_layers"] == [] and len(res.stats["float_layers"]) == 9


def _small_gpt_with_calib():
    model, (tokens,) = gpt.make_gpt("small")
    calib = [(torch.randint(0, 64, tokens.shape, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    return model, tokens, calib


def test_gptq_rounding_is_on_by_default_and_keeps_the_grid_of_the_search():
    model, tokens, calib = _small_gpt_with_calib()
    g_gptq, g_rtn = from_export(model, (tokens,)), from_export(model, (tokens,))
    on = quantize_graph(g_gptq, "int4-weight", calib, group_size=32)
    off = quantize_graph(g_rtn, "int4-weight", calib, group_size=32, gptq=False)
    assert on.stats["gptq_layers"] and off.stats["gptq_layers"] == []
    assert on.stats["weight_bytes"] == off.stats["weight_bytes"]  # same format, only the roundings differ
    ints = [[g.weights[n.attrs["name"]] for n in g.nodes if n.op.name == "kiln.weight"
             and n.output.type.quant is not None] for g in (g_gptq, g_rtn)]
    assert len(ints[0]) == len(ints[1]) == 9
    assert any(not torch.equal(a, b) for a, b in zip(*ints))
    # without calibration there is nothing to compensate with: plain round-to-nearest
    g = from_export(model, (tokens,))
    res = quantize_graph(g, "int4-weight", None, group_size=32, awq=False)
    assert res.stats["gptq_layers"] == [] and len(res.stats["quantized_layers"]) == 9


def test_named_layers_stay_int8_per_channel():
    model, tokens, calib = _small_gpt_with_calib()
    g = from_export(model, (tokens,))
    pure = quantize_graph(from_export(model, (tokens,)), "int4-weight", calib, group_size=32)
    res = quantize_graph(g, "int4-weight", calib, group_size=32, keep_int8=["lm_head", "blocks.0.mlp.2"])
    verify(g)
    assert sorted(res.stats["int8_layers"]) == ["blocks.0.mlp.2", "lm_head"]
    assert "lm_head" not in res.stats["awq_alpha"] and len(res.stats["quantized_layers"]) == 9
    qdtypes = sorted(n.output.type.quant.qdtype for n in g.nodes
                     if n.op.name == "kiln.weight" and n.output.type.quant is not None)
    assert qdtypes == ["int8"] * 2 + ["uint4"] * 7
    int8_linears = [n for n in g.find(Q.WQ_LINEAR) if n.args[1].type.quant.qdtype == "int8"]
    assert len(int8_linears) == 2 and all(n.args[4] == n.args[1].type.shape[1] for n in int8_linears)  # per row
    assert pure.stats["weight_bytes"] < res.stats["weight_bytes"] < res.stats["float32_weight_bytes"]
    with torch.no_grad():
        ref = model(tokens)
        out = to_fx(g)(tokens)[0]
    assert float((out - ref).norm() / ref.norm()) < 0.1
    # the int8 layers lower onto PyTorch's int8 weight-only kernel and compute what the reference does
    reference = to_fx(clone_graph(g))
    report = lower_graph(g, (tokens,), rounds=1, reps=1)
    int8pack = [r["candidates"].get("int8pack") for r in report.rows]
    assert sum(isinstance(t, float) for t in int8pack) == 2  # measured (correct) on exactly the int8 layers
    with torch.no_grad():
        a, b = to_fx(g)(tokens)[0], reference(tokens)[0]
    assert (a - b).abs().max() <= 1e-3 * b.abs().max() + 1e-6


def test_keep_int8_by_count_takes_the_most_sensitive_layers():
    model, tokens, calib = _small_gpt_with_calib()
    g = from_export(model, (tokens,))
    res = quantize_graph(g, "int4-weight", calib, group_size=32, keep_int8=2)
    sens = res.stats["int4_sensitivity"]
    assert len(sens) == 9 and all(v >= 0 for v in sens.values())
    assert set(res.stats["int8_layers"]) == set(sorted(sens, key=sens.get, reverse=True)[:2])


def test_keep_int8_bad_input():
    model, tokens, calib = _small_gpt_with_calib()
    with pytest.raises(KilnInputError, match="not linear layers"):
        quantize_graph(from_export(model, (tokens,)), "int4-weight", calib, keep_int8=["no.such.layer"])
    with pytest.raises(KilnInputError, match="calibration"):
        quantize_graph(from_export(model, (tokens,)), "int4-weight", None, awq=False, keep_int8=3)
    with pytest.raises(KilnInputError, match="number of layers"):
        quantize_graph(from_export(model, (tokens,)), "int4-weight", calib, keep_int8="lm_head")


def test_gptq_is_skipped_on_too_few_rows():
    model, tokens, calib = _small_gpt_with_calib()  # 2x16 tokens per batch: 32 rows for the 128-wide mlp.2
    g = from_export(model, (tokens,))
    res = quantize_graph(g, "int4-weight", calib[:1], group_size=32)
    assert set(res.stats["gptq_skipped"]) == {"blocks.0.mlp.2", "blocks.1.mlp.2"}
    assert "32 rows for 128 input features" in res.stats["gptq_skipped"]["blocks.0.mlp.2"]
    assert set(res.stats["gptq_layers"]) == set(res.stats["quantized_layers"]) - set(res.stats["gptq_skipped"])
