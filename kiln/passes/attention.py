"""Attention recognition: scaled-dot-product attention becomes one ``kiln.fused {kind = "attention"}`` node.

Contract (pass ``fuse-attention``):
- Recognises ``softmax(scale * Q @ K^T [+ mask | masked by a fill]) @ V`` in core ATen, as
  ``torch.export`` writes a hand-written attention and ``F.scaled_dot_product_attention``:
  * ``Q @ K^T`` and ``P @ V`` are ``aten.bmm`` (batched; leading dims merged by ``view``s) or ``aten.mm``;
    Q reaches the left operand and V the right one through batch-regrouping views (last two dims kept),
    no-op ``expand``s, ``clone``s and scalar ``mul``/``div``; K reaches the right operand the same way
    with exactly one transpose of its last two dims;
  * the scale is the product of every scalar ``mul``/``div`` on Q, K and the scores (before the mask);
  * the mask is one of: ``scores + M`` (``mask_kind = "additive"``), ``where(C, fill, scores)`` /
    ``masked_fill(scores, C, fill)`` (``"fill"``: True positions get ``mask_fill``), ``where(C, scores,
    fill)`` (``"keep"``: True positions keep their score, as SDPA's boolean ``attn_mask``);
  * softmax over the last dim: ``_softmax``, ``softmax.int``, ``_safe_softmax`` or the decomposed
    ``exp(x - amax(x)) / sum(...)`` (with or without the max), optionally followed by SDPA's guard that
    zeroes fully masked rows (``where(~any(x != -inf), 0, softmax)``) and dtype casts.
  Q, K, V (after the views) must share their leading (batch) dims, and the output is reshaped back to
  them. A single SDPA op (``aten.scaled_dot_product_attention``, ``_scaled_dot_product_flash_attention_for_cpu``
  and the other ``_scaled_dot_product_*_attention`` kernels) is wrapped on its own.
- Legality: every intermediate (scores, probabilities, views) is read only inside the group, so only
  the attention output leaves it (a flash kernel never materialises the scores), and the group is convex.
  Live dropout between softmax and ``@ V`` (``native_dropout`` in train mode, or a product with a
  random mask) is not fused: its RNG semantics are not a flash kernel's. An SDPA op's own ``dropout_p``
  is explicit and is recorded.
- A mask computed only from constants (weights, ``arange``/``full``...) is evaluated at compile time;
  if it is the top-left causal mask (``tril`` over L x S, as SDPA's ``is_causal``) then ``causal = true``
  and, where only this group reads it, its computation moves into the group.
- The group is outlined with ``outline_region`` (the reference runs its subgraph, so semantics are exact)
  with attrs: ``kind = "attention"``, ``form`` (``"decomposed"`` | ``"sdpa"``), ``q``/``k``/``v``/``mask``
  (index of that operand among the node's inputs; ``none`` when absent or a weight held inside the
  subgraph), ``mask_kind`` (``"none"`` | ``"additive"`` | ``"fill"`` | ``"keep"``), ``mask_fill`` (for
  fill/keep), ``causal`` (when true the mask operand, if any, equals the causal mask), ``scale`` (``none``:
  SDPA's default ``1/sqrt(E)`` with a symbolic E), ``dropout_p``, ``fully_masked_rows`` (``"zero"`` |
  ``"nan"``: what a row whose scores are all masked gives), ``softmax_dtype`` and ``outputs`` (the names
  of the node's results, e.g. ``["output", "logsumexp"]``). Other inputs only feed what the attrs describe.
- Stats: ``{"attention": fused, "sdpa": of which single ops, "skipped_dropout": n}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.ir.graph import Graph, Node, Value, map_values
from kiln.ir.ops import FUSED, WEIGHT
from kiln.ir.outline import cycle_witness, outline_region
from kiln.ir.types import TensorType
from kiln.passes.base import Pass, PassContext, PassResult, register_pass

ATEN = torch.ops.aten
_MATMULS = (ATEN.bmm.default, ATEN.mm.default)
_REGROUP_VIEWS = (ATEN.view.default, ATEN._unsafe_view.default, ATEN.reshape.default)
_SOFTMAXES = (ATEN._softmax.default, ATEN.softmax.int, ATEN._safe_softmax.default)
_SDPA_OPS = ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention")
_MAX_CONE = 64  # nodes evaluated to decide whether a constant mask is causal



def _target(node: Node | None):
    return None if node is None else node.op.target


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _tensor(v: Any) -> bool:
    return isinstance(v, Value) and isinstance(v.type, TensorType)


def _last_dim(node: Node, dim: Any) -> bool:
    rank = node.input(0).type.rank
    return isinstance(dim, int) and rank > 0 and dim % rank == rank - 1


# -- one step of a Q/K/V chain, a scores chain or a probabilities chain --------------------------------

def _regroup(node: Node) -> bool:
    """A view that only regroups leading dims: the last two dims stay as they are."""
    if _target(node) not in _REGROUP_VIEWS:
        return False
    src, out = node.input(0).type, node.output.type
    return src.rank >= 2 and out.rank >= 2 and src.shape[-2:] == out.shape[-2:]


def _noop(node: Node) -> bool:
    t = _target(node)
    if t in (ATEN.clone.default, ATEN.alias.default):
        return True
    return t is ATEN.expand.default and node.output.type.shape == node.input(0).type.shape


def _cast(node: Node) -> bool:
    return _target(node) is ATEN._to_copy.default and set(node.kwargs) <= {"dtype"} and len(node.args) == 1


def _scale_factor(node: Node) -> float | None:
    t = _target(node)
    if t not in (ATEN.mul.Tensor, ATEN.mul.Scalar, ATEN.div.Tensor, ATEN.div.Scalar) or len(node.args) != 2:
        return None
    x, c = node.args
    if not _tensor(x) or not _is_number(c) or node.output.type.dtype != x.type.dtype:
        return None
    if t in (ATEN.div.Tensor, ATEN.div.Scalar):
        return None if c == 0 else 1.0 / c
    return float(c)


def _transposes_last_two(node: Node) -> bool:
    t = _target(node)
    rank = node.output.type.rank
    if t is ATEN.t.default:
        return rank == 2
    if t is ATEN.permute.default:
        return [d % rank for d in node.args[1]] == [*range(rank - 2), rank - 1, rank - 2]
    if t is ATEN.transpose.int:
        return rank >= 2 and {node.args[1] % rank, node.args[2] % rank} == {rank - 2, rank - 1}
    return False


@dataclass
class _Operand:
    """The value a matmul operand was made from, the nodes in between and the scale they apply."""

    root: Value
    nodes: list[Node]
    scale: float
    transposed: bool


def _walk_operand(value: Value, consumer: Node, transposable: bool) -> _Operand:
    nodes: list[Node] = []
    scale, transposed = 1.0, False
    while value.users == [consumer] and value.producer is not None and value.producer.op is not WEIGHT:
        p = value.producer
        factor = _scale_factor(p)
        if _transposes_last_two(p):
            if not transposable or transposed:
                break
            transposed = True
        elif factor is not None:
            scale *= factor
        elif not (_regroup(p) or _noop(p)):
            break
        nodes.append(p)
        value, consumer = p.inputs[0], p
    return _Operand(value, nodes, scale, transposed)


# -- constants -------------------------------------------------------------------------------------------

def _constant_cone(value: Value) -> list[Node] | None:
    """The nodes computing ``value`` from weights and input-free ops, or None if it reads anything else."""
    cone: dict[Node, None] = {}
    stack = [value]
    while stack:
        v = stack.pop()
        p = v.producer
        if p is None:
            return None
        if p in cone:
            continue
        if p.op is not WEIGHT and (not p.op.is_torch_op or p.op.side_effects or p.op.nondeterministic
                                   or p.subgraph is not None):
            return None
        cone[p] = None
        if len(cone) > _MAX_CONE:
            return None
        stack.extend(p.inputs)
    return list(cone)


def _evaluate(graph: Graph, value: Value) -> torch.Tensor | None:
    cone = _constant_cone(value)
    if cone is None:
        return None
    env: dict[Value, Any] = {}
    with torch.no_grad():
        for node in sorted(cone, key=graph.index_of):
            if node.op is WEIGHT:
                env[node.output] = graph.weights[node.attrs["name"]]
                continue
            out = node.op.target(*map_values(node.args, env.__getitem__),
                                 **{k: map_values(a, env.__getitem__) for k, a in node.kwargs.items()})
            env.update(zip(node.results, out if node.op.multi_result else [out]))
    return env[value]


def _uniform_value(fill: Any, graph: Graph) -> float | None:
    if _is_number(fill):
        return float(fill)
    if not _tensor(fill):
        return None
    t = _evaluate(graph, fill)
    if t is None or t.numel() == 0 or not bool((t == t.flatten()[0]).all()):
        return None
    return float(t.flatten()[0])


# -- the scores chain: QK^T -> scale -> mask -> softmax input -----------------------------------------

@dataclass
class _Scores:
    qk: Node
    nodes: list[Node] = field(default_factory=list)
    scale: float = 1.0
    mask: Value | None = None
    mask_kind: str = "none"
    mask_fill: float | None = None
    fill: Value | None = None  # the fill operand, when a tensor
    masked_type: TensorType | None = None  # the scores' type where the mask applies


def _mask_step(node: Node, graph: Graph) -> list[tuple[Value, dict]]:
    """Ways ``node`` can be a mask step: (the scores operand, what the mask is)."""
    t = _target(node)
    out = node.output.type
    ways = []
    if t is ATEN.add.Tensor and node.kwargs.get("alpha", 1) == 1 and len(node.args) == 2:
        a, b = node.args
        for data, mask in ((a, b), (b, a)):
            if _tensor(data) and _tensor(mask) and data.type.shape == out.shape:
                ways.append((data, {"mask": mask, "mask_kind": "additive"}))
    elif t in (ATEN.where.self, ATEN.where.ScalarOther, ATEN.where.ScalarSelf):
        cond, a, b = node.args
        for data, fill, kind in ((b, a, "fill"), (a, b, "keep")):
            if _tensor(data) and data.type.shape == out.shape and not (_tensor(fill) and fill.type.shape == out.shape):
                value = _uniform_value(fill, graph)
                if value is not None:
                    ways.append((data, {"mask": cond, "mask_kind": kind, "mask_fill": value,
                                        "fill": fill if _tensor(fill) else None}))
    elif t in (ATEN.masked_fill.Scalar, ATEN.masked_fill.Tensor):
        data, cond, fill = node.args
        value = _uniform_value(fill, graph)
        if value is not None and _tensor(data):
            ways.append((data, {"mask": cond, "mask_kind": "fill", "mask_fill": value,
                                "fill": fill if _tensor(fill) else None}))
    return ways


def _walk_scores(value: Value, graph: Graph, masked: bool, scaled: bool) -> _Scores | None:
    """From the softmax input back to the Q @ K^T matmul."""
    p = value.producer
    if p is None:
        return None
    if _target(p) in _MATMULS:
        return _Scores(qk=p)
    factor = _scale_factor(p)
    if factor is not None:
        found = _walk_scores(p.inputs[0], graph, masked, True)
        if found is not None:
            found.nodes.append(p)
            found.scale *= factor
        return found
    if _regroup(p) or _noop(p) or _cast(p):
        found = _walk_scores(p.inputs[0], graph, masked, scaled)
        if found is not None:
            found.nodes.append(p)
        return found
    if masked or scaled:  # one mask, and the scale applies to the scores before it
        return None
    for data, mask in _mask_step(p, graph):
        found = _walk_scores(data, graph, True, False)
        if found is not None:
            found.nodes.append(p)
            found.masked_type = p.output.type
            for k, v in mask.items():
                setattr(found, k, v)
            return found
    return None


# -- softmax ---------------------------------------------------------------------------------------------

@dataclass
class _Softmax:
    input: Value
    output: Value
    nodes: list[Node]
    fully_masked_rows: str = "nan"


def _softmax_at(node: Node) -> _Softmax | None:
    t = _target(node)
    if t in _SOFTMAXES:
        if not _last_dim(node, node.args[1]):
            return None
        return _Softmax(node.input(0), node.output, [node],
                        "zero" if t is ATEN._safe_softmax.default else "nan")
    # decomposed: div(e, sum(e, [-1], keepdim)) with e = exp(x - amax(x, [-1], keepdim)) or exp(x)
    if t is not ATEN.div.Tensor or not all(_tensor(a) for a in node.args):
        return None
    e, s = node.args
    sp, ep = s.producer, e.producer
    if _target(sp) is not ATEN.sum.dim_IntList or sp.input(0) is not e or _target(ep) is not ATEN.exp.default:
        return None
    if not (len(sp.args[1]) == 1 and _last_dim(sp, sp.args[1][0]) and _keepdim(sp)):
        return None
    if sp.kwargs.get("dtype") is not None or set(e.users) != {sp, node}:
        return None
    nodes = [ep, sp, node]
    x = ep.input(0)
    sub = x.producer
    if _target(sub) is ATEN.sub.Tensor and len(sub.args) == 2 and _tensor(sub.args[1]):
        m = sub.args[1].producer
        if _target(m) is ATEN.amax.default and m.input(0) is sub.args[0] and len(m.args[1]) == 1 \
                and _last_dim(m, m.args[1][0]) and _keepdim(m) and x.users == [ep]:
            nodes[:0] = [m, sub]
            x = sub.args[0]
    return _Softmax(x, node.output, nodes)


def _keepdim(node: Node) -> bool:
    return bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))


def _producers(value: Value, targets: tuple) -> list[Node] | None:
    """The chain of producers of ``value`` applying ``targets`` in turn (nearest first), each on its first input."""
    chain = []
    for t in targets:
        p = value.producer
        if _target(p) is not t:
            return None
        chain.append(p)
        value = p.inputs[0]
    return chain


def _zero_masked_rows_guard(sm: _Softmax) -> list[Node] | None:
    """SDPA's guard ``where(~any(~(x == -inf), -1, keepdim), 0, p)`` after the softmax, if present."""
    for w in sm.output.users:
        if _target(w) is not ATEN.where.self or w.args[2] is not sm.output or not _tensor(w.args[1]):
            continue
        z = w.args[1].producer
        if _target(z) is not ATEN.full_like.default or z.args[0] is not sm.output or z.args[1] != 0:
            continue
        chain = _producers(w.args[0], (ATEN.logical_not.default, ATEN.any.dim, ATEN.logical_not.default,
                                       ATEN.eq.Scalar))
        if chain is None:
            continue
        any_, eq = chain[1], chain[3]
        if _last_dim(any_, any_.args[1]) and _keepdim(any_) and eq.args[0] is sm.input and eq.args[1] == -math.inf:
            return [*chain, z, w] if set(sm.output.users) == {w, z} else None
    return None


