"""Mixed precision: per-layer sensitivity, the Pareto frontier of cost vs accuracy proxy, a budgeted choice.

Contract:
- Precisions: ``fp32`` (unchanged), ``bf16``/``fp16`` (weights and compute cast), ``int8`` (static w8a8),
  ``int4`` (weight-only, per group; linear layers only).
- ``layer_sensitivity(graph, batches, precisions) -> {layer: {precision: float}}``: quantize one layer
  at a time (all others float), run the calibration batches through the reference and compare with the
  float graph's outputs: ``kl`` (mean KL divergence of the softmax of the last dim, ZeroQ's choice for
  classifiers) or ``mse`` (mean squared error over the mean square of the float output). ``fp32`` is 0.
- ``layer_costs(graph, precisions, cost="size") -> {layer: {precision: int}}``: bytes of the layer's
  weights (values at the precision's bits + scales/zero points + float bias). ``cost="latency"`` uses
  the measured time (ns) of the layer's fastest lowered kernel on the captured calibration inputs.
- ``pareto_frontier(sens, costs) -> list[MixedChoice]``: every Pareto-optimal assignment (no other
  assignment is both cheaper and less sensitive), from the most to the least costly, found by
  epsilon-constraint with CP-SAT (a multiple-choice knapsack: one precision per layer, minimise the
  summed sensitivity - the additive proxy ZeroQ uses - under a cost cap, then lower the cap below the
  found cost and repeat).
- ``choose_under_budget(sens, costs, budget) -> MixedChoice``: the least sensitive assignment whose cost
  is within ``budget``; ``KilnError`` if even the cheapest assignment exceeds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from ortools.sat.python import cp_model

from kiln.errors import KilnError
from kiln.ir.clone import clone_graph
from kiln.ir.graph import Graph
from kiln.ir.to_fx import to_fx
from kiln.passes.quantize.layers import Layer, find_layers

BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "int4": 4}
SENS_SCALE = 1e9  # CP-SAT works on integers: sensitivities in units of 1e-9


@dataclass(frozen=True)
class MixedChoice:
    assignment: dict[str, str]  # layer -> precision
    cost: int
    sensitivity: float

    def layers_at(self, precision: str) -> frozenset[str]:
        return frozenset(k for k, v in self.assignment.items() if v == precision)


def applicable(layer: Layer, precision: str, group_size: int = 32) -> bool:
    if precision == "int4":
        return layer.kind == "linear" and layer.weight.shape[1] % group_size == 0
    return precision in BITS


def apply_precision(graph: Graph, batches: list[tuple], precision: str, layers: frozenset[str],
                    group_size: int = 32, observer: str = "minmax") -> dict:
    """Quantize the named layers of ``graph`` (in place) to one precision."""
    from kiln.passes.quantize.cast import cast_layers
    from kiln.passes.quantize.int4 import WeightOnlyConfig, quantize_weight_only
    from kiln.passes.quantize.ptq import PTQConfig, quantize_static

    if not layers or precision == "fp32":
        return {}
    if precision == "int8":
        return quantize_static(graph, batches, PTQConfig(observer=observer, layers=layers))
    if precision == "int4":
        return quantize_weight_only(graph, batches, WeightOnlyConfig(group_size=group_size, layers=layers))
    if precision in ("bf16", "fp16"):
        return cast_layers(graph, torch.bfloat16 if precision == "bf16" else torch.float16, layers)
    raise KilnError(f"unknown precision {precision!r}; known: {', '.join(BITS)}")


def _outputs(graph: Graph, batches: list[tuple]) -> list[torch.Tensor]:
    gm = to_fx(graph)
    with torch.no_grad():
        return [gm(*b)[0].float() for b in batches]


def _divergence(ref: list[torch.Tensor], out: list[torch.Tensor], metric: str) -> float:
    vals = []
    for r, o in zip(ref, out):
        if metric == "kl":
            lp, lq = torch.log_softmax(r, dim=-1), torch.log_softmax(o, dim=-1)
            vals.append(float((lp.exp() * (lp - lq)).sum(dim=-1).mean()))
        elif metric == "mse":
            vals.append(float((o - r).pow(2).mean() / r.pow(2).mean().clamp_min(1e-12)))
        else:
            raise KilnError(f"unknown sensitivity metric {metric!r}; expected 'kl' or 'mse'")
    return max(sum(vals) / len(vals), 0.0)


def layer_sensitivity(graph: Graph, batches: list[tuple], precisions=("bf16", "int8", "int4"),
                      metric: str = "kl", group_size: int = 32) -> dict[str, dict[str, float]]:
    ref = _outputs(graph, batches)
    out: dict[str, dict[str, float]] = {}
    for layer in find_layers(graph):
        row = {"fp32": 0.0}
        for p in precisions:
            if p == "fp32" or not applicable(layer, p, group_size):
                continue
            g = clone_graph(graph)
            apply_precision(g, batches, p, frozenset([layer.name]), group_size)
            row[p] = _divergence(ref, _outputs(g, batches), metric)
        out[layer.name] = row
    return out


def _weight_bytes(layer: Layer, precision: str, group_size: int) -> int:
    w = layer.weight
    n = w.shape[0]
    bias = 4 * n if layer.bias is not None else 0
    if precision in ("fp32", "bf16", "fp16"):
        return w.numel() * BITS[precision] // 8 + bias
    if precision == "int8":
        return w.numel() + 8 * n + bias  # int8 values, f32 scale + i32 zero point per channel
    groups = w.numel() // group_size
    return (w.numel() * 4 + 7) // 8 + 8 * groups + bias


def layer_costs(graph: Graph, precisions=("fp32", "bf16", "int8", "int4"), cost: str = "size",
                group_size: int = 32, batches: list[tuple] | None = None) -> dict[str, dict[str, int]]:
    layers = find_layers(graph)
    if cost == "size":
        return {layer.name: {p: _weight_bytes(layer, p, group_size) for p in precisions
                             if applicable(layer, p, group_size)} for layer in layers}
    if cost == "latency":
        if not batches:
            raise KilnError("cost='latency' measures kernels and needs calibration batches")
        from kiln.passes.quantize.latency import layer_latencies

        return layer_latencies(graph, batches[0], [p for p in precisions], group_size)
    raise KilnError(f"unknown cost {cost!r}; expected 'size' or 'latency'")


def _model(sens: dict, costs: dict, cap: int):
    model = cp_model.CpModel()
    picks: dict[tuple[str, str], cp_model.IntVar] = {}
    for layer, opts in costs.items():
        lits = []
        for p in opts:
            if p in sens.get(layer, {}):
                picks[layer, p] = model.NewBoolVar(f"{layer}:{p}")
                lits.append(picks[layer, p])
        if not lits:
            raise KilnError(f"layer {layer} has no precision with both a cost and a sensitivity")
        model.AddExactlyOne(lits)
    total_cost = sum(costs[layer][p] * v for (layer, p), v in picks.items())
    model.Add(total_cost <= cap)
    proxy = sum(round(sens[layer][p] * SENS_SCALE) * v for (layer, p), v in picks.items())
    return model, picks, total_cost, proxy


def _run(model) -> tuple[cp_model.CpSolver, int]:
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 2
    solver.parameters.max_time_in_seconds = 30.0
    status = solver.Solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE, cp_model.INFEASIBLE):
        raise KilnError(f"CP-SAT could not solve the mixed-precision choice ({solver.StatusName(status)})")
    return solver, status


def _solve(sens: dict, costs: dict, cap: int) -> MixedChoice | None:
    """Least summed sensitivity under ``cap``; among those, the cheapest (lexicographic, two solves)."""
    model, picks, total_cost, proxy = _model(sens, costs, cap)
    model.Minimize(proxy)
    solver, status = _run(model)
    if status == cp_model.INFEASIBLE:
        return None
    best = int(solver.ObjectiveValue())
    model.Add(proxy <= best)
    model.Minimize(total_cost)
    solver, status = _run(model)
    assignment = {layer: p for (layer, p), v in picks.items() if solver.Value(v)}
    return MixedChoice(assignment, sum(costs[k][p] for k, p in assignment.items()),
                       sum(sens[k][p] for k, p in assignment.items()))


def choose_under_budget(sens: dict, costs: dict, budget: int) -> MixedChoice:
    choice = _solve(sens, costs, int(budget))
    if choice is None:
        cheapest = sum(min(c.values()) for c in costs.values())
        raise KilnError(f"no precision assignment fits the budget {budget}; the cheapest costs {cheapest}")
    return choice


def pareto_frontier(sens: dict, costs: dict, max_points: int = 200) -> list[MixedChoice]:
    points: list[MixedChoice] = []
    cap = sum(max(c.values()) for c in costs.values())
    while len(points) < max_points:
        choice = _solve(sens, costs, cap)
        if choice is None:
            break
        points.append(choice)  # strictly cheaper than the last point, and the least sensitive at that cost
        cap = choice.cost - 1
    return points
