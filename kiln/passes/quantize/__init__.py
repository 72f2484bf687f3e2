"""Quantization of kiln graphs: one entry point, ``quantize_graph``, and the ``quantize`` pass.

``quantize_graph(graph, scheme, calib_inputs, **options) -> QuantizeResult`` rewrites ``graph`` in place
(a graph from ``kiln.frontend.export.from_export``, eval mode) into kiln's quantized ops
(``kiln.ir.quant_ops``), with ``QuantParams`` on the integer types:

=================  =====================================================================================
scheme             what it does
=================  =====================================================================================
``int8``           static: weights per-channel symmetric int8, activations per-tensor uint8 from
                   calibration (``observer``: minmax, moving_average, percentile, mse, entropy);
                   conv/linear fuse ReLU and residual adds (``ptq``)
``int8-dynamic``   linear layers quantize their activations at run time (``ptq``)
``int4-weight``    linear layers get per-group (``group_size``) uint4 weights; with calibration data, AWQ
                   scale + clipping search (``awq``) and GPTQ rounding (``gptq``); ``keep_int8``: a number
                   of the most int4-sensitive layers (measured), or layer names, kept in per-channel int8
                   (default 0: all int4) (``int4``)
``bf16``/``fp16``  conv/linear run in that float type (``cast``)
``mixed``          per-layer precision among ``precisions`` chosen under ``budget`` (bytes, or a fraction of
                   the float32 cost) on the Pareto frontier of cost (``cost``: size or measured latency) vs
                   summed sensitivity (``mixed``)
=================  =====================================================================================

``calib_inputs``: an input tuple, a list of them, or ``"zeroq"`` for data-free calibration that matches
BatchNorm statistics (``zeroq``). Eval-mode BatchNorms are folded into their convolutions first.
``lower=True`` then puts the quantized ops on the fastest measured integer kernels of this machine
(``lower.lower_graph``, measured on ``example_inputs`` or the first calibration batch); the report is
``result.lowering``. The reference semantics of the quantized graph (before lowering) are exact: run it
with ``kiln.ir.to_fx.to_fx``.

The ``quantize`` pass (``kiln.passes.base.get_pass("quantize", scheme="int8")``) calls the same function
with calibration inputs from ``ctx.options["calib_inputs"]`` or else ``ctx.example_inputs``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch

import kiln.ir.quant_ops  # noqa: F401  (registers the kiln.* quantized ops)
from kiln.errors import KilnInputError
from kiln.ir.graph import Graph
from kiln.passes.base import Pass, PassContext, PassResult, register_pass
from kiln.passes.quantize.calibrate import as_batches
from kiln.passes.quantize.lower import LoweringReport, lower_graph
from kiln.passes.quantize.prepare import fold_batchnorm

SCHEMES = ("int8", "int8-dynamic", "int4-weight", "mixed", "bf16", "fp16")


@dataclass
class QuantizeResult:
    scheme: str
    stats: dict = field(default_factory=dict)
    lowering: LoweringReport | None = None


def _needs_calibration(scheme: str, awq: bool, keep_int8=0) -> bool:
    return scheme in ("int8", "mixed") or (scheme == "int4-weight" and (awq or _is_count(keep_int8)))


def _is_count(keep_int8) -> bool:
    return isinstance(keep_int8, int) and not isinstance(keep_int8, bool) and keep_int8 > 0


def quantize_graph(graph: Graph, scheme: str = "int8", calib_inputs: Any = None, *, observer: str = "minmax",
                   weight_observer: str = "minmax", group_size: int = 32, awq: bool = True,
                   budget: float | None = None, cost: str = "size", precisions: tuple = ("int8", "int4"),
                   metric: str = "kl", zeroq_steps: int = 200, lower: bool = False,
                   example_inputs: tuple | None = None, gptq: bool = True,
                   keep_int8: int | Collection[str] = 0) -> QuantizeResult:
    from kiln.passes.quantize import cast, int4, ptq, zeroq

    if scheme not in SCHEMES:
        raise KilnInputError(f"unknown quantization scheme {scheme!r}; schemes: {', '.join(SCHEMES)}")
    result = QuantizeResult(scheme)
    batches = None
    if isinstance(calib_inputs, str):
        if calib_inputs != "zeroq":
            raise KilnInputError(f"calib_inputs must be input tensors or 'zeroq', got {calib_inputs!r}")
        batches = zeroq.synthesize(graph, steps=zeroq_steps)
        result.stats["calibration"] = "zeroq"
    elif calib_inputs is not None:
        batches = as_batches(calib_inputs)
        result.stats["calibration"] = f"{len(batches)} batch(es)"
    elif _needs_calibration(scheme, awq, keep_int8):
        raise KilnInputError(f"scheme {scheme!r} needs calibration inputs (a tuple of tensors, a list of them, "
                             "or 'zeroq')")
    result.stats["batchnorms_folded"] = fold_batchnorm(graph)
    if scheme == "int8":
        config = ptq.PTQConfig(observer, weight_observer=weight_observer)
        result.stats.update(ptq.quantize_static(graph, batches, config))
    elif scheme == "int8-dynamic":
        result.stats.update(ptq.quantize_dynamic(graph, ptq.PTQConfig(weight_observer=weight_observer)))
    elif scheme == "int4-weight":
        int8_layers, sensitivity = int4.choose_int8_layers(graph, batches, keep_int8, group_size)
        config = int4.WeightOnlyConfig(group_size, awq=awq, gptq=gptq, int8_layers=int8_layers)
        result.stats.update(int4.quantize_weight_only(graph, batches, config))
        if sensitivity:
            result.stats["int4_sensitivity"] = sensitivity
    elif scheme in ("bf16", "fp16"):
        result.stats.update(cast.cast_layers(graph, torch.bfloat16 if scheme == "bf16" else torch.float16))
    else:
        result.stats.update(_quantize_mixed(graph, batches, budget, cost, precisions, metric, group_size, observer))
    if lower:
        inputs = example_inputs if example_inputs is not None else (batches[0] if batches else None)
        result.lowering = lower_graph(graph, inputs)
    return result


def _quantize_mixed(graph: Graph, batches: list[tuple], budget, cost: str, precisions: tuple, metric: str,
                    group_size: int, observer: str) -> dict:
    from kiln.passes.quantize import mixed

    options = ("fp32", *[p for p in precisions if p != "fp32"])
    sens = mixed.layer_sensitivity(graph, batches, options, metric, group_size)
    costs = mixed.layer_costs(graph, options, cost, group_size, batches)
    full = sum(c["fp32"] for c in costs.values())
    if budget is None:
        raise KilnInputError("scheme 'mixed' needs a budget (bytes or latency, or a fraction of the float32 cost)")
    cap = int(budget * full) if isinstance(budget, float) and budget <= 1.0 else int(budget)
    choice = mixed.choose_under_budget(sens, costs, cap)
    frontier = mixed.pareto_frontier(sens, costs)
    stats: dict = {"scheme": "mixed", "budget": cap, "float32_cost": full, "cost": choice.cost,
                   "sensitivity": choice.sensitivity, "assignment": dict(choice.assignment),
                   "frontier": [(p.cost, p.sensitivity) for p in frontier], "layer_sensitivity": sens,
                   "quantized_layers": [], "float_layers": []}
    for p in ("int8", "int4", "bf16", "fp16"):  # int8 first: it calibrates on the float graph
        layers = choice.layers_at(p)
        if layers:
            done = mixed.apply_precision(graph, batches, p, layers, group_size, observer)
            stats["quantized_layers"] += done.get("quantized_layers", [])
            stats["float_layers"] += done.get("float_layers", [])
    return stats


@register_pass("quantize")
@dataclass(frozen=True)
class QuantizePass(Pass):
    """``quantize_graph`` as a pass; calibration data from the pass context."""

    scheme: str = "int8"
    observer: str = "minmax"
    group_size: int = 32
    awq: bool = True
    budget: float | None = None
    calibration: str = "inputs"  # "inputs" | "zeroq"
    lower: bool = False
    gptq: bool = True
    keep_int8: int = 0

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        calib = "zeroq" if self.calibration == "zeroq" else ctx.options.get("calib_inputs", ctx.example_inputs)
        res = quantize_graph(graph, self.scheme, calib, observer=self.observer, group_size=self.group_size,
                             awq=self.awq, budget=self.budget, lower=self.lower,
                             example_inputs=ctx.example_inputs, gptq=self.gptq, keep_int8=self.keep_int8)
        stats = dict(res.stats)
        if res.lowering is not None:
            stats["kernels"] = res.lowering.paths()
        return PassResult(changed=bool(stats.get("quantized_layers")), stats=stats)


__all__ = ["QuantizePass", "QuantizeResult", "SCHEMES", "quantize_graph"]
