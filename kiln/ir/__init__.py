"""kiln IR: typed SSA graphs over PyTorch's ATen ops plus kiln's own ops.

The names a pass writer needs, in one import::

    from kiln.ir import Graph, Node, Value, TensorType, Builder, aten, verify, print_graph, parse_graph, to_fx
"""

from kiln.ir import quant_ops  # noqa: F401  (registers kiln.quantize, kiln.qlinear...: the parser needs them)
from kiln.ir.builder import Builder
from kiln.ir.clone import clone_graph
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.ops import FUSED, PARTITION, WEIGHT, OpDef, OpPacket, aten, get_op, prims, register_kiln_op
from kiln.ir.parser import parse_graph
from kiln.ir.printer import print_graph
from kiln.ir.rewrite import Rewriter, apply_patterns, pattern
from kiln.ir.to_fx import to_fx
from kiln.ir.types import NoneType, QuantParams, ScalarType, SparsityInfo, TensorType, sym
from kiln.ir.verifier import verify

__all__ = ["Builder", "FUSED", "Graph", "Node", "NoneType", "OpDef", "OpPacket", "PARTITION", "QuantParams",
           "Rewriter", "ScalarType", "SparsityInfo", "TensorType", "Value", "WEIGHT", "apply_patterns", "aten",
           "clone_graph", "get_op", "parse_graph", "pattern", "prims", "print_graph", "register_kiln_op", "sym",
           "to_fx", "verify"]
