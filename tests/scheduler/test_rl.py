"""The mapping game: the env passes gymnasium's checker, its return is minus the non-compulsory traffic,
any policy (random, Belady-by-slot, trained) yields plans ``evaluate`` accepts; the pointer policy is
size-independent and round-trips through safetensors; training is deterministic for a seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from kiln.errors import ArtifactError, KilnInputError
from kiln.scheduler.graphs import nas_cell_graph, random_dag
from kiln.scheduler.ordering import order_lpmf
from kiln.scheduler.rl import (
    N_CONTEXT,
    N_FEATURES,
    EvictionPolicy,
    GeneratedProblems,
    ScratchpadEnv,
    compare_mappers,
    load_policy,
    needs_eviction,
    plan_rl,
    save_policy,
    train_policy,
)
from kiln.scheduler.scratchpad import (
    MappedTensor,
    MappingProblem,
    evaluate,
    experiment_capacities,
    mapping_problem,
    plan_belady,
)


def _problems() -> list[MappingProblem]:
    out = []
    for g in (random_dag(24, seed=1), random_dag(30, seed=2), nas_cell_graph(seed=3, n_cells=2)):
        base = mapping_problem(g, order_lpmf(g, include_inputs=True), None)
        out += [base.with_capacity(c) for c in experiment_capacities(base, (0.1, 0.5))]
    return [p for p in out if needs_eviction(p)]


PROBLEMS = _problems()


def play(env: ScratchpadEnv, choose, **reset) -> tuple[float, dict]:
    obs, info = env.reset(**reset)
    total, done = 0.0, False
    while not done:
        assert env.observation_space.contains(obs)
        obs, reward, done, truncated, info = env.step(choose(obs, info))
        assert not truncated and reward <= 0
        total += reward
    return total, info


def test_problem_set_is_not_trivial():
    assert len(PROBLEMS) >= 4


def test_env_passes_the_gymnasium_checker():
    check_env(ScratchpadEnv(PROBLEMS, max_candidates=8), skip_render_check=True)


def test_env_accepts_a_problem_generator_and_redraws_trivial_problems():
    env = ScratchpadEnv(GeneratedProblems(pool=2, fractions=(0.0, 0.3)), max_candidates=8)
    obs, info = env.reset(seed=5)
    assert info["action_mask"].sum() >= 1 and env.observation_space.contains(obs)
    roomy = PROBLEMS[0].with_capacity(PROBLEMS[0].peak)
    assert not needs_eviction(roomy)
    with pytest.raises(KilnInputError, match="never needs an eviction"):
        env.reset(options={"problem": roomy})


@pytest.mark.parametrize("index", range(3))
def test_random_policy_gives_valid_plans_and_the_return_is_the_spill_traffic(index):
    problem = PROBLEMS[index]
    env = ScratchpadEnv([problem], max_candidates=8)
    rng = np.random.default_rng(index)
    total, info = play(env, lambda obs, info: int(rng.choice(np.flatnonzero(info["action_mask"]))), seed=index)
    traffic = evaluate(problem, info["plan"])
    assert traffic == info["traffic"]
    assert round(-total * problem.capacity) == traffic.non_compulsory > 0


def test_slot_zero_is_belady_and_empty_slots_fall_back_to_it():
    for problem in PROBLEMS:
        env = ScratchpadEnv([problem], max_candidates=4)
        _, first = play(env, lambda obs, info: 0, options={"problem": problem})
        _, empty = play(env, lambda obs, info: int(np.flatnonzero(info["action_mask"] == 0)[0])
                        if (info["action_mask"] == 0).any() else 0, options={"problem": problem})
        belady = plan_belady(problem)
        assert first["plan"].resident == belady.resident and first["plan"].stored == belady.stored
        assert empty["traffic"].total == belady.offchip_bytes


def test_observation_features_are_meaningful():
    problem = PROBLEMS[0]
    env = ScratchpadEnv([problem], max_candidates=64)
    obs, info = env.reset(options={"problem": problem})
    n = int(info["action_mask"].sum())
    cands = obs["candidates"]
    assert (cands[:n, 0] == 1).all() and (cands[n:] == 0).all()  # filled flag, empty slots are zeros
    assert cands[0, 4] == 1.0 and (np.diff(cands[:n, 3]) <= 0).all()  # slot 0 is the furthest next use
    assert 0 < obs["context"][1] <= 1  # bytes missing / C


def test_policy_is_permutation_equivariant_and_size_independent():
    torch.manual_seed(0)
    policy = EvictionPolicy(hidden=16, max_candidates=8)
    cands = torch.rand(2, 8, N_FEATURES)
    ctx = torch.rand(2, N_CONTEXT)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    logits = policy(cands, ctx, mask)
    assert torch.isinf(logits[0, 5:]).all() and torch.isfinite(logits[1]).all()
    perm = torch.tensor([3, 1, 4, 0, 2, 5, 6, 7])
    permuted = policy(cands[:, perm], ctx, mask[:, perm])
    assert torch.allclose(permuted[0, :5], logits[0, perm[:5]], atol=1e-6)
    wider = policy(torch.cat([cands, torch.zeros(2, 24, N_FEATURES)], 1), ctx,
                   torch.cat([mask, torch.zeros(2, 24, dtype=torch.bool)], 1))
    assert torch.allclose(wider[:, :8][mask], logits[mask], atol=1e-6)  # padding slots change nothing


def test_training_is_deterministic_for_a_seed_and_trained_policies_plan_validly(tmp_path):
    runs = [train_policy(PROBLEMS, episodes=3, rollouts=3, seed=s, hidden=16, max_candidates=16)
            for s in (0, 0, 1)]
    a, b, c = (r.policy.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert [h["problem"] for h in runs[0].history] == [h["problem"] for h in runs[1].history]
    assert len(runs[0].history) == 3
    policy = runs[0].policy
    for problem in PROBLEMS[:3]:
        plan = plan_rl(problem, policy, time_budget_s=60.0, max_rollouts=5, seed=0)
        greedy = plan_rl(problem, policy, time_budget_s=0.0, max_rollouts=1)
        assert evaluate(problem, plan).total == plan.offchip_bytes <= greedy.offchip_bytes
        assert plan.stats["rollouts"] == 5 and greedy.stats["rollouts"] == 1
        assert plan.offchip_bytes == plan_rl(problem, policy, 60.0, max_rollouts=5, seed=0).offchip_bytes

    path = tmp_path / "policy.safetensors"
    save_policy(policy, path)
    loaded = load_policy(path)
    assert (loaded.hidden, loaded.max_candidates) == (16, 16)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in policy.state_dict().items())
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(other))
    with pytest.raises(ArtifactError, match="not a kiln eviction policy"):
        load_policy(other)
    with pytest.raises(ArtifactError, match="cannot read"):
        load_policy(tmp_path / "missing.safetensors")


def test_training_needs_a_baseline():
    with pytest.raises(KilnInputError, match="at least 2 rollouts"):
        train_policy(PROBLEMS, episodes=1, rollouts=1)


def test_compare_mappers_runs_every_mapper_on_one_problem():
    problem = PROBLEMS[1]
    policy = EvictionPolicy(hidden=16, max_candidates=16)
    results = compare_mappers(problem, policy, time_limit_s=60.0, max_rollouts=4)
    assert set(results) == {"lru", "belady", "ilp", "rl", "rl_greedy"}
    assert results["ilp"].optimal
    assert results["ilp"].offchip_bytes <= min(results["lru"].offchip_bytes, results["belady"].offchip_bytes)
    assert results["ilp"].offchip_bytes <= results["rl"].offchip_bytes <= results["rl_greedy"].offchip_bytes
    for r in results.values():
        assert r.offchip_bytes - r.noncompulsory_bytes == problem.compulsory_bytes


def test_a_problem_without_evictions_maps_without_the_policy():
    problem = MappingProblem([MappedTensor("a", 4, 0, (1,), True)], n_steps=2, capacity=4)
    plan = plan_rl(problem, EvictionPolicy(hidden=8, max_candidates=4), time_budget_s=0.0)
    assert plan.offchip_bytes == 4 and plan.optimal