# -- the whole pattern -------------------------------------------------------------------------------------

@dataclass
class _Match:
    nodes: set[Node]
    output: Value
    roles: dict[str, Value | None]
    attrs: dict[str, Any]


class _Dropout(Exception):
    """Live dropout between the softmax and ``@ V``."""


def _is_random(value: Value) -> bool:
    cone, stack = set(), [value]
    while stack and len(cone) < _MAX_CONE:
        p = stack.pop().producer
        if p is None or p in cone:
            continue
        if p.op.nondeterministic:
            return True
        cone.add(p)
        stack.extend(p.inputs)
    return False


def _walk_probabilities(value: Value) -> tuple[Node, list[Node]] | None:
    """From the softmax output forward to the P @ V matmul (P its left operand)."""
    nodes: list[Node] = []
    while len(value.users) == 1:
        u = value.users[0]
        t = _target(u)
        if t in _MATMULS:
            return (u, nodes) if u.args[0] is value and u.args[1] is not value else None
        if t is ATEN.native_dropout.default:
            if u.args[2] is not False and u.args[1] != 0:
                raise _Dropout
            if u.results[1].uses:
                return None
            nodes.append(u)
            value = u.results[0]
            continue
        if t in (ATEN.mul.Tensor, ATEN.div.Tensor) and any(_tensor(a) and a is not value and _is_random(a)
                                                          for a in u.args):
            raise _Dropout
        if not (_regroup(u) or _noop(u) or _cast(u)) or u.args[0] is not value:
            return None
        nodes.append(u)
        value = u.output
    return None


