"""Mixed precision: the budgeted choice respects the budget and is optimal (checked against brute force),
the frontier holds exactly the Pareto-optimal points, and on the digits CNN the whole scheme runs."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from examples.models import digits
from kiln.errors import KilnError
from kiln.ir.to_fx import to_fx
from kiln.ir.verifier import verify
from kiln.passes.quantize import quantize_graph
from kiln.passes.quantize.mixed import choose_under_budget, layer_costs, layer_sensitivity, pareto_frontier
from kiln.passes.quantize.prepare import fold_batchnorm


def random_problem(seed: int, layers: int = 5):
    rng = random.Random(seed)
    sens, costs = {}, {}
    for i in range(layers):
        n = f"l{i}"
        size = rng.randint(100, 5000)
        costs[n] = {"fp32": 4 * size, "int8": size + 8, "int4": size // 2 + 16}
        s8 = rng.random() * 0.01
        sens[n] = {"fp32": 0.0, "int8": s8, "int4": s8 + rng.random() * 0.1}
    return sens, costs


def brute_force(sens, costs):
    names = list(costs)
    out = []
    for combo in itertools.product(*[list(costs[n]) for n in names]):
        out.append((sum(costs[n][p] for n, p in zip(names, combo)), sum(sens[n][p] for n, p in zip(names, combo)),
                    dict(zip(names, combo))))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_budgeted_choice_respects_the_budget_and_is_optimal(seed):
    sens, costs = random_problem(seed)
    allc = brute_force(sens, costs)
    lo, hi = min(c for c, _, _ in allc), max(c for c, _, _ in allc)
    for budget in [lo, (lo + hi) // 3, (lo + hi) // 2, hi]:
        choice = choose_under_budget(sens, costs, budget)
        assert choice.cost <= budget
        assert choice.cost == sum(costs[n][p] for n, p in choice.assignment.items())
        best = min(s for c, s, _ in allc if c <= budget)
        assert choice.sensitivity == pytest.approx(best, abs=1e-8)


def test_budget_below_the_cheapest_assignment_is_an_error():
    sens, costs = random_problem(0)
    cheapest = sum(min(c.values()) for c in costs.values())
    with pytest.raises(KilnError, match="no precision assignment fits the budget"):
        choose_under_budget(sens, costs, cheapest - 1)


def test_frontier_is_exactly_the_pareto_set():
    sens, costs = random_problem(7, layers=4)
    allc = brute_force(sens, costs)
    front = pareto_frontier(sens, costs)
    # strictly cheaper and strictly more sensitive along the frontier
    assert all(a.cost > b.cost and a.sensitivity < b.sensitivity + 1e-12 for a, b in zip(front, front[1:]))

    def dominated(c, s):
        return any(c2 <= c and s2 < s - 1e-9 for c2, s2, _ in allc) or any(c2 < c and s2 <= s + 1e-9
                                                                          for c2, s2, _ in allc)

    assert not any(dominated(p.cost, p.sensitivity) for p in front)
    pareto = {(c, round(s, 8)) for c, s, _ in allc if not dominated(c, s)}
    assert {(p.cost, round(p.sensitivity, 8)) for p in front} == pareto


@pytest.mark.slow
def test_digits_sensitivity_costs_and_mixed_scheme(digits_cnn, digits_graph, digits_calib):
    model, data = digits_cnn
    g = digits_graph
    fold_batchnorm(g)
    sens = layer_sensitivity(g, digits_calib[:2], ("int8", "int4"))
    assert set(sens) == {"conv1.0", "conv2.0", "conv3.0", "fc1", "fc2"}
    assert all(row["fp32"] == 0.0 and row["int8"] >= 0 for row in sens.values())
    assert "int4" not in sens["conv1.0"] and "int4" in sens["fc1"]  # int4 is for linear layers
    assert sens["fc1"]["int4"] > sens["fc1"]["int8"]  # fewer bits, more error
    costs = layer_costs(g, ("fp32", "int8", "int4"))
    assert costs["fc1"] == {"fp32": (256 * 64 + 64) * 4, "int8": 256 * 64 + 8 * 64 + 4 * 64,
                            "int4": 256 * 64 // 2 + 8 * (256 * 64 // 32) + 4 * 64}
    res = quantize_graph(digits_graph, "mixed", digits_calib[:2], budget=0.35)
    verify(digits_graph)
    assert res.stats["cost"] <= res.stats["budget"] == int(0.35 * res.stats["float32_cost"])
    assert len(res.stats["frontier"]) >= 2
    with torch.no_grad():
        fp32 = digits.accuracy(model(data.x_test), data.y_test)
        mixed = digits.accuracy(to_fx(digits_graph)(data.x_test)[0], data.y_test)
    assert fp32 - mixed <= 0.03
