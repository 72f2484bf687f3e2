"""Kernel fusion (the fusion issue; anchor: TorchInductor's scheduler fusion).

- ``classify``: what loop each op is (pointwise, reduction, norm, anchor, view, opaque) — a data table;
- ``kernels``: the kernel graph (kernels and the edges between them, through views), traffic of a group;
- ``legality``: when a set of kernels may be one group and which kind (pointwise, reduction with its
  pass structure, epilogue, horizontal);
- ``policy``: ``FusionPolicy`` (what a policy sees: ``Candidate``) and ``DefaultPolicy``;
- ``fuse``: the greedy planner and the ``fuse`` pass that outlines groups as ``kiln.fused`` nodes.
"""

from kiln.passes.fusion.classify import OpClass, OpKind, classify
from kiln.passes.fusion.fuse import Fuse, FusionGroup, find_groups, outline_group
from kiln.passes.fusion.legality import FUSION_KINDS, GroupPlan, Illegal, plan_group
from kiln.passes.fusion.policy import Candidate, DefaultPolicy, FusionPolicy, GroupView

__all__ = ["Candidate", "DefaultPolicy", "FUSION_KINDS", "Fuse", "FusionGroup", "FusionPolicy", "GroupPlan",
           "GroupView", "Illegal", "OpClass", "OpKind", "classify", "find_groups", "outline_group", "plan_group"]