def _match_decomposed(graph: Graph, node: Node) -> _Match | None:
    sm = _softmax_at(node)
    if sm is None:
        return None
    scores = _walk_scores(sm.input, graph, False, False)
    if scores is None:
        return None
    guard = _zero_masked_rows_guard(sm)
    p_out = guard[-1].output if guard else sm.output
    found = _walk_probabilities(p_out)
    if found is None:
        return None
    pv, p_nodes = found
    qk = scores.qk
    q = _walk_operand(qk.args[0], qk, transposable=False)
    k = _walk_operand(qk.args[1], qk, transposable=True)
    v = _walk_operand(pv.args[1], pv, transposable=False)
    if not k.transposed or qk.args[0] is qk.args[1]:
        return None
    nodes = [*q.nodes, *k.nodes, qk, *scores.nodes, *sm.nodes, *(guard or []), *p_nodes, *v.nodes, pv]
    # the output, reshaped back to Q's batch dims
    batch = q.root.type.shape[:-2]
    out = pv.output
    want = (*batch, q.root.type.shape[-2], v.root.type.shape[-1])
    while out.type.shape != want and len(out.users) == 1 and _regroup(out.users[0]):
        nodes.append(out.users[0])
        out = out.users[0].output
    shapes_ok = (
        out.type.shape == want
        and k.root.type.shape[:-2] == batch and v.root.type.shape[:-2] == batch
        and k.root.type.shape[-1] == q.root.type.shape[-1] and k.root.type.shape[-2] == v.root.type.shape[-2]
        and (scores.masked_type is None
             or scores.masked_type.shape == (*batch, q.root.type.shape[-2], k.root.type.shape[-2]))
        and q.root.type.dtype == k.root.type.dtype == v.root.type.dtype
    )
    if not shapes_ok:
        return None
    members = set(nodes)
    causal = False
    mask = scores.mask
    if mask is not None:
        causal = _is_causal(graph, scores, q.root.type.shape[-2], k.root.type.shape[-2])
        if causal:
            members |= _exclusive_cone(mask, members)
        if scores.fill is not None:
            members |= _exclusive_cone(scores.fill, members)
    if mask is not None and (mask.producer in members or (causal and mask.producer.op is WEIGHT)):
        mask = None  # the causal mask is computed (or held) inside the group
    attrs = {
        "form": "decomposed",
        "mask_kind": scores.mask_kind if mask is not None else "none",
        **({"mask_fill": scores.mask_fill} if mask is not None and scores.mask_fill is not None else {}),
        "causal": causal,
        "scale": q.scale * k.scale * scores.scale,
        "dropout_p": 0.0,
        "fully_masked_rows": "zero" if guard else sm.fully_masked_rows,
        "softmax_dtype": sm.output.type.dtype,
    }
    return _Match(members, out, {"q": q.root, "k": k.root, "v": v.root, "mask": mask}, attrs)


