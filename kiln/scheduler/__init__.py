"""Scheduling: decisions in time and space for a graph's activations.

- ``liveness``: buffers and peak memory of an order; footprint lower bound.
- ``ordering``: BFS/DFS/LPMF (Inductor's heuristics), exact DP for small graphs, kiln's best heuristic.
- ``arena``: offsets in one arena — greedy-by-size, best-fit, CP-SAT with a proven gap.
- ``scratchpad``: scratchpad + DRAM mapping — LRU/Belady baselines and a CP-SAT ILP over residency.
- ``rl``: the mapping game as a gymnasium environment and a learned eviction policy.
- ``graphs``: reproducible experiment graphs (zoo inference and training steps, random DAGs, NAS cells).
``kiln.runtime.arena_exec`` runs a graph from a planned arena; ``benchmarks/memory.py`` measures it all.
"""
