"""Constant folding: evaluate nodes whose every input is a weight, and store the result as a weight.

Contract: a node folds when it has at least one input, all its inputs are ``kiln.weight`` results, the
op is a pure deterministic torch op with static tensor results, and the folded tensors are not larger
than ``max_growth`` times its inputs (so folding never bloats an artifact, e.g. by materialising an
``expand``). The result is computed by PyTorch (exactly what the reference would compute) and becomes
``kiln.weight`` named ``<first weight>.<op>.<n>``. Inputs left unused are removed by ``dce``. The same
computation on the same weights is folded once: its other occurrences read that weight too (an unrolled
RNN transposes its recurrent weight once per step; without this every step got its own copy, 128 copies
of a 4 MB weight per layer in the zoo's rnn).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.ir.graph import Graph, Node, map_values
from kiln.ir.infer import type_of_example
from kiln.ir.ops import WEIGHT
from kiln.ir.types import TensorType
from kiln.passes.base import Pass, PassContext, PassResult, register_pass
from kiln.passes.cse import structure_key


def _foldable(node: Node, max_growth: float) -> bool:
    op = node.op
    if not op.is_torch_op or op.side_effects or op.nondeterministic or node.subgraph is not None:
        return False
    ins = node.inputs
    if not ins or any(v.producer is None or v.producer.op is not WEIGHT for v in ins):
        return False
    if not node.results or not all(isinstance(r.type, TensorType) and r.type.is_static for r in node.results):
        return False
    in_bytes = sum(v.type.nbytes() for v in ins)
    out_bytes = sum(r.type.nbytes() for r in node.results)
    return out_bytes <= max_growth * max(in_bytes, 1)


def _computation_key(node: Node):
    """What a foldable node computes, with its weight inputs by name (cse's key otherwise)."""
    def by_name(v):
        return ("weight", v.producer.attrs["name"])
    return (node.op.name, structure_key(map_values(node.args, by_name)),
            structure_key({k: map_values(a, by_name) for k, a in node.kwargs.items()}), structure_key(node.attrs))


def fold_constants(graph: Graph, max_growth: float = 1.0) -> int:
    folded = 0
    done: dict = {}  # computation key -> the weight nodes of its results (read where it occurs again)
    for node in list(graph.nodes):
        if not _foldable(node, max_growth):
            continue
        key = _computation_key(node)
        if key in done:
            index = graph.index_of(node)
            for r, first in zip(node.results, done[key]):
                again = graph.create_node(WEIGHT, (), {}, [first.output.type], names=[r.name + "_c"],
                                          attrs={"name": first.attrs["name"]}, index=index)
                graph.replace_all_uses(r, again.output)
            graph.erase(node)
            folded += 1
            continue
        args = map_values(node.args, lambda v: graph.weights[v.producer.attrs["name"]])
        kwargs = {k: map_values(a, lambda v: graph.weights[v.producer.attrs["name"]])
                  for k, a in node.kwargs.items()}
        with torch.no_grad():
            out = node.op.target(*args, **kwargs)
        outs = list(out) if node.op.multi_result else [out]
        base = node.inputs[0].producer.attrs["name"]
        index = graph.index_of(node)
        created = []
        for r, tensor in zip(node.results, outs):
            tensor = tensor.contiguous() if r.type.layout == "contiguous" else tensor.clone()
            name = _fresh_weight_name(graph, f"{base}.{node.op.packet.op if node.op.packet else 'c'}")
            graph.weights[name] = tensor
            new = graph.create_node(WEIGHT, (), {}, [type_of_example(tensor).with_(layout=r.type.layout)],
                                    names=[r.name + "_c"], attrs={"name": name}, index=index)
            index += 1
            created.append(new)
            graph.replace_all_uses(r, new.output)
        done[key] = created
        graph.erase(node)
        folded += 1
    return folded


def _fresh_weight_name(graph: Graph, base: str) -> str:
    i = 0
    while f"{base}.{i}" in graph.weights:
        i += 1
    return f"{base}.{i}"


@register_pass("constant-fold")
@dataclass(frozen=True)
class ConstantFold(Pass):
    max_growth: float = 1.0

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        n = fold_constants(graph, self.max_growth)
        return PassResult(changed=n > 0, stats={"folded": n})
