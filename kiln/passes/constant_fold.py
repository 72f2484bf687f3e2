"""Constant folding: evaluate nodes whose every input is a weight, and store the result as a weight.

Contract: a node folds when it has at least one input, all its inputs are ``kiln.weight`` results, the
op is a pure deterministic torch op with static tensor results, and the folded tensors are not larger
than ``max_growth`` times its inputs (so folding never bloats an artifact, e.g. by materialising an
``expand``). The result is computed by PyTorch (exactly what the reference would compute) and becomes
``kiln.weight`` named ``<first weight>.<op>.<n>``. Inputs left unused are removed by ``dce``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.ir.graph import Graph, Node, map_values
from kiln.ir.infer import type_of_example
from kiln.ir.ops import WEIGHT
from kiln.ir.types import TensorType
from kiln.passes.base import Pass, PassContext, PassResult, register_pass


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


def fold_constants(graph: Graph, max_growth: float = 1.0) -> int:
    folded = 0
    for node in list(graph.nodes):
        if not _foldable(node, max_growth):
            continue
        args = map_values(node.args, lambda v: graph.weights[v.producer.attrs["name"]])
        kwargs = {k: map_values(a, lambda v: graph.weights[v.producer.attrs["name"]])
                  for k, a in node.kwargs.items()}
        with torch.no_grad():
            out = node.op.target(*args, **kwargs)
        outs = list(out) if node.op.multi_result else [out]
        base = node.inputs[0].producer.attrs["name"]
        index = graph.index_of(node)
        for r, tensor in zip(node.results, outs):
            tensor = tensor.contiguous() if r.type.layout == "contiguous" else tensor.clone()
            name = _fresh_weight_name(graph, f"{base}.{node.op.packet.op if node.op.packet else 'c'}")
            graph.weights[name] = tensor
            new = graph.create_node(WEIGHT, (), {}, [type_of_example(tensor).with_(layout=r.type.layout)],
                                    names=[r.name + "_c"], attrs={"name": name}, index=index)
            index += 1
            graph.replace_all_uses(r, new.output)
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
