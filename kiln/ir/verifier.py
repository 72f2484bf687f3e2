"""The verifier: checks that a graph is well-formed kiln IR.

Contract: ``verify(graph, infer_types=True)`` returns None or raises ``VerificationError`` whose message
names the offending node (``%r = op``) and what is wrong. Checked, for the graph and every subgraph:
- SSA: every use is dominated by its definition (defined earlier in node order, or a graph input of
  *this* graph), names are unique, use lists are exact, outputs are defined;
- arity and argument kinds against the op's torch schema (positional count, required arguments,
  keyword names, tensor vs non-tensor arguments);
- types: declared result types equal the types inferred by running the op on fake tensors;
- kiln ops: ``kiln.weight`` has a ``name`` whose tensor (if attached) matches its type; region ops have
  a subgraph whose inputs and outputs match the node's argument and result types.
"""

from __future__ import annotations

from collections import Counter

import sympy

from kiln.errors import KilnError, VerificationError
from kiln.ir.graph import Graph, Node, Value, iter_values
from kiln.ir.infer import is_unbacked, type_of_example
from kiln.ir.ops import OpDef
from kiln.ir.printer import format_type
from kiln.ir.types import NoneType, ScalarType, TensorType, Type


def describe(node: Node) -> str:
    lhs = ", ".join(f"%{r.name}" for r in node.results)
    return f"node '{lhs + ' = ' if lhs else ''}{node.op.name}'"


def verify(graph: Graph, infer_types: bool = True) -> None:
    _verify_graph(graph, infer_types, path=f"@{graph.name}")


def _fail(path: str, node: Node | None, message: str):
    where = f"{path}: {describe(node)}: " if node is not None else f"{path}: "
    raise VerificationError(where + message, node)


def _verify_graph(graph: Graph, infer_types: bool, path: str) -> None:
    defined: set[int] = set()
    names: Counter[str] = Counter()
    for v in graph.inputs:
        if v.producer is not None:
            _fail(path, None, f"input %{v.name} has a producer")
        defined.add(id(v))
        names[v.name] += 1
    uses: Counter[int] = Counter()
    for node in graph.nodes:
        if not isinstance(node.op, OpDef):
            _fail(path, node, f"op is not an OpDef: {node.op!r}")
        if node.graph is not graph:
            _fail(path, node, "node does not belong to this graph")
        for v in node.inputs:
            if id(v) not in defined:
                origin = "another graph" if v.graph is not graph else "a later node or nowhere"
                _fail(path, node, f"uses %{v.name} before its definition (defined in {origin})")
            uses[id(v)] += 1
        for r in node.results:
            if r.producer is not node:
                _fail(path, node, f"result %{r.name} does not point back to its node")
            if not isinstance(r.type, (TensorType, ScalarType, NoneType)):
                _fail(path, node, f"result %{r.name} has no kiln type: {r.type!r}")
            names[r.name] += 1
            defined.add(id(r))
        _check_node(graph, node, infer_types, path)
    for v in graph.outputs:
        if id(v) not in defined:
            _fail(path, None, f"output %{v.name} is not defined in this graph")
    dup = [n for n, c in names.items() if c > 1]
    if dup:
        _fail(path, None, f"value name(s) defined more than once: {', '.join('%' + d for d in dup)}")
    for v in graph.values():
        if len(v.uses) != uses[id(v)]:
            _fail(path, v.producer, f"use list of %{v.name} is stale ({len(v.uses)} recorded, "
                                    f"{uses[id(v)]} real)")