def _is_causal(graph: Graph, scores: _Scores, q_len: Any, kv_len: Any) -> bool:
    if not (isinstance(q_len, int) and isinstance(kv_len, int)):
        return False
    if scores.mask_kind != "additive" and scores.mask_fill != -math.inf:
        return False
    m = _evaluate(graph, scores.mask)
    if m is None or m.dim() > scores.masked_type.rank:
        return False
    keep = torch.ones(q_len, kv_len, dtype=torch.bool).tril()
    try:
        m = m.expand(*m.shape[:-2], q_len, kv_len)
    except RuntimeError:
        return False
    if scores.mask_kind == "additive":
        expected = torch.zeros(q_len, kv_len, dtype=m.dtype).masked_fill(~keep, -math.inf)
    else:
        expected = ~keep if scores.mask_kind == "fill" else keep
    return bool((m == expected).all())


def _exclusive_cone(value: Value, members: set[Node]) -> set[Node]:
    """The nodes computing ``value`` that only the group (plus them) reads; weights stay out."""
    inside: set[Node] = set()
    stack = [value.producer]
    while stack:
        p = stack.pop()
        if p is None or p.op is WEIGHT or p in inside or p in members:
            continue
        if all(u in members or u in inside for r in p.results for u in r.uses):
            inside.add(p)
            stack.extend(v.producer for v in p.inputs)
    return inside


