"""When a set of kernels may become one fused group, and what kind of group it is.

Contract: ``plan_group(kg, members) -> GroupPlan | Illegal`` looks only at the member set (convexity
against the rest of the graph is the caller's business: ``creates_cycle`` here, or
``kiln.ir.outline.cycle_witness``). A set is split into its connected components (data edges between
members, through views); each component must be one of:
- **pointwise**: only POINTWISE ops (and inference batch norm); every result it writes (``escaping``) has
  the same element count N, the group's loop. Members over other counts are computed inline where the
  loop needs them (a broadcast operand, a slice through a view) and must not be written.
- **reduction**: one or more REDUCTION/NORM ops over the same (R rows, K elements per row) plus pointwise
  ops; what it writes has R or R*K elements. Explicit structure only: a reduction's in-group consumers all
  run over one space (R, or R*K), and a reduced value is read back over R*K (softmax's ``x - amax``)
  only when the reduced dims are the trailing dims and the value broadcasts along exactly them (a row
  kernel). ``attrs["structure"]`` says how a backend should run it: ``online-softmax`` (one pass for max
  and sum), ``welford`` (mean and variance in one pass), ``two-pass`` (reduce, then re-read the row:
  RMS norm), ``single-pass`` (a plain reduction with pointwise prologue/epilogue); ``attrs["pattern"]``
  names a recognised normalisation (``softmax``, ``log-softmax``, ``layer-norm``, ``rms-norm``).
  The table ``STRUCTURES`` decides; the first matching rule wins.
- **epilogue**: exactly one ANCHOR (mm/addmm/bmm/baddbmm/convolution) with no in-group producer (extern
  kernels take no prologue) and pointwise consumers: bias, activation, residual add; every written
  result has the anchor's element count.
Several components make a **horizontal** group: independent work launched as one kernel because it
shares reads. ``schedule = "concat-gemm"`` (or ``"concat-conv"``): every part is an anchor (plus its
epilogue) of one op reading the same activation operand, with weights equal but for the output dim (and
equal strides/padding/alpha...): the backend concatenates the weights, runs one GEMM/conv and applies
each part's epilogue to its slice (Q/K/V projections). ``schedule = "shared-loop"``: no anchors, every
part runs over the same loop (pointwise N, or reductions over the same (R, K) with pointwise parts of
R*K elements): one loop nest that loads the shared input once and computes every part.
Never legal: opaque ops, ops with side effects or seeded randomness, region nodes (an existing
``kiln.fused``, e.g. attention), two anchors in one component, a reduction in an epilogue, a prologue into
an anchor. ``attrs`` (the ``kiln.fused`` node's attributes) always hold ``kind`` and the loop sizes
(``numel``; reductions also ``rnumel``), all printable IR literals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kiln.ir.graph import Node, Value
from kiln.passes.fusion.classify import OpKind, iteration_numel, numel, shape, size_hint
from kiln.passes.fusion.kernels import KernelGraph

FUSION_KINDS = ("pointwise", "reduction", "epilogue", "horizontal")


@dataclass(frozen=True)
class Illegal:
    reason: str

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True)
class GroupPlan:
    kind: str
    attrs: dict[str, Any] = field(hash=False)
    parts: tuple[str, ...] = ()
    space: tuple = ()  # exact loop sizes: (N,) or (R, K); ``attrs`` spell a symbolic one as a string


def _size(n) -> int | str:
    return n if isinstance(n, int) else str(n)


@dataclass(frozen=True)
class StructureRule:
    """A recognised normalisation: the NORM combines (composites), the explicit reduction combines (a
    multiset) and the pointwise op packets that must all be in the group; explicit rules also need a
    reduced value broadcast back over the rows."""

    pattern: str
    structure: str
    composites: frozenset[str] = frozenset()
    reductions: tuple[str, ...] = ()
    pointwise: frozenset[str] = frozenset()


STRUCTURES: tuple[StructureRule, ...] = (
    StructureRule("log-softmax", "online-softmax", composites=frozenset({"log_softmax"})),
    StructureRule("softmax", "online-softmax", composites=frozenset({"softmax"})),
    StructureRule("layer-norm", "welford", composites=frozenset({"layer_norm"})),
    StructureRule("log-softmax", "online-softmax", reductions=("max", "sum"),
                  pointwise=frozenset({"aten.exp", "aten.log"})),
    StructureRule("softmax", "online-softmax", reductions=("max", "sum"), pointwise=frozenset({"aten.exp"})),
    StructureRule("layer-norm", "welford", reductions=("var_mean",), pointwise=frozenset({"aten.rsqrt"})),
    StructureRule("layer-norm", "welford", reductions=("mean", "var"), pointwise=frozenset({"aten.rsqrt"})),
    StructureRule("layer-norm", "welford", reductions=("mean", "mean"),
                  pointwise=frozenset({"aten.sub", "aten.rsqrt"})),
    StructureRule("rms-norm", "two-pass", reductions=("mean",), pointwise=frozenset({"aten.rsqrt"})),
)

_FUSIBLE = (OpKind.POINTWISE, OpKind.REDUCTION, OpKind.NORM, OpKind.ANCHOR)


def fusible(kg: KernelGraph, node: Node) -> bool:
    return kg.classes[node].kind in _FUSIBLE


def components(kg: KernelGraph, members: frozenset[Node]) -> list[list[Node]]:
    """Connected components of the members (edges between members, either direction), in graph order."""
    parent = {m: m for m in members}

    def find(x: Node) -> Node:
        while parent[x] is not x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for m in members:
        for p in kg.preds[m]:
            if p in members:
                parent[find(p)] = find(m)
    comps: dict[Node, list[Node]] = {}
    for m in sorted(members, key=kg.index.__getitem__):
        comps.setdefault(find(m), []).append(m)
    return sorted(comps.values(), key=lambda c: kg.index[c[0]])


def plan_group(kg: KernelGraph, members: frozenset[Node]) -> GroupPlan | Illegal:
    for m in members:
        if not fusible(kg, m):
            return Illegal(f"%{m.results[0].name if m.results else '?'} = {m.op.name} is opaque to fusion")
    comps = components(kg, members)
    plans = []
    for comp in comps:
        plan = _component_plan(kg, comp, members)
        if isinstance(plan, Illegal):
            return plan
        plans.append(plan)
    if len(plans) == 1:
        return plans[0]
    return _horizontal_plan(kg, comps, plans)


def _name(v: Value | Node) -> str:
    if isinstance(v, Node):
        return f"%{v.results[0].name} = {v.op.name}" if v.results else v.op.name
    return f"%{v.name}"


def _component_plan(kg: KernelGraph, comp: list[Node], members: frozenset[Node]) -> GroupPlan | Illegal:
    cls = kg.classes
    anchors = [n for n in comp if cls[n].kind is OpKind.ANCHOR]
    reducers = [n for n in comp if cls[n].reduces]
    escaping = kg.escaping(frozenset(comp))  # no edges between components: same as within ``members``
    if len(anchors) > 1:
        return Illegal(f"two extern anchors in one group: {_name(anchors[0])} and {_name(anchors[1])}")
    if anchors and reducers:
        return Illegal(f"a reduction ({_name(reducers[0])}) cannot join the epilogue of {_name(anchors[0])}")
    if anchors:
        anchor = anchors[0]
        inside = [p for p in kg.preds[anchor] if p in members]
        if inside:
            return Illegal(f"{_name(anchor)} is an extern kernel and takes no prologue ({_name(inside[0])})")
        n = iteration_numel(anchor)
        bad = [r for r in escaping if numel(r) != n]
        if bad:
            return Illegal(f"epilogue output {_name(bad[0])} has {numel(bad[0])} elements, the anchor's loop "
                           f"{n}")
        return GroupPlan("epilogue", {"kind": "epilogue", "anchor": anchor.op.name, "numel": _size(n)}, space=(n,))
    if reducers:
        return _reduction_plan(kg, comp, reducers, escaping)
    sizes = {numel(r) for r in escaping}
    if len(sizes) > 1:
        return Illegal(f"pointwise outputs over different iteration spaces: {sorted(sizes)} elements")
    n = sizes.pop() if sizes else max((iteration_numel(m) for m in comp), key=size_hint)
    return GroupPlan("pointwise", {"kind": "pointwise", "numel": _size(n)}, space=(n,))


def _reduction_plan(kg: KernelGraph, comp: list[Node], reducers: list[Node],
                    escaping: list[Value]) -> GroupPlan | Illegal:
    cls = kg.classes
    spaces = {kg.rows(r) for r in reducers}
    if len(spaces) > 1:
        return Illegal(f"reductions over different iteration spaces (rows, row size): {sorted(spaces)}")
    r_, k_ = spaces.pop()
    allowed = {r_, r_ * k_}
    bad = [v for v in escaping if numel(v) not in allowed]
    if bad:
        return Illegal(f"{_name(bad[0])} has {numel(bad[0])} elements; a reduction group over {r_} rows of "
                       f"{k_} writes only {r_} or {r_ * k_}")
    in_comp = frozenset(comp)
    for red in reducers:
        if cls[red].kind is not OpKind.REDUCTION:
            continue
        spaces_out = {iteration_numel(c) for r in red.results for c in kg.consumers.get(r, ()) if c in in_comp}
        if len(spaces_out) > 1:
            return Illegal(f"the output of {_name(red)} is used by consumers over different iteration spaces "
                           f"({sorted(spaces_out)} elements)")
    derived = _downstream(kg, reducers, in_comp)
    broadcast_back = False
    if size_hint(k_) > 1:
        for c in comp:
            if iteration_numel(c) != r_ * k_:
                continue
            for v in kg.ins[c]:
                if size_hint(numel(v)) >= size_hint(r_ * k_) or not any(s.producer in derived for s in kg.sources(v)):
                    continue
                if not _row_aligned(kg, v, c, reducers):
                    return Illegal(f"{_name(c)} reads the reduced value {_name(v)} over a non-row structure "
                                   f"(only trailing-dim reductions broadcast back along the reduced dims fuse)")
                broadcast_back = True
    rule = _match_structure(kg, comp, broadcast_back)
    attrs: dict[str, Any] = {"kind": "reduction"}
    if rule is not None:
        attrs["structure"] = rule.structure
        attrs["pattern"] = rule.pattern
    else:
        attrs["structure"] = "two-pass" if broadcast_back else "single-pass"
    attrs.update(numel=_size(r_), rnumel=_size(k_))
    return GroupPlan("reduction", attrs, space=(r_, k_))


def _downstream(kg: KernelGraph, roots: list[Node], within: frozenset[Node]) -> set[Node]:
    seen = set(roots)
    stack = list(roots)
    while stack:
        n = stack.pop()
        for s in kg.succs[n]:
            if s in within and s not in seen:
                seen.add(s)
                stack.append(s)
    return seen


def _row_aligned(kg: KernelGraph, v: Value, consumer: Node, reducers: list[Node]) -> bool:
    """``v`` (a reduced value) broadcasts onto ``consumer``'s loop along exactly the trailing reduced dims
    of some reduction over an input of the consumer's shape."""
    out = shape(consumer.results[0])
    vs = shape(v)
    if len(vs) > len(out):
        return False
    vs = (1,) * (len(out) - len(vs)) + vs
    for red in reducers:
        x = shape(red.inputs[0])
        dims = kg.reduced_dims(red)
        if x != out or not dims or dims != tuple(range(len(x) - len(dims), len(x))):
            continue
        if all(vs[i] == (1 if i in dims else x[i]) or (vs[i] == 1 and x[i] == 1) for i in range(len(x))):
            return True
    return False


