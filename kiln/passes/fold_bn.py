"""BatchNorm folding for inference graphs: ``conv -> BN`` and ``linear -> BN1d`` become one conv / addmm.

Contract (pass ``fold-bn``):
- Folds an inference-mode batch norm (``_native_batch_norm_legit_no_training``, what ``torch.export``
  gives for ``eval()`` models; also ``native_batch_norm``/``batch_norm``/``_native_batch_norm_legit_functional``
  /``_batch_norm_no_update`` with ``training=False``) into the node that produces its input:
  * ``aten.convolution`` (plain or transposed, any ``groups``): ``W' = W * s`` along the output-channel
    axis, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(running_var + eps)``;
  * ``aten.addmm(bias, x, mat2)`` / ``aten.mm(x, mat2)`` on a rank-2 ``(N, C)`` batch (``BatchNorm1d``
    after ``Linear``) whose ``mat2`` is a weight or ``permute``/``t`` of one: the columns of ``mat2`` are
    scaled and the result is an ``addmm`` with the folded bias (``beta``/``alpha`` must be 1).
- Only when legal: the producer's result has no reader but the batch norm (and is not a graph output);
  the batch norm's other results (saved statistics) are unread; its ``weight``/``bias`` (absent means 1/0),
  ``running_mean``/``running_var`` and the producer's weight and bias are ``kiln.weight`` constants (not
  graph inputs, as in AOTAutograd graphs); the batch norm does not promote the dtype. Training-mode
  batch norm never folds: its output uses batch statistics and updates the running ones. ``eps`` is read
  from the node; ``momentum`` only matters for running-stat updates, which an inference-mode batch norm
  does not do, so it does not enter the folded weights.
- Folded tensors are computed in float64 and cast back to the original weight's dtype (and strides);
  they become new ``kiln.weight`` tensors in ``graph.weights`` named ``<weight>.fold_bn.<n>`` /
  ``<weight>.fold_bn_bias.<n>`` (fresh names; the original tensors are never modified). Weight nodes
  left unread are erased and their tensors dropped from ``graph.weights`` when no node reads them.
- Result: the graph computes the same function up to float rounding; stats ``{"conv": n, "linear": m}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.infer import type_of_example
from kiln.ir.ops import WEIGHT, op_for_target
from kiln.passes.base import Pass, PassContext, PassResult, register_pass

ATEN = torch.ops.aten
# batch-norm ops that can run in inference mode; those without a ``training`` argument always do
_BATCH_NORMS = ("_native_batch_norm_legit_no_training", "native_batch_norm", "batch_norm",
                "_native_batch_norm_legit_functional", "_batch_norm_no_update")



def _is_weight(v: Any) -> bool:
    return isinstance(v, Value) and v.producer is not None and v.producer.op is WEIGHT


def _tensor_of(graph: Graph, weight: Value) -> torch.Tensor:
    return graph.weights[weight.producer.attrs["name"]]


def _only_reader(value: Value, reader: Node, graph: Graph) -> bool:
    return value.users == [reader] and len(value.uses) == 1 and all(o is not value for o in graph.outputs)


@dataclass
class _BatchNorm:
    """An inference-mode batch norm whose parameters are all constants."""

    node: Node
    scale: torch.Tensor  # float64, gamma / sqrt(var + eps)
    shift: torch.Tensor  # float64, beta - mean * scale

    def fold_bias(self, bias: torch.Tensor | None) -> torch.Tensor:
        b = torch.zeros_like(self.scale) if bias is None else bias.double()
        return b * self.scale + self.shift


def _constant_batch_norm(graph: Graph, node: Node) -> _BatchNorm | None:
    if node.op.packet is None or node.op.packet.op not in _BATCH_NORMS or node.op.side_effects:
        return None
    args = node.bound_args()
    if args.get("training", False):
        return None
    if any(r.uses or any(o is r for o in graph.outputs) for r in node.results[1:]):
        return None
    params = [args.get(k) for k in ("weight", "bias", "running_mean", "running_var")]
    if not all(_is_weight(p) for p in params[2:]) or not all(p is None or _is_weight(p) for p in params[:2]):
        return None
    if node.results[0].type.dtype != node.input(0).type.dtype:
        return None
    gamma, beta, mean, var = (None if p is None else _tensor_of(graph, p).double() for p in params)
    scale = (var + float(args["eps"])).rsqrt()
    if gamma is not None:
        scale = scale * gamma
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta
    return _BatchNorm(node, scale, shift)


def _fresh_weight(graph: Graph, base: str, tensor: torch.Tensor, index: int) -> Value:
    i = 0
    while f"{base}.{i}" in graph.weights:
        i += 1
    name = f"{base}.{i}"
    graph.weights[name] = tensor
    return graph.create_node(WEIGHT, (), {}, [type_of_example(tensor)], names=[name.replace(".", "_")],
                             attrs={"name": name}, index=index).output


def _cast_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` in ``like``'s dtype and strides (a weight keeps its memory format)."""
    out = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype)
    return out.copy_(value)


