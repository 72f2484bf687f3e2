"""The policy interface: what a policy sees, that None rejects, that scores order the greedy merges."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kiln.ir import Builder, Graph, TensorType, aten
from kiln.passes.fusion import Candidate, DefaultPolicy, FusionPolicy, GroupView, find_groups

F32 = torch.float32


@dataclass(frozen=True)
class Recording(FusionPolicy):
    """Accepts everything the default accepts and remembers what it was shown."""

    seen: list = field(default_factory=list, hash=False, compare=False)

    def score(self, candidate: Candidate) -> float | None:
        self.seen.append(candidate)
        return DefaultPolicy().score(candidate)


@dataclass(frozen=True)
class Refuse(FusionPolicy):
    def score(self, candidate: Candidate) -> float | None:
        return None


@dataclass(frozen=True)
class PreferOps(FusionPolicy):
    """Scores only the merge of exactly these ops."""

    ops: frozenset

    def score(self, candidate: Candidate) -> float | None:
        return 1.0 if self.ops == set(candidate.first.ops + candidate.second.ops) else None


def chain():
    g = Graph("chain")
    x = g.add_input(TensorType((16, 16), F32), "x")
    b = Builder(g)
    r = b.call(aten.relu, x, name="r")
    n = b.call(aten.neg, r, name="n")
    e = b.call(aten.exp, n, name="e")
    g.set_outputs([e])
    return g


def names(groups):
    return [frozenset(m.results[0].name for m in grp.members) for grp in groups]


def test_policy_sees_both_sides_and_the_merge():
    policy = Recording()
    find_groups(chain(), policy)
    first = next(c for c in policy.seen if c.first.ops == ("aten.relu",) and c.second.ops == ("aten.neg",))
    tile = 16 * 16 * 4
    assert first.relation == "producer-consumer" and first.kind == "pointwise"
    assert first.first == GroupView("pointwise", ("aten.relu",), 1, 256, 2 * tile)
    assert first.kernels == 2 and first.flops == 512 and first.io_bytes == 2 * tile
    assert first.bytes_saved == 2 * tile  # relu's result is neither written nor re-read
    assert first.attrs == {"kind": "pointwise", "numel": 256} and first.distance == 1
    # after relu+neg merged, the policy is asked about the merged group and exp
    assert any(c.first.kind == "pointwise" and c.first.kernels == 2 and c.second.ops == ("aten.exp",)
               for c in policy.seen)


def test_none_rejects_every_merge():
    assert find_groups(chain(), Refuse()) == []


def test_scores_pick_the_merges():
    assert names(find_groups(chain(), PreferOps(frozenset({"aten.neg", "aten.exp"})))) == [
        frozenset({"n", "e"})]
    assert names(find_groups(chain())) == [frozenset({"r", "n", "e"})]


def test_default_policy_limits():
    view = GroupView("pointwise", ("aten.relu",), 1, 10, 100)
    base = dict(first=view, second=view, kind="pointwise", attrs={}, kernels=2, flops=20, io_bytes=100)
    assert DefaultPolicy().score(Candidate(relation="producer-consumer", bytes_saved=0, **base)) is None
    assert DefaultPolicy(max_kernels=1).score(Candidate(relation="producer-consumer", bytes_saved=8, **base)) is None
    far = Candidate(relation="siblings", bytes_saved=8, distance=65, **base)
    assert DefaultPolicy().score(far) is None and DefaultPolicy(max_sibling_distance=100).score(far) is not None
    vertical = DefaultPolicy().score(Candidate(relation="producer-consumer", bytes_saved=8, **base))
    sibling = DefaultPolicy().score(Candidate(relation="siblings", bytes_saved=8, **base))
    assert vertical > sibling > 0


def test_max_kernels_bounds_group_size():
    g = Graph("long")
    v = g.add_input(TensorType((8,), F32), "x")
    b = Builder(g)
    for i in range(10):
        v = b.call(aten.neg if i % 2 else aten.exp, v, name=f"n{i}")
    g.set_outputs([v])
    groups = find_groups(g, DefaultPolicy(max_kernels=4))
    assert all(len(grp.members) <= 4 for grp in groups) and sum(len(grp.members) for grp in groups) >= 8