def _match_structure(kg: KernelGraph, comp: list[Node], broadcast_back: bool) -> StructureRule | None:
    composites = {kg.classes[n].combine for n in comp if kg.classes[n].kind is OpKind.NORM}
    reductions = [kg.classes[n].combine for n in comp if kg.classes[n].kind is OpKind.REDUCTION]
    pointwise = {n.op.packet.name if n.op.packet else n.op.name for n in comp
                 if kg.classes[n].kind is OpKind.POINTWISE}
    for rule in STRUCTURES:
        if rule.composites:
            if rule.composites <= composites:
                return rule
            continue
        if not broadcast_back or not rule.pointwise <= pointwise:
            continue
        pool = list(reductions)
        try:
            for combine in rule.reductions:
                pool.remove(combine)
        except ValueError:
            continue
        return rule
    return None


def _loop(plan: GroupPlan):
    n = plan.space[0] * (plan.space[1] if len(plan.space) > 1 else 1)
    return n if isinstance(n, int) else n.expand()


def _horizontal_plan(kg: KernelGraph, comps: list[list[Node]], plans: list[GroupPlan]) -> GroupPlan | Illegal:
    kinds = tuple(p.kind for p in plans)
    if "epilogue" in kinds:
        if set(kinds) != {"epilogue"}:
            return Illegal("a horizontal group cannot mix extern anchors with generated loops")
        anchors = [next(n for n in comp if kg.classes[n].kind is OpKind.ANCHOR) for comp in comps]
        reason = _concat_compatible(kg, anchors)
        if reason is not None:
            return Illegal(reason)
        schedule = "concat-conv" if kg.classes[anchors[0]].concat_dim == 0 else "concat-gemm"
        return GroupPlan("horizontal", {"kind": "horizontal", "schedule": schedule, "parts": list(kinds),
                                        "anchor": anchors[0].op.name}, kinds)
    reductions = {p.space for p in plans if p.kind == "reduction"}
    loops = {_loop(p) for p in plans}
    if len(reductions) > 1 or len(loops) > 1:
        return Illegal(f"horizontal parts run over different loops: {[p.attrs for p in plans]}")
    attrs: dict[str, Any] = {"kind": "horizontal", "schedule": "shared-loop", "parts": list(kinds)}
    if reductions:
        space = reductions.pop()
        attrs.update(numel=_size(space[0]), rnumel=_size(space[1]))
    else:
        space = (loops.pop(),)
        attrs["numel"] = _size(space[0])
    return GroupPlan("horizontal", attrs, kinds, space)