def _match_sdpa(graph: Graph, node: Node) -> _Match | None:
    packet = node.op.packet
    if packet is None or packet.namespace != "aten" or packet.op not in _SDPA_OPS or node.op.side_effects:
        return None
    args = node.bound_args()
    if args.get("enable_gqa", False) or args.get("return_debug_mask", False):
        return None
    q, k, v = args["query"], args["key"], args["value"]
    mask = args.get("attn_mask", args.get("attn_bias"))
    scale = args.get("scale")
    head_dim = q.type.shape[-1]
    if scale is None and isinstance(head_dim, int):
        scale = 1.0 / math.sqrt(head_dim)
    kind = "none" if mask is None else ("keep" if mask.type.dtype == torch.bool else "additive")
    attrs = {
        "form": "sdpa",
        "mask_kind": kind,
        **({"mask_fill": -math.inf} if kind == "keep" else {}),
        "causal": bool(args.get("is_causal", False)),
        "scale": None if scale is None else float(scale),
        "dropout_p": float(args.get("dropout_p", 0.0)),
        "fully_masked_rows": "zero",
        "softmax_dtype": q.type.dtype,
    }
    return _Match({node}, node.results[0], {"q": q, "k": k, "v": v, "mask": mask}, attrs)


def _legal(graph: Graph, match: _Match) -> bool:
    outs = {id(o) for o in graph.outputs}
    if len(match.nodes) > 1:
        for n in match.nodes:
            for r in n.results:
                if r is not match.output and (id(r) in outs or any(u not in match.nodes for u in r.uses)):
                    return False
    return cycle_witness(match.nodes) is None


