"""Import an ATen-level ``torch.fx`` graph into kiln IR — shared by every capture path.

Contract: ``import_fx(gm, name="main", weights=None) -> ImportResult``.
- ``gm`` holds ATen ops (core ATen after decomposition, or any registered op) with ``meta["val"]`` on
  nodes, as torch.export, AOTAutograd and make_fx produce; nodes without ``meta["val"]`` get their
  types inferred from fake tensors.
- ``weights`` maps placeholder names to ``(weight_name, tensor)``: those placeholders become
  ``kiln.weight`` nodes; every other placeholder becomes a graph input, in order. ``get_attr`` tensors
  become weights too.
- ``operator.getitem`` on a multi-result op selects that result; SymInt arithmetic becomes ``sym.*``.
- The fx output may hold None or Python numbers where AOTAutograd expects them: the IR outputs only the
  values, and ``ImportResult.output_spec`` records where the others go (see ``restore_outputs``).
- Anything kiln cannot represent (a Python callable that is not an op, an unsupported literal) raises
  ``UnsupportedError`` naming the fx node, so callers can fall back to eager.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from kiln.errors import KilnError, UnsupportedError
from kiln.ir.graph import Graph, Value
from kiln.ir.infer import type_of_example
from kiln.ir.ops import WEIGHT, UnknownOpError, op_for_target
from kiln.ir.types import Type, sym

_LITERALS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


@dataclass
class ImportResult:
    graph: Graph
    # One entry per fx output: ("value", i) -> graph.outputs[i]; ("const", x) -> the literal x.
    output_spec: list[tuple[str, Any]] = field(default_factory=list)


def restore_outputs(spec: list[tuple[str, Any]], values) -> list[Any]:
    """Rebuild the fx output list from the IR's flat outputs."""
    return [values[x] if kind == "value" else x for kind, x in spec]


def kiln_dim(s) -> Any:
    """A torch size (int or SymInt) as a kiln dim: an int or a sympy expr over kiln symbols."""
    if isinstance(s, int):
        return s
    expr = s.node.expr
    if expr.is_Integer:
        return int(expr)
    return expr.xreplace({f: sym(f.name) for f in expr.free_symbols})


def example_type(x: Any) -> Type:
    return type_of_example(x, back=kiln_dim)


def import_fx(gm: fx.GraphModule, name: str = "main",
              weights: dict[str, tuple[str, torch.Tensor]] | None = None) -> ImportResult:
    weights = weights or {}
    g = Graph(name)
    env: dict[fx.Node, Any] = {}
    result = ImportResult(g)

    def lookup(n: fx.Node):
        if n not in env:
            raise UnsupportedError(f"fx node {n.name} is used before it is defined")
        return env[n]

    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if n.name in weights:
                wname, tensor = weights[n.name]
                env[n] = _weight(g, wname, tensor, n.name)
            else:
                env[n] = g.add_input(_meta_type(n), n.name)
        elif n.op == "get_attr":
            tensor = _get_attr(gm, n.target)
            if not isinstance(tensor, torch.Tensor):
                raise UnsupportedError(f"fx node {n.name}: get_attr of a {type(tensor).__name__} "
                                       "(submodules/higher-order ops are not supported)")
            env[n] = _weight(g, n.target, tensor, n.name)
        elif n.op == "call_function":
            if n.target is operator.getitem and isinstance(n.args[0], fx.Node) \
                    and isinstance(env.get(n.args[0]), list):
                env[n] = env[n.args[0]][n.args[1]]
                continue
            env[n] = _import_call(g, n, lookup)
        elif n.op == "output":
            outs = n.args[0]
            outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
            values: list[Value] = []
            for o in outs:
                if isinstance(o, fx.Node):
                    result.output_spec.append(("value", len(values)))
                    values.append(lookup(o))
                elif isinstance(o, _LITERALS):
                    result.output_spec.append(("const", o))
                else:
                    raise UnsupportedError(f"graph output of type {type(o).__name__} is not supported")
            g.set_outputs(values)
        else:
            raise UnsupportedError(f"fx node {n.name}: '{n.op}' nodes are not supported; lower the "
                                   "graph to ATen first (torch.export or make_fx)")
    return result


def _get_attr(gm: fx.GraphModule, target: str):
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _weight(g: Graph, wname: str, tensor: torch.Tensor, hint: str) -> Value:
    tensor = tensor.detach()
    if wname in g.weights and g.weights[wname] is not tensor:
        raise KilnError(f"two different tensors are both named weight {wname!r}")
    g.weights[wname] = tensor
    return g.create_node(WEIGHT, (), {}, [example_type(tensor)], names=[hint],
                         attrs={"name": wname}).output


def _meta_type(n: fx.Node) -> Type:
    val = n.meta.get("val", n.meta.get("example_value"))
    if val is None and "tensor_meta" in n.meta:
        tm = n.meta["tensor_meta"]
        from kiln.ir.types import TensorType

        return TensorType(tuple(kiln_dim(s) for s in tm.shape), tm.dtype)
    if val is None:
        raise UnsupportedError(f"fx placeholder {n.name} has no example value (meta['val'])")
    try:
        return example_type(val)
    except KilnError as e:
        raise UnsupportedError(f"fx node {n.name}: {e}") from None


def _import_literal(x: Any, lookup, where: str) -> Any:
    if isinstance(x, fx.Node):
        v = lookup(x)
        if isinstance(v, list):
            raise UnsupportedError(f"{where}: a multi-result value is used without getitem")
        return v
    if isinstance(x, (list, tuple)):
        return [_import_literal(o, lookup, where) for o in x]
    if isinstance(x, _LITERALS):
        return x
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise UnsupportedError(f"{where}: a symbolic scalar literal without a producing node")
    raise UnsupportedError(f"{where}: argument of type {type(x).__name__} is not supported")


def _import_call(g: Graph, n: fx.Node, lookup) -> Any:
    try:
        op = op_for_target(n.target)
    except UnknownOpError as e:
        raise UnsupportedError(f"fx node {n.name}: {e}") from None
    where = f"fx node {n.name} ({op.name})"
    args = tuple(_import_literal(a, lookup, where) for a in n.args)
    kwargs = {k: _import_literal(a, lookup, where) for k, a in n.kwargs.items()}
    val = n.meta.get("val")
    types: list[Type] | None = None
    if val is not None:
        try:
            types = [example_type(x) for x in val] if op.multi_result else [example_type(val)]
        except KilnError as e:
            raise UnsupportedError(f"{where}: {e}") from None
    try:
        node = g.create_node(op, args, kwargs, types, names=_names(n, types, op))
    except KilnError as e:
        raise UnsupportedError(f"{where}: {e}") from None
    return list(node.results) if op.multi_result else node.output


def _names(n: fx.Node, types, op) -> list[str] | None:
    if types is None:
        return None
    if op.multi_result:
        return [f"{n.name}_{i}" for i in range(len(types))]
    return [n.name]

