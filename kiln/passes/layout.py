"""Channels-last layout: run a conv net's 4-d activations in NHWC memory order where a backend prefers it.

Contract (pass ``layout``, option ``prefer``; without it, ``ctx.options["prefer_layout"]``):
- ``prefer`` is ``None``/``"contiguous"`` (the pass does nothing) or ``"channels_last"``; anything else
  raises ``KilnInputError``.
- The channels-last region grows from every 2-d ``aten.convolution`` (plain or transposed) along 4-d
  tensor edges, through the nodes that keep channels-last: a pure torch op (not a view) joins if, with
  its 4-d inputs in channels-last memory format, PyTorch's own meta kernels (fake tensors, as all kiln
  type inference) give channels-last 4-d results (or results whose two formats coincide: ``C == 1`` or
  ``H * W == 1``, e.g. a global pool). So BatchNorm, pointwise ops, pooling, ``cat`` on channels and
  upsampling join; ``view``/``permute``/``flatten`` and friends stay outside.
- Conversions sit only at the region's boundary: each 4-d value entering it is converted once
  (``aten.clone(x, memory_format=torch.channels_last)``; a weight is instead stored converted, as a new
  ``kiln.weight`` ``<name>.channels_last``), and each channels-last value read outside the region or
  returned is converted back once (``aten.clone(x, memory_format=torch.contiguous_format)``). A chain of
  convs and pointwise ops thus converts once in and once out.
- Types: the region's results are re-inferred, so ``TensorType.layout`` records ``"channels_last"``
  exactly where PyTorch's strides will be channels-last; shapes and dtypes never change, nor do values
  (the memory format is not part of an op's semantics), so outputs equal the unconverted graph's.
- Conversions already in the graph are kept as boundaries (never joined or doubled), so running the
  pass twice changes nothing the second time.
- Stats: ``{"region_nodes": n, "to_channels_last": runtime conversions in, "to_contiguous": conversions
  out, "weights": weights stored converted, "retyped": results whose layout changed}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.errors import KilnError, KilnInputError
from kiln.ir.graph import Graph, Node, Value, map_values
from kiln.ir.infer import type_of_example
from kiln.ir.ops import WEIGHT, op_for_target
from kiln.ir.types import TensorType
from kiln.passes.base import Pass, PassContext, PassResult, register_pass

LAYOUTS = (None, "contiguous", "channels_last")
_STATS = ("region_nodes", "to_channels_last", "to_contiguous", "weights", "retyped")
ATEN = torch.ops.aten


def _is_4d(v) -> bool:
    return isinstance(v, Value) and isinstance(v.type, TensorType) and v.type.rank == 4


def formats_coincide(t: TensorType) -> bool:
    """True when the contiguous and channels-last strides of a 4-d shape describe the same order."""
    _, c, h, w = t.shape
    return c == 1 or (isinstance(h, int) and isinstance(w, int) and h * w == 1)


def _needs_converting(v: Value) -> bool:
    return _is_4d(v) and v.type.layout != "channels_last" and not formats_coincide(v.type)


def _is_view(node: Node) -> bool:
    return any(r.alias_info is not None for r in node.op.schema.returns)


def is_conversion(node: Node, fmt: torch.memory_format | None = None) -> bool:
    """A memory-format conversion (to ``fmt``, or to either format) as this pass writes it."""
    formats = (torch.channels_last, torch.contiguous_format) if fmt is None else (fmt,)
    return node.op.target is ATEN.clone.default and node.kwargs.get("memory_format") in formats


def keeps_channels_last(node: Node) -> bool:
    """Whether ``node`` gives channels-last (or format-agnostic) 4-d results from channels-last inputs."""
    op = node.op
    if not op.is_torch_op or op.side_effects or op.nondeterministic or node.subgraph is not None \
            or _is_view(node) or is_conversion(node):
        return False
    if not any(_is_4d(v) for v in node.inputs) or not any(_is_4d(r) for r in node.results):
        return False

    def as_channels_last(v: Value) -> Value:
        return Value(v.type.with_(layout="channels_last"), v.name) if _needs_converting(v) else v

    try:
        types = op.infer(map_values(node.args, as_channels_last),
                         {k: map_values(a, as_channels_last) for k, a in node.kwargs.items()}, node.attrs, None)
    except KilnError:
        return False
    return all(not (isinstance(t, TensorType) and t.rank == 4) or t.layout == "channels_last"
               or formats_coincide(t) for t in types)


def channels_last_region(graph: Graph) -> list[Node]:
    """The nodes that run in channels-last, in graph order (empty when the graph has no 2-d conv)."""
    seeds = [n for n in graph.nodes if n.op.target is ATEN.convolution.default and _is_4d(n.inputs[0])
             and _is_4d(n.results[0]) and keeps_channels_last(n)]
    region: set[Node] = set(seeds)
    stack = list(seeds)
    while stack:
        node = stack.pop()
        neighbours = [u for r in node.results if _is_4d(r) for u in r.users]
        neighbours += [v.producer for v in node.inputs if _is_4d(v) and v.producer is not None]
        for n in neighbours:
            if n not in region and n.op is not WEIGHT and keeps_channels_last(n):
                region.add(n)
                stack.append(n)
    return [n for n in graph.nodes if n in region]


def _fresh_weight_name(graph: Graph, base: str) -> str:
    name, i = base, 0
    while name in graph.weights:
        name, i = f"{base}.{i}", i + 1
    return name


def _convert_entry(graph: Graph, v: Value, readers: list[Node], stats: dict[str, int]) -> None:
    p = v.producer
    if p is not None and p.op is WEIGHT:
        name = p.attrs["name"]
        tensor = graph.weights[name].contiguous(memory_format=torch.channels_last)
        new_name = _fresh_weight_name(graph, f"{name}.channels_last")
        graph.weights[new_name] = tensor
        new = graph.create_node(WEIGHT, (), {}, [type_of_example(tensor)], names=[f"{v.name}_cl"],
                                attrs={"name": new_name}, index=graph.index_of(p) + 1).output
        stats["weights"] += 1
    else:
        index = 0 if p is None else graph.index_of(p) + 1
        new = graph.create_node(op_for_target(ATEN.clone.default), (v,), {"memory_format": torch.channels_last},
                                names=[f"{v.name}_nhwc"], index=index).output
        stats["to_channels_last"] += 1
    for reader in readers:
        reader.replace_input(v, new)
    if p is not None and p.op is WEIGHT and not v.uses and all(o is not v for o in graph.outputs):
        graph.erase(p)
        if not any(n.op is WEIGHT and n.attrs["name"] == p.attrs["name"] for n in graph.nodes):
            del graph.weights[p.attrs["name"]]


def _convert_exit(graph: Graph, v: Value, region: set[Node], stats: dict[str, int]) -> None:
    outside = [u for u in v.users if u not in region and not is_conversion(u, torch.contiguous_format)]
    if not outside and all(o is not v for o in graph.outputs):
        return  # already converted back (e.g. by an earlier run of this pass)
    index = graph.index_of(v.producer) + 1
    new = graph.create_node(op_for_target(ATEN.clone.default), (v,), {"memory_format": torch.contiguous_format},
                            names=[f"{v.name}_nchw"], index=index).output
    for u in outside:
        u.replace_input(v, new)
    graph.outputs = [new if o is v else o for o in graph.outputs]
    stats["to_contiguous"] += 1


def _retype(node: Node) -> int:
    """Re-infer the node's result layouts; returns how many changed."""
    types = node.op.infer(node.args, node.kwargs, node.attrs, None)
    changed = 0
    for r, t in zip(node.results, types):
        if not isinstance(t, TensorType):
            continue
        if t.shape != r.type.shape or t.dtype != r.type.dtype:
            raise KilnError(f"layout: %{r.name} changed type from {r.type} to {t}; this is a bug in the pass")
        changed += t.layout != r.type.layout
        r.type = r.type.with_(layout=t.layout)
    return changed