def _static_args(node: Node) -> tuple:
    def strip(a):
        if isinstance(a, Value):
            return "%"
        if isinstance(a, (list, tuple)):
            return tuple(strip(x) for x in a)
        return a

    return strip(node.args), tuple(sorted((k, strip(v)) for k, v in node.kwargs.items()))


def _concat_compatible(kg: KernelGraph, anchors: list[Node]) -> str | None:
    first = anchors[0]
    cls = kg.classes[first]
    act = first.args[cls.operand]
    w0 = shape(first.args[cls.weight])
    for a in anchors[1:]:
        if a.op is not first.op:
            return f"horizontal anchors differ: {a.op.name} vs {first.op.name}"
        if a.args[cls.operand] is not act:
            return f"{_name(a)} and {_name(first)} do not read the same activation operand"
        w = shape(a.args[cls.weight])
        d = cls.concat_dim % len(w0) if w0 else 0
        if len(w) != len(w0) or any(x != y for i, (x, y) in enumerate(zip(w, w0)) if i != d):
            return f"weights {list(w)} and {list(w0)} cannot be concatenated along dim {d}"
        if _static_args(a) != _static_args(first):
            return f"{_name(a)} and {_name(first)} have different attributes (stride, padding, alpha...)"
    if cls.concat_dim == 0 and (first.args[6] or first.args[-1] != 1):
        return "transposed and grouped convolutions are not concatenated"
    return None
