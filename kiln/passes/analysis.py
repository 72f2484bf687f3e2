"""Cost analyses of kiln graphs: FLOPs, bytes moved, kernel count and intermediate memory traffic.

Contract (static shapes; a symbolic dim raises ``KilnError`` naming the value):
- ``node_cost(node) -> NodeCost``: ``flops`` from PyTorch's own FLOP formulas
  (``torch.utils.flop_counter``: matmul, conv, attention...) when the op has one; otherwise one op per
  element of the larger of its outputs and its largest input (pointwise ops and reductions alike).
  ``bytes_read``/``bytes_written``: the distinct tensor inputs and the outputs. View and metadata ops
  (``VIEW_OPS``, ``sym.*``, ``kiln.weight``) are not kernels and cost nothing. A region node
  (``kiln.fused``/``kiln.partition``) is one kernel: its FLOPs are its subgraph's, its bytes only its
  own inputs and outputs plus the weights its subgraph reads (outlining moves weight reads inside;
  intermediates stay on chip).
- ``graph_cost(graph) -> GraphCost``: totals, ``kernels`` (kernel nodes), and ``intermediate_bytes``:
  for every tensor a kernel writes and another kernel of the graph reads (through views), its bytes
  once for the write plus once per reading kernel — the part that kernel reads: a narrowing view
  (``select``, ``slice``, ``split``) reads only its elements, never more than the whole tensor (an
  ``expand`` reads the tensor once). Weights and graph inputs are not intermediates.
These are the numbers fusion decisions and roofline columns are made from.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.flop_counter import FlopCounterMode

from kiln.errors import KilnError
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.infer import run_on_fake
from kiln.ir.ops import WEIGHT
from kiln.ir.types import TensorType

VIEW_OPS = frozenset({
    "aten.view", "aten._unsafe_view", "aten.expand", "aten.permute", "aten.t", "aten.transpose.int",
    "aten.slice.Tensor", "aten.select.int", "aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze",
    "aten.unsqueeze", "aten.alias", "aten.as_strided", "aten.split.Tensor", "aten.split_with_sizes",
    "aten.unbind.int", "aten.sym_size.int", "aten.sym_numel", "aten.sym_stride.int", "aten.detach",
    "aten.lift_fresh_copy", "aten._assert_scalar", "aten.unfold",
})


@dataclass
class NodeCost:
    flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    is_kernel: bool = False

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


@dataclass
class GraphCost:
    flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    kernels: int = 0
    intermediate_bytes: int = 0

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


def is_kernel(node: Node) -> bool:
    if node.subgraph is not None:
        return True
    return not (node.op is WEIGHT or node.op.namespace == "sym" or node.op.name in VIEW_OPS)


def _nbytes(v: Value) -> int:
    t = v.type
    if not isinstance(t, TensorType):
        return 0
    n = t.nbytes()
    if not isinstance(n, int):
        raise KilnError(f"cost analysis needs static shapes; %{v.name} has type with symbolic dims {t.shape}")
    return n


def _numel(v: Value) -> int:
    return _nbytes(v) // max(v.type.dtype.itemsize, 1) if isinstance(v.type, TensorType) else 0


def _tensor_inputs(node: Node) -> list[Value]:
    return list(dict.fromkeys(v for v in node.inputs if isinstance(v.type, TensorType)))


def node_cost(node: Node) -> NodeCost:
    if not is_kernel(node):
        return NodeCost()
    ins = _tensor_inputs(node)
    outs = [r for r in node.results if isinstance(r.type, TensorType)]
    cost = NodeCost(bytes_read=sum(map(_nbytes, ins)), bytes_written=sum(map(_nbytes, outs)), is_kernel=True)
    if node.subgraph is not None:
        cost.flops = graph_cost(node.subgraph).flops
        cost.bytes_read += sum(_nbytes(n.output) for n in node.subgraph.nodes if n.op is WEIGHT)
        return cost
    if node.op.is_torch_op and node.op.target.overloadpacket in _flop_formulas():
        with FlopCounterMode(display=False) as counter:
            run_on_fake(node.op, node.args, node.kwargs)
        cost.flops = int(counter.get_total_flops())
    else:
        cost.flops = max([_numel(v) for v in ins + outs] or [0])
    return cost


def _flop_formulas():
    from torch.utils.flop_counter import flop_registry

    return flop_registry


def _base(v: Value) -> Value:
    """Follow views back to the tensor that owns the memory."""
    while v.producer is not None and not is_kernel(v.producer) and v.producer.op is not WEIGHT:
        ins = _tensor_inputs(v.producer)
        if not ins:
            break
        v = ins[0]
    return v


def graph_cost(graph: Graph) -> GraphCost:
    total = GraphCost()
    reads: dict[Value, dict[Node, int]] = {}  # tensor -> reading kernel -> bytes it reads of it
    for node in graph.nodes:
        c = node_cost(node)
        total.flops += c.flops
        total.bytes_read += c.bytes_read
        total.bytes_written += c.bytes_written
        if c.is_kernel:
            total.kernels += 1
            for v in _tensor_inputs(node):
                base = _base(v)
                by_node = reads.setdefault(base, {})
                by_node[node] = min(by_node.get(node, 0) + _nbytes(v), _nbytes(base))
    for value, by_node in reads.items():
        producer = value.producer
        if producer is not None and producer.op is not WEIGHT and is_kernel(producer):
            total.intermediate_bytes += _nbytes(value) + sum(by_node.values())
    return total