def _check_node(graph: Graph, node: Node, infer_types: bool, path: str) -> None:
    op = node.op
    if op.name == "kiln.weight":
        if node.args or node.kwargs or not isinstance(node.attrs.get("name"), str):
            _fail(path, node, "kiln.weight takes no arguments and needs a string attribute 'name'")
        if len(node.results) != 1:
            _fail(path, node, "kiln.weight has exactly one result")
        tensor = graph.weights.get(node.attrs["name"])
        if tensor is not None and type_of_example(tensor).with_(layout=node.output.type.layout) \
                != node.output.type.with_(quant=None, sparsity=None):
            _fail(path, node, f"declared {format_type(node.output.type)} but the attached tensor is "
                              f"{format_type(type_of_example(tensor))}")
        return
    if op.schema is not None:
        _check_schema(node, path)
    if node.subgraph is not None:
        sub = node.subgraph
        ins = node.inputs
        if [v.type for v in ins] != [v.type for v in sub.inputs]:
            _fail(path, node, "argument types do not match the subgraph's input types")
        if [r.type for r in node.results] != [v.type for v in sub.outputs]:
            _fail(path, node, "result types do not match the subgraph's output types")
        _verify_graph(sub, infer_types, f"{path}/@{sub.name}")
        return
    if infer_types and op.infer_fn is not None:
        try:
            inferred = op.infer(node.args, node.kwargs, node.attrs, node.subgraph)
        except KilnError as e:
            _fail(path, node, str(e))
        declared = [r.type for r in node.results]
        if len(inferred) != len(declared):
            _fail(path, node, f"has {len(declared)} results but the op produces {len(inferred)}")
        for r, want in zip(node.results, inferred):
            if not _same_type(r.type, want):
                _fail(path, node, f"result %{r.name} is declared {format_type(r.type)} but the op "
                                  f"produces {format_type(want)}")


def _same_type(declared: Type, inferred: Type) -> bool:
    if isinstance(declared, TensorType) and isinstance(inferred, TensorType):
        # quantization/sparsity annotations are kiln's own; layout is advisory for the oracle;
        # a data-dependent dim (u0, from nonzero/.item()) is fresh at every inference: any name goes
        return declared.dtype == inferred.dtype and declared.rank == inferred.rank and all(
            d == i or (isinstance(i, sympy.Expr) and is_unbacked(i) and not isinstance(d, int))
            for d, i in zip(declared.shape, inferred.shape))
    if isinstance(declared, ScalarType) and isinstance(inferred, ScalarType):
        return declared.kind.removeprefix("sym") == inferred.kind.removeprefix("sym")
    return type(declared) is type(inferred)


def _check_schema(node: Node, path: str) -> None:
    schema = node.op.schema
    positional = [a for a in schema.arguments if not a.kwarg_only]
    if len(node.args) > len(positional):
        _fail(path, node, f"takes at most {len(positional)} positional arguments, got {len(node.args)}")
    by_name = {a.name: a for a in schema.arguments}
    for key in node.kwargs:
        if key not in by_name:
            _fail(path, node, f"unknown keyword argument '{key}' (schema: {schema})")
    given = {a.name: v for a, v in zip(positional, node.args)}
    for key, v in node.kwargs.items():
        if key in given:
            _fail(path, node, f"argument '{key}' given twice")
        given[key] = v
    for a in schema.arguments:
        if a.name not in given:
            if not a.has_default_value():
                _fail(path, node, f"missing required argument '{a.name}' (schema: {schema})")
            continue
        _check_arg_kind(node, path, a, given[a.name])


def _check_arg_kind(node: Node, path: str, arg, value) -> None:
    jt = arg.type
    kind = jt.kind()
    if kind == "OptionalType":
        if value is None:
            return
        jt = jt.getElementType()
        kind = jt.kind()
    is_tensor_value = isinstance(value, Value) and isinstance(value.type, TensorType)
    if kind == "TensorType":
        # ATen graphs pass Python numbers (and SymInts) where a 0-d tensor is meant: mul.Tensor(x, 0.5)
        is_number = isinstance(value, (int, float)) or (isinstance(value, Value)
                                                        and isinstance(value.type, ScalarType))
        if not (is_tensor_value or is_number):
            _fail(path, node, f"argument '{arg.name}' must be a tensor value, got {_show(value)}")
    elif kind == "ListType" and jt.getElementType().kind() in ("TensorType", "OptionalType"):
        if not isinstance(value, list):
            _fail(path, node, f"argument '{arg.name}' must be a list of tensors, got {_show(value)}")
        for item in value:
            if item is not None and not (isinstance(item, Value) and isinstance(item.type, TensorType)):
                _fail(path, node, f"argument '{arg.name}' must hold tensor values, got {_show(item)}")
    elif is_tensor_value and kind not in ("NumberType", "AnyType"):
        _fail(path, node, f"argument '{arg.name}' ({jt}) cannot be a tensor value")
    elif any(isinstance(v.type, TensorType) for v in iter_values(value)) and kind == "ListType":
        _fail(path, node, f"argument '{arg.name}' ({jt}) cannot hold tensor values")


def _show(value) -> str:
    if isinstance(value, Value):
        return f"%{value.name}: {format_type(value.type)}"
    return repr(value)