def _outline(graph: Graph, match: _Match, name: str) -> Node:
    escaping = [r for n in graph.nodes if n in match.nodes for r in n.results
                if any(o is r for o in graph.outputs) or any(u not in match.nodes for u in r.uses)]
    if len(match.nodes) == 1:
        (single,) = match.nodes
        names = [r.name for r in single.op.schema.returns]
        index = [single.results.index(r) for r in escaping]
        outputs = [names[i] or ("output" if i == 0 else f"result{i}") for i in index]
    else:
        outputs = ["output"]
    fused = outline_region(graph, match.nodes, FUSED, {"kind": "attention"}, name)
    roles = {role: _operand_ref(fused, v) for role, v in match.roles.items()}
    fused.attrs = {"kind": "attention", **roles, **match.attrs, "outputs": outputs}
    return fused


def _operand_ref(fused: Node, value: Value | None) -> int | str | None:
    """Where an operand is: its index among the node's inputs, or the name of a weight inside."""
    if value is None:
        return None
    if value.producer is not None and value.producer.op is WEIGHT:
        return value.producer.attrs["name"]
    return fused.inputs.index(value)


def _fresh_region_name(graph: Graph, used: set[str]) -> str:
    i = 0
    while f"attention_{i}" in used:
        i += 1
    used.add(f"attention_{i}")
    return f"attention_{i}"


def fuse_attention(graph: Graph) -> dict[str, int]:
    stats = {"attention": 0, "sdpa": 0, "skipped_dropout": 0}
    used = {n.subgraph.name for n in graph.nodes if n.subgraph is not None}
    for node in list(graph.nodes):
        if node.graph is not graph or node.subgraph is not None or not node.op.is_torch_op:
            continue
        try:
            match = _match_sdpa(graph, node) or _match_decomposed(graph, node)
        except _Dropout:
            stats["skipped_dropout"] += 1
            continue
        if match is None or not _legal(graph, match):
            continue
        _outline(graph, match, _fresh_region_name(graph, used))
        stats["attention"] += 1
        stats["sdpa"] += match.attrs["form"] == "sdpa"
    return stats


@register_pass("fuse-attention")
@dataclass(frozen=True)
class FuseAttention(Pass):
    """Outline scaled-dot-product attention (hand-written or SDPA) as one ``kiln.fused`` attention node."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats = fuse_attention(graph)
        return PassResult(changed=stats["attention"] > 0, stats=stats)
