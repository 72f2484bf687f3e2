"""Preparation for quantization: fold eval-mode BatchNorm into the convolution before it.

Contract: ``fold_batchnorm(graph) -> int`` rewrites every
``aten._native_batch_norm_legit_no_training(convolution(x, W, b), gamma, beta, mean, var, _, eps)``
whose convolution has a constant weight, is used only by that BatchNorm and whose BatchNorm statistics
results are unused, into one convolution with ``W' = W * gamma / sqrt(var + eps)`` (per output channel)
and ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``, stored as new weights ``<W>.bnfold`` /
``<W>.bnfold.bias`` (computed in float64, stored float32). Returns how many it folded; dead nodes and
weights are removed. BatchNorms that do not match stay as they are.
"""

from __future__ import annotations

import torch

from kiln.ir.builder import Builder
from kiln.ir.graph import Graph
from kiln.ir.ops import aten
from kiln.passes.dce import eliminate_dead_code
from kiln.passes.quantize.layers import constant_of, fresh_weight_name, root_weight


def fold_batchnorm(graph: Graph) -> int:
    folded = 0
    for bn in list(graph.nodes):
        if not bn.is_a(aten._native_batch_norm_legit_no_training) or bn.graph is not graph:
            continue
        x = bn.args[0]
        conv = x.producer
        if conv is None or not conv.is_a(aten.convolution) or len(x.uses) != 1:
            continue
        if any(r.uses for r in bn.results[1:]) or any(o in graph.outputs for o in bn.results[1:]):
            continue
        w = constant_of(conv.args[1])
        b = conv.args[2]
        bias = constant_of(b) if b is not None else None
        params = [constant_of(v) if v is not None else None for v in bn.args[1:5]]
        if w is None or (b is not None and bias is None) or params[2] is None or params[3] is None:
            continue
        gamma, beta, mean, var = params
        eps = float(bn.args[6])
        c = w.shape[0]
        gamma = gamma.double() if gamma is not None else torch.ones(c, dtype=torch.float64)
        beta = beta.double() if beta is not None else torch.zeros(c, dtype=torch.float64)
        factor = gamma / torch.sqrt(var.double() + eps)
        new_w = (w.double() * factor.reshape(-1, 1, 1, 1)).float().contiguous()
        old_b = bias.double() if bias is not None else torch.zeros(c, dtype=torch.float64)
        new_b = ((old_b - mean.double()) * factor + beta).float()
        base = root_weight(conv.args[1]) or conv.output.name
        b_ = Builder.before(conv)
        wv = b_.weight(fresh_weight_name(graph, f"{base}.bnfold"), new_w)
        bv = b_.weight(fresh_weight_name(graph, f"{base}.bnfold.bias"), new_b)
        args = list(conv.args)
        args[1], args[2] = wv, bv
        conv.set_args(tuple(args))
        graph.replace_all_uses(bn.results[0], conv.output)
        folded += 1
    if folded:
        eliminate_dead_code(graph)
    return folded