def to_channels_last(graph: Graph) -> dict[str, int]:
    region_nodes = channels_last_region(graph)
    region = set(region_nodes)
    stats = dict.fromkeys(_STATS, 0)
    stats["region_nodes"] = len(region_nodes)
    entries: dict[Value, list[Node]] = {}
    for node in region_nodes:
        for v in node.inputs:
            if v.producer not in region and _needs_converting(v):
                entries.setdefault(v, [])
                if node not in entries[v]:
                    entries[v].append(node)
    for v, readers in entries.items():
        _convert_entry(graph, v, readers, stats)
    for node in region_nodes:
        stats["retyped"] += _retype(node)
    outputs = {id(o) for o in graph.outputs}
    for node in region_nodes:
        for r in node.results:
            if _is_4d(r) and r.type.layout == "channels_last" and (
                    id(r) in outputs or any(u not in region for u in r.users)):
                _convert_exit(graph, r, region, stats)
    return stats


@register_pass("layout")
@dataclass(frozen=True)
class ChannelsLast(Pass):
    """Convert conv nets to channels-last memory order when ``prefer == "channels_last"``."""

    prefer: str | None = None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        prefer = self.prefer if self.prefer is not None else ctx.options.get("prefer_layout")
        if prefer not in LAYOUTS:
            raise KilnInputError(f"layout: prefer must be one of {[p for p in LAYOUTS if p]} (or unset), "
                                 f"got {prefer!r}")
        if prefer != "channels_last":
            return PassResult(changed=False, stats=dict.fromkeys(_STATS, 0))
        stats = to_channels_last(graph)
        return PassResult(changed=any(stats[k] for k in stats if k != "region_nodes"), stats=stats)
