"""Canonicalization: remove no-op views, casts, copies and arithmetic identities.

Contract: each pattern replaces a node by its input only when the result's type (shape, dtype *and*
layout) equals the input's, so later stride-sensitive ops (``view``) see what they saw before. A node
whose result is a graph output is kept: AOTAutograd's runtime relies on outputs not aliasing inputs it
did not expect. Patterns:
- ``clone``/``alias``/``lift_fresh_copy``/``_to_copy``/``contiguous`` that change nothing;
- ``view``/``_unsafe_view``/``reshape``/``expand`` to the input's own shape; ``permute`` by the identity;
- ``slice`` over the whole dim with step 1;
- ``view(view(x))`` -> ``view(x)``;
- ``x * 1``, ``x / 1``, ``x + 0``, ``x - 0`` with a scalar operand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.ir.graph import Node, Value
from kiln.ir.ops import aten
from kiln.ir.rewrite import Rewriter, pattern
from kiln.ir.types import TensorType
from kiln.passes.base import RewritePass, register_pass

_INT64_MAX = 2**63 - 1


def _forward(node: Node, rw: Rewriter, source: Value) -> bool:
    """Replace ``node``'s result by ``source`` if that is a no-op."""
    out = node.output
    if any(o is out for o in rw.graph.outputs):
        return False
    if not (isinstance(out.type, TensorType) and out.type == source.type):
        return False
    if any(u.op.side_effects for u in out.users):  # e.g. clone(x) then add_: the copy protects x
        return False
    rw.replace_node(node, [source])
    return True


def _kw(node: Node, name: str, default=None):
    return node.kwargs.get(name, default)


@register_pass("canonicalize")
@dataclass(frozen=True)
class Canonicalize(RewritePass):
    @pattern(aten.clone, aten.alias, aten.lift_fresh_copy)
    def drop_copy(self, node: Node, rw: Rewriter) -> bool:
        fmt = _kw(node, "memory_format")
        if fmt not in (None, torch.preserve_format):
            return False
        return _forward(node, rw, node.input(0))

    @pattern(aten._to_copy)
    def drop_cast(self, node: Node, rw: Rewriter) -> bool:
        src = node.input(0)
        if _kw(node, "device") not in (None,) or _kw(node, "memory_format") not in (None, torch.preserve_format):
            return False
        if _kw(node, "layout") not in (None, torch.strided) or _kw(node, "pin_memory"):
            return False
        return _forward(node, rw, src)

    @pattern(aten.view, aten._unsafe_view, aten.reshape, aten.expand)
    def drop_view(self, node: Node, rw: Rewriter) -> bool:
        src = node.input(0)
        if node.is_a(aten.view) and src.producer is not None and src.producer.is_a(aten.view) \
                and node.op is src.producer.op:
            inner = src.producer.input(0)
            new = rw.call(node.op, inner, *node.args[1:], **node.kwargs)
            rw.replace_node(node, [new])
            return True
        return _forward(node, rw, src)

    @pattern(aten.permute)
    def drop_permute(self, node: Node, rw: Rewriter) -> bool:
        dims = node.args[1]
        rank = len(dims)
        if [d % rank if rank else d for d in dims] != list(range(rank)):
            return False
        return _forward(node, rw, node.input(0))

    @pattern(aten.slice.Tensor)
    def drop_slice(self, node: Node, rw: Rewriter) -> bool:
        src = node.input(0)
        args = list(node.args) + [None] * (5 - len(node.args))
        dim = node.kwargs.get("dim", args[1] if args[1] is not None else 0)
        start = node.kwargs.get("start", args[2])
        end = node.kwargs.get("end", args[3])
        step = node.kwargs.get("step", args[4] if args[4] is not None else 1)
        size = src.type.shape[dim]
        if step != 1 or start not in (None, 0) or isinstance(end, Value):
            return False
        if end is not None and end != _INT64_MAX and not (isinstance(size, int) and end >= size):
            return False
        return _forward(node, rw, src)

    @pattern(aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor,
             aten.mul.Scalar, aten.div.Scalar, aten.add.Scalar, aten.sub.Scalar)
    def drop_identity_arith(self, node: Node, rw: Rewriter) -> bool:
        if len(node.args) < 2 or isinstance(node.args[1], (Value, bool)):
            return False
        other = node.args[1]
        neutral = 1 if node.is_a(aten.mul) or node.is_a(aten.div) else 0
        if not isinstance(other, (int, float)) or other != neutral:
            return False
        if not isinstance(node.args[0], Value):
            return False
        return _forward(node, rw, node.args[0])
