"""Linear layers on MKL's pre-packed weights: the GEMMs PyTorch runs inside a tvm partition skip packing.

MKL's sgemm packs its B operand into its own blocked layout on every call; ``mkl._mkl_linear`` takes a
weight packed once (``mkl._mkl_reorder_linear_weight``, for a given number of rows), which is what
Inductor does with freezing on. Measured here (2 threads, under load from other jobs, so indicative):
128x512x2048 903 us packed against 1047 us for addmm, 8x512x2048 73 against 111, 64x512x512 120
against 144.

Contract:
- ``pack_linear_weights(graph, packs) -> int`` rewrites, in ``graph`` and its subgraphs, every
  ``aten.addmm(bias, x, w)`` (no ``beta``/``alpha``) and ``aten.mm(x, w)`` whose ``w`` is a float32
  ``[K, N]`` weight, ``x`` a float32 ``[M, K]`` value with static M, and ``bias`` (addmm) a float32
  weight of shape ``[N]``, into ``mkl._mkl_linear(x, packed, w_nk, bias, M)``: ``w_nk`` is the weight as
  ``[N, K]`` (row-major) and ``packed`` MKL's packing of it for M rows, both new ``kiln.weight`` tensors
  (``<name>.mkl_nk`` and ``<name>.mkl_packed_M``). ``packs`` shares the tensors between graphs (keyed by
  the weight's storage, view and M). Returns how many GEMMs were rewritten. Only for running: packed
  weights are opaque to everything but MKL, so the backend packs its own clone, never a saved graph.
- Does nothing (returns 0) where PyTorch was built without MKL.
- Results equal ``addmm``'s up to float32 summation order.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.ops import WEIGHT, get_op
from kiln.ir.types import TensorType

MKL_LINEAR = "mkl._mkl_linear"


def weight_tensor(v: Any) -> torch.Tensor | None:
    """The tensor of ``v`` when it is a ``kiln.weight``'s result, else None."""
    if isinstance(v, Value) and v.producer is not None and v.producer.op is WEIGHT:
        return v.graph.weights[v.producer.attrs["name"]]
    return None


def view_key(t: torch.Tensor) -> tuple:
    """The same data seen the same way: equal for every view of one storage with one offset, shape and
    strides (each fused group holds its own view object of a shared weight)."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype


def _static_f32(v: Any, rank: int) -> bool:
    t = getattr(v, "type", None)
    return (isinstance(t, TensorType) and t.dtype == torch.float32 and len(t.shape) == rank
            and all(isinstance(d, int) or getattr(d, "is_Integer", False) for d in t.shape))


def _operands(node: Node) -> tuple[Value, Value, Value | None] | None:
    """(x, w, bias) of a GEMM this module can rewrite, else None."""
    if node.kwargs:
        return None
    if node.op.name == "aten.mm" and len(node.args) == 2:
        (x, w), bias = node.args, None
    elif node.op.name == "aten.addmm" and len(node.args) == 3:
        bias, x, w = node.args
        if weight_tensor(bias) is None or not _static_f32(bias, 1):
            return None
    else:
        return None
    if weight_tensor(w) is None or not _static_f32(w, 2) or not _static_f32(x, 2):
        return None
    n = int(w.type.shape[1])
    if bias is not None and int(bias.type.shape[0]) != n:
        return None
    return x, w, bias


def mkl_pack(spec: dict, sources: list[torch.Tensor]) -> torch.Tensor:
    """MKL's packing of the [N, K] weight ``sources[0]`` for ``spec["rows"]`` rows; the tensor carries its
    recipe (``kiln_recipe``), so a flat plan stores the weight and packs it again on load."""
    packed = torch.ops.mkl._mkl_reorder_linear_weight(sources[0], int(spec["rows"]))
    packed.kiln_recipe = (mkl_pack, dict(spec), list(sources))
    return packed


def add_weight(graph: Graph, name: str, tensor: torch.Tensor, index: int) -> tuple[Value, int]:
    """A new ``kiln.weight`` ``name`` holding ``tensor`` at ``index``: (its value, the next index)."""
    graph.weights[name] = tensor
    node = graph.create_node(WEIGHT, (), {}, [TensorType(tuple(tensor.shape), tensor.dtype)], names=[name],
                             attrs={"name": name}, index=index)
    return node.output, index + 1


def pack_linear_weights(graph: Graph, packs: dict[tuple, tuple[torch.Tensor, torch.Tensor]]) -> int:
    if not torch.backends.mkl.is_available():
        return 0
    rewritten = 0
    for node in list(graph.nodes):
        if node.subgraph is not None:
            rewritten += pack_linear_weights(node.subgraph, packs)
            continue
        operands = _operands(node)
        if operands is None:
            continue
        x, w, bias = operands
        tensor, rows = weight_tensor(w), int(x.type.shape[0])
        name = w.producer.attrs["name"]
        key = (view_key(tensor), rows)
        if key not in packs:
            w_nk = tensor.t().contiguous()
            packs[key] = (w_nk, mkl_pack({"rows": rows}, [w_nk]))
        w_nk, packed = packs[key]
        index = graph.index_of(node)
        nk_value, index = add_weight(graph, f"{name}.mkl_nk", w_nk, index)
        packed_value, index = add_weight(graph, f"{name}.mkl_packed_{rows}", packed, index)
        new = graph.create_node(get_op(MKL_LINEAR), (x, packed_value, nk_value, bias, rows), {},
                                [node.output.type], names=[node.output.name + "_mkl"], index=index)
        graph.replace_all_uses(node.output, new.output)
        graph.erase(node)
        if not w.uses and all(o is not w for o in graph.outputs):
            graph.erase(w.producer)
        rewritten += 1
    return rewritten
