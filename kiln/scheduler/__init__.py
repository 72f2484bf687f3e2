"""Scheduling: operator ordering and memory planning (liveness, greedy/CP-SAT/RL planners).

Built by the scheduler issue (#4); nothing in kiln depends on it yet.
"""
