"""The text form of kiln IR (printer side). ``kiln.ir.parser`` reads exactly what this writes.

Grammar (informal)::

    graph   := 'graph' '@'NAME '(' [%v ':' type, ...] ')' '->' '(' [type, ...] ')' '{' stmt* ret '}'
    stmt    := [%r, ... '='] OPNAME '(' [arg, ...] ')' [attrs] ':' types [graph]    # region last
    ret     := 'return' [%v, ...]
    type    := DTYPE '[' [dim, ...] ']' ['#' attrs] | scalar ['(' expr ')'] | 'none'
    arg     := [NAME '='] literal ;  literal := %v | int | float | 'true' | 'false' | 'none' | STRING
               | '[' literal, ... ']' | 'dtype(' DTYPE ')' | 'device(' STRING ')' | 'layout(' NAME ')'
               | 'memory_format(' NAME ')' | '{' NAME '=' literal, ... '}'

A dim is an integer or a sympy expression over symbols (``s0``, ``2*s0 + 1``). Weights appear only by
name (``kiln.weight() {name = "fc.weight"}``). Printing is deterministic: print(parse(print(g))) ==
print(g), which the tests check for every zoo model.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.types import DTYPES, NoneType, QuantParams, ScalarType, SparsityInfo, TensorType, Type

INDENT = "  "


def format_dim(d) -> str:
    return str(d)


def format_type(t: Type) -> str:
    if isinstance(t, TensorType):
        text = f"{DTYPES[t.dtype]}[{', '.join(format_dim(d) for d in t.shape)}]"
        ann: dict[str, Any] = {}
        if t.layout != "contiguous":
            ann["layout"] = t.layout
        if t.quant is not None:
            ann["quant"] = _dataclass_dict(t.quant)
        if t.sparsity is not None:
            ann["sparsity"] = _dataclass_dict(t.sparsity)
        if ann:
            text += " #" + format_attrs(ann)
        return text
    if isinstance(t, ScalarType):
        return t.kind if t.expr is None else f"{t.kind}({t.expr})"
    if isinstance(t, NoneType):
        return "none"
    raise TypeError(f"not a kiln type: {t!r}")


def _dataclass_dict(obj: QuantParams | SparsityInfo) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in obj.__dict__.items() if v is not None}


def format_literal(x: Any) -> str:
    if isinstance(x, Value):
        return f"%{x.name}"
    if x is None:
        return "none"
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return repr(x)
    if isinstance(x, str):
        return json.dumps(x)
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(format_literal(o) for o in x) + "]"
    if isinstance(x, dict):
        return format_attrs(x)
    if isinstance(x, torch.dtype):
        return f"dtype({DTYPES[x]})"
    if isinstance(x, torch.device):
        return f"device({json.dumps(str(x))})"
    if isinstance(x, torch.layout):
        return f"layout({str(x).removeprefix('torch.')})"
    if isinstance(x, torch.memory_format):
        return f"memory_format({str(x).removeprefix('torch.')})"
    raise TypeError(f"kiln IR text has no spelling for a {type(x).__name__}: {x!r}")


def format_attrs(attrs: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k} = {format_literal(v)}" for k, v in attrs.items()) + "}"


def format_node(node: Node, indent: str = INDENT) -> str:
    lhs = ", ".join(f"%{r.name}" for r in node.results)
    parts = [format_literal(a) for a in node.args]
    parts += [f"{k}={format_literal(v)}" for k, v in node.kwargs.items()]
    text = f"{indent}{lhs + ' = ' if lhs else ''}{node.op.name}({', '.join(parts)})"
    if node.attrs:
        text += " " + format_attrs(node.attrs)
    types = [format_type(r.type) for r in node.results]
    text += " : " + (types[0] if len(types) == 1 else "(" + ", ".join(types) + ")")
    if node.subgraph is not None:
        text += " " + print_graph(node.subgraph, indent + INDENT).lstrip()
    return text


def print_graph(graph: Graph, indent: str = "") -> str:
    params = ", ".join(f"%{v.name}: {format_type(v.type)}" for v in graph.inputs)
    rets = ", ".join(format_type(v.type) for v in graph.outputs)
    lines = [f"{indent}graph @{graph.name}({params}) -> ({rets}) {{"]
    lines += [format_node(n, indent + INDENT) for n in graph.nodes]
    outs = ", ".join(f"%{v.name}" for v in graph.outputs)
    lines.append(f"{indent}{INDENT}return{' ' + outs if outs else ''}")
    lines.append(f"{indent}}}")
    return "\n".join(lines)
