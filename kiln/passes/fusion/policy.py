"""Fusion policies: which legal merge to take first, and which to refuse.

Contract: the ``fuse`` pass asks ``policy.score(candidate)`` for every *legal* merge of two groups (a
group is one kernel node or an earlier merge) and takes the highest score first; ``None`` rejects the
merge. Legality (``kiln.passes.fusion.legality``) and convexity are checked before a policy is asked, so a
policy only decides whether a merge pays. A ``Candidate`` is all a policy sees:

- ``first``, ``second``: ``GroupView`` of the two sides (first = earlier in the graph): ``kind`` (the
  group's kind — ``pointwise``/``reduction``/``epilogue``/``horizontal`` — or, for a single kernel, its op
  kind: ``pointwise``, ``reduction``, ``norm``, ``anchor``), ``ops`` (op names of its kernels, in graph
  order), ``kernels`` (kernel count), ``flops`` and ``io_bytes`` (bytes it reads and writes as one
  kernel: external inputs, weights included, and the results read outside it).
- ``relation``: ``"producer-consumer"`` (a data edge between them) or ``"siblings"`` (they share an
  input and nothing else: a horizontal merge, or one loop over the same space).
- the merged group: ``kind``, ``attrs`` (what the ``kiln.fused`` node would carry: ``structure``,
  ``numel``...), ``kernels``, ``flops``, ``io_bytes``; ``bytes_saved`` = first.io_bytes +
  second.io_bytes - io_bytes (an intermediate no longer written and re-read; a shared input read once);
  ``distance``: how many kernels apart the two groups start in graph order.

``DefaultPolicy``: refuse merges that save no bytes, grow a group beyond ``max_kernels`` ATen kernels
(256: Inductor's ``max_fusion_size`` is 64 of its scheduler nodes, each usually several ATen ops it
has inlined; on the zoo's Mamba, 64 ATen ops cut each layer's scan into ~10 kernels) or join siblings
more than ``max_sibling_distance`` kernels apart (Inductor tries pairs within 64 nodes: a forward op and
its backward twin share a read, but merging them would keep the forward's inputs alive); otherwise
score = bytes saved, producer-consumer before siblings, then closer pairs first. A learned policy
(the cost model) subclasses ``FusionPolicy``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GroupView:
    kind: str
    ops: tuple[str, ...]
    kernels: int
    flops: int
    io_bytes: int


@dataclass(frozen=True)
class Candidate:
    first: GroupView
    second: GroupView
    relation: str
    kind: str
    attrs: dict[str, Any] = field(hash=False)
    kernels: int = 0
    flops: int = 0
    io_bytes: int = 0
    bytes_saved: int = 0
    distance: int = 0


class FusionPolicy(ABC):
    @abstractmethod
    def score(self, candidate: Candidate) -> float | None:
        """Higher merges first; None refuses the merge."""


@dataclass(frozen=True)
class DefaultPolicy(FusionPolicy):
    max_kernels: int = 256
    min_bytes_saved: int = 1
    max_sibling_distance: int = 64

    def score(self, candidate: Candidate) -> float | None:
        if candidate.kernels > self.max_kernels or candidate.bytes_saved < self.min_bytes_saved:
            return None
        vertical = candidate.relation == "producer-consumer"
        if not vertical and candidate.distance > self.max_sibling_distance:
            return None
        return candidate.bytes_saved + (0.5 if vertical else 0.0) + 0.25 / (1 + candidate.distance)