def _folded_params(graph: Graph, bn: _BatchNorm, weight: Value, folded: torch.Tensor, bias: Value | None,
                   index: int) -> tuple[Value, Value]:
    """New weight nodes (inserted at ``index``) for the folded weight and bias."""
    w = _tensor_of(graph, weight)
    b = None if bias is None else _tensor_of(graph, bias)
    wname = weight.producer.attrs["name"]
    bname = wname if bias is None else bias.producer.attrs["name"]
    new_w = _fresh_weight(graph, f"{wname}.fold_bn", _cast_like(folded, w), index)
    new_b = _fresh_weight(graph, f"{bname}.fold_bn_bias", bn.fold_bias(b).to(w.dtype if b is None else b.dtype),
                          index + 1)
    return new_w, new_b


def _fold_into_conv(graph: Graph, bn: _BatchNorm) -> bool:
    conv = bn.node.input(0).producer
    if conv is None or conv.op.target is not ATEN.convolution.default or len(conv.args) < 3:
        return False
    if not _only_reader(conv.output, bn.node, graph):
        return False
    args = conv.bound_args()
    weight, bias = args["weight"], args["bias"]
    if not _is_weight(weight) or not (bias is None or _is_weight(bias)):
        return False
    w = _tensor_of(graph, weight)
    groups, out_channels = int(args["groups"]), bn.scale.numel()
    if args["transposed"]:  # weight (in, out / groups, *k): output channel g * (out / groups) + j
        per_group = w.shape[1]
        scale = bn.scale.view(groups, 1, per_group, *[1] * (w.dim() - 2))
        folded = (w.double().reshape(groups, w.shape[0] // groups, *w.shape[1:]) * scale).reshape(w.shape)
    else:  # weight (out, in / groups, *k)
        folded = w.double() * bn.scale.view(out_channels, *[1] * (w.dim() - 1))
    new_w, new_b = _folded_params(graph, bn, weight, folded, bias, graph.index_of(conv))
    new_args = list(conv.args)
    new_args[1], new_args[2] = new_w, new_b
    new = graph.create_node(conv.op, new_args, conv.kwargs, names=[f"{conv.output.name}_bn"],
                            index=graph.index_of(conv) + 1)
    _replace(graph, bn.node, new.output, [conv])
    return True


def _constant_matrix(graph: Graph, mat2: Value) -> tuple[Value, bool] | None:
    """(the weight behind ``mat2``, whether ``mat2`` is its transpose) or None."""
    if _is_weight(mat2):
        return mat2, False
    p = mat2.producer
    if p is not None and len(mat2.uses) == 1 and _is_weight(p.inputs[0]) and p.inputs[0].type.rank == 2 and (
            p.op.target is ATEN.t.default
            or (p.op.target is ATEN.permute.default and [d % 2 for d in p.args[1]] == [1, 0])):
        return p.inputs[0], True
    return None


def _fold_into_linear(graph: Graph, bn: _BatchNorm) -> bool:
    mm = bn.node.input(0).producer
    if mm is None or mm.op.target not in (ATEN.addmm.default, ATEN.mm.default) or bn.node.input(0).type.rank != 2:
        return False
    if not _only_reader(mm.output, bn.node, graph):
        return False
    args = mm.bound_args()
    if mm.op.target is ATEN.addmm.default:
        bias = args["self"]
        if args["beta"] != 1 or args["alpha"] != 1 or not _is_weight(bias) or bias.type.rank != 1:
            return False
        mat1, mat2 = args["mat1"], args["mat2"]
    else:
        bias, mat1, mat2 = None, args["self"], args["mat2"]
    found = _constant_matrix(graph, mat2)
    if found is None:
        return False
    weight, transposed = found
    folded = _tensor_of(graph, weight).double() * (bn.scale.view(-1, 1) if transposed else bn.scale.view(1, -1))
    new_w, new_b = _folded_params(graph, bn, weight, folded, bias, graph.index_of(mm))
    new_mat2 = new_w
    dead = [mm]
    if transposed:
        old = mat2.producer
        new_mat2 = graph.create_node(old.op, (new_w, *old.args[1:]), old.kwargs, names=[mat2.name],
                                     index=graph.index_of(mm)).output
        dead.append(old)
    new = graph.create_node(op_for_target(ATEN.addmm.default), (new_b, mat1, new_mat2), {},
                            names=[f"{mm.output.name}_bn"], index=graph.index_of(mm) + 1)
    _replace(graph, bn.node, new.output, dead)
    return True


def _replace(graph: Graph, bn: Node, new: Value, dead: list[Node]) -> None:
    old_inputs = [v for n in [bn, *dead] for v in n.inputs]
    graph.replace_all_uses(bn.results[0], new)
    graph.erase_many([bn, *dead])
    for v in old_inputs:
        p = v.producer
        if p is not None and p.graph is graph and p.op is WEIGHT and not v.uses \
                and all(o is not v for o in graph.outputs):
            graph.erase(p)
            name = p.attrs["name"]
            if not any(n.op is WEIGHT and n.attrs["name"] == name for n in graph.nodes):
                graph.weights.pop(name, None)


def fold_batch_norms(graph: Graph) -> dict[str, int]:
    stats = {"conv": 0, "linear": 0}
    for node in list(graph.nodes):
        if node.graph is not graph:
            continue
        bn = _constant_batch_norm(graph, node)
        if bn is None:
            continue
        if _fold_into_conv(graph, bn):
            stats["conv"] += 1
        elif _fold_into_linear(graph, bn):
            stats["linear"] += 1
    return stats


@register_pass("fold-bn")
@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Fold inference-mode batch norms into the convolution or linear layer before them."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats = fold_batch_norms(graph)
        return PassResult(changed=sum(stats.values()) > 0, stats=stats)
