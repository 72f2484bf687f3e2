"""Memory planning benchmark (scheduler issue): orders, arena offsets, scratchpad mapping, RL — one run.

Usage: ``python benchmarks/memory.py [--quick] [--json PATH] [--time-limit S]``

Graphs: the zoo at batch 1 and 4 (constants folded), one training step (forward + backward) of every zoo
model, seeded random DAGs and NAS-like cells
(``kiln.scheduler.graphs``), 30+ in the full run. For each graph, in the same process:
1. Orders: peak live bytes of program/BFS/DFS/LPMF (Inductor's three heuristics) and kiln's ``best``;
   ``peak_vs_best_baseline`` = best / min(BFS, DFS, LPMF); ``peak_over_footprint_bound`` = best / the
   order-independent footprint bound (1.0 = provably optimal order, nothing left to gain).
2. Arena offsets for the chosen order: greedy-by-size (TFLite Micro), best-fit and CP-SAT (time limit,
   2 workers); ``arena_over_bound`` = CP-SAT arena / live-bytes lower bound.
3. Scratchpad mapping (capacities between the largest op footprint and the peak, problems that need an
   eviction): off-chip bytes of LRU, Belady, the CP-SAT ILP, and the RL policy (trained in this run) at
   the ILP's wall-clock; ``offchip_noncompulsory_removed`` = 1 - ILP non-compulsory / the better of LRU
   and Belady (summed over problems; ``..._vs_lru`` against LRU alone); ``rl_over_ilp_offchip_geomean``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kiln.benchmarking import benchmark_args, geomean, markdown_table, write_report  # noqa: E402
from kiln.ir.graph import Graph  # noqa: E402
from kiln.scheduler.arena import plan_best_fit, plan_cpsat, plan_greedy_by_size  # noqa: E402
from kiln.scheduler.buffers import check_plan, live_bytes_lower_bound  # noqa: E402
from kiln.scheduler.graphs import nas_cell_graph, random_dag, training_graph, zoo_graphs  # noqa: E402
from kiln.scheduler.liveness import buffers_for_order, footprint_lower_bound, peak_memory  # noqa: E402
from kiln.scheduler.ordering import METHODS  # noqa: E402
from kiln.scheduler.rl import compare_mappers, needs_eviction, train_policy  # noqa: E402
from kiln.scheduler.scratchpad import experiment_capacities, mapping_problem  # noqa: E402

BASELINE_ORDERS = ("bfs", "dfs", "lpmf")
TRAINING_MODELS = ("gpt", "mamba", "mlp", "mobilenetv2", "resnet18", "rnn", "transformer", "unet")


def benchmark_graphs(quick: bool) -> dict[str, Graph]:
    graphs: dict[str, Graph] = {}
    if quick:
        graphs.update(zoo_graphs(names=["mlp", "resnet18", "transformer"], batch_sizes=(1,), fold_constants=True))
        graphs.update({f"random_dag_{s}": random_dag(40, seed=s) for s in range(2)})
        graphs.update({f"nas_cell_{s}": nas_cell_graph(seed=s) for s in range(1)})
        graphs["gpt_train"] = training_graph("gpt")
        return graphs
    graphs.update(zoo_graphs(batch_sizes=(1, 4), fold_constants=True))
    graphs.update({f"{name}_train": training_graph(name) for name in TRAINING_MODELS})
    graphs.update({f"random_dag_{s}": random_dag(30 + 15 * s, seed=s) for s in range(8)})
    graphs.update({f"nas_cell_{s}": nas_cell_graph(seed=s) for s in range(6)})
    return graphs


def order_row(name: str, graph: Graph) -> tuple[dict, list]:
    row: dict = {"graph": name, "nodes": len(graph.nodes)}
    orders = {}
    for method in ("program", *BASELINE_ORDERS, "best"):
        t0 = time.perf_counter()
        order = METHODS[method](graph)
        row[f"{method}_s"] = time.perf_counter() - t0
        row[f"peak_{method}"] = peak_memory(graph, order)
        orders[method] = order
    best_baseline = min(row[f"peak_{m}"] for m in BASELINE_ORDERS)
    row["peak_vs_best_baseline"] = row["peak_best"] / best_baseline
    row["peak_over_footprint_bound"] = row["peak_best"] / max(footprint_lower_bound(graph), 1)
    return row, orders["best"]


def arena_row(graph: Graph, order: list, time_limit_s: float) -> dict:
    buffers = buffers_for_order(graph, order)
    bound = live_bytes_lower_bound(buffers)
    plans = {"greedy": plan_greedy_by_size(buffers), "best_fit": plan_best_fit(buffers)}
    plans["cpsat"] = plan_cpsat(buffers, time_limit_s=time_limit_s, workers=2)
    for plan in plans.values():
        check_plan(buffers, plan)
    return {
        "buffers": len(buffers),
        "bound_bytes": bound,
        **{f"arena_{k}": p.size for k, p in plans.items()},
        "arena_over_bound": plans["cpsat"].size / bound if bound else 1.0,
        "greedy_over_bound": plans["greedy"].size / bound if bound else 1.0,
        "cpsat_optimal": plans["cpsat"].optimal,
        "cpsat_s": plans["cpsat"].solve_s,
    }


def mapping_rows(name: str, graph: Graph, order: list, policy, time_limit_s: float,
                 fractions: tuple[float, ...]) -> list[dict]:
    rows = []
    full = mapping_problem(graph, order, None)
    for capacity in experiment_capacities(full, fractions):
        problem = mapping_problem(graph, order, capacity)
        if not needs_eviction(problem):
            continue
        results = compare_mappers(problem, policy, time_limit_s=time_limit_s, workers=2)
        row = {"graph": name, "capacity": capacity}
        for method, r in results.items():
            row[f"{method}_offchip"] = r.offchip_bytes
            row[f"{method}_noncomp"] = r.noncompulsory_bytes
            row[f"{method}_s"] = r.seconds
        row["ilp_optimal"] = results["ilp"].optimal
        row["baseline_noncomp"] = min(results["lru"].noncompulsory_bytes, results["belady"].noncompulsory_bytes)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_args(__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=None, help="CP-SAT seconds per problem")
    parser.add_argument("--rl-episodes", type=int, default=None, help="training episodes for the RL policy")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    time_limit = args.time_limit if args.time_limit is not None else (1.0 if args.quick else 5.0)
    graphs = benchmark_graphs(args.quick)
    print(f"# memory planning: {len(graphs)} graphs, CP-SAT {time_limit:g} s on 2 workers, torch threads 2")
    episodes = args.rl_episodes if args.rl_episodes is not None else (60 if args.quick else 300)
    t0 = time.perf_counter()
    policy = train_policy(episodes=episodes, seed=0).policy
    train_s = time.perf_counter() - t0
    print(f"  RL policy: {episodes} training episodes in {train_s:.0f} s", flush=True)
    fractions = (0.5,) if args.quick else (0.4,)
    rows, mapping = [], []
    for name, graph in graphs.items():
        row, order = order_row(name, graph)
        row.update(arena_row(graph, order, time_limit))
        rows.append(row)
        mapping.extend(mapping_rows(name, graph, order, policy, time_limit, fractions))
        print(f"  {name}: best/baseline {row['peak_vs_best_baseline']:.3f}, "
              f"arena/bound {row['arena_over_bound']:.4f} ({row['cpsat_s']:.1f} s)", flush=True)
    baseline_noncomp = sum(r["baseline_noncomp"] for r in mapping)
    lru_noncomp = sum(r["lru_noncomp"] for r in mapping)
    ilp_noncomp = sum(r["ilp_noncomp"] for r in mapping)
    summary = {
        "graphs": len(rows),
        "arena_over_bound_geomean": geomean(r["arena_over_bound"] for r in rows),
        "greedy_over_bound_geomean": geomean(r["greedy_over_bound"] for r in rows),
        "ilp_solve_s_median": statistics.median(r["cpsat_s"] for r in rows),
        "peak_vs_best_baseline_geomean": geomean(r["peak_vs_best_baseline"] for r in rows),
        "mapping_problems": len(mapping),
        "offchip_noncompulsory_removed": 1 - ilp_noncomp / baseline_noncomp if baseline_noncomp else 0.0,
        "offchip_noncompulsory_removed_vs_lru": 1 - ilp_noncomp / lru_noncomp if lru_noncomp else 0.0,
        "rl_over_ilp_offchip_geomean": geomean(r["rl_offchip"] / r["ilp_offchip"] for r in mapping),
        "rl_greedy_over_ilp_offchip_geomean": geomean(r["rl_greedy_offchip"] / r["ilp_offchip"] for r in mapping),
        "rl_train_s": train_s,
    }
    print(markdown_table(rows, ["graph", "nodes", "peak_bfs", "peak_dfs", "peak_lpmf", "peak_best",
                                "peak_vs_best_baseline", "peak_over_footprint_bound", "arena_greedy", "arena_cpsat",
                                "bound_bytes", "arena_over_bound", "cpsat_optimal", "cpsat_s"]))
    print(markdown_table(mapping, ["graph", "capacity", "lru_noncomp", "belady_noncomp", "ilp_noncomp",
                                   "rl_noncomp", "rl_greedy_noncomp", "ilp_optimal", "ilp_s", "rl_s"]))
    print(markdown_table([summary], list(summary)))
    if args.json:
        write_report(args.json, rows, summary, {"mapping_rows": mapping})
    return 0


if __name__ == "__main__":
    sys.exit(main())
