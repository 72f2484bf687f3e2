"""Conversion of any kiln graph back to an executable ``torch.fx.GraphModule`` — the execution oracle.

Contract: ``to_fx(graph, submodules=None) -> GraphModule`` whose ``forward(*inputs)`` returns a tuple of
the graph's outputs. Torch ops become ``call_function`` nodes with the same overload, multi-result ops
are unpacked with ``operator.getitem``, ``kiln.weight`` becomes a ``get_attr`` of a buffer holding the
named tensor, and a node with a subgraph (``kiln.fused``/``kiln.partition``) becomes a ``call_module`` of
its own converted subgraph — or of ``submodules[node]`` when a backend supplies a compiled executable.
Symbolic-scalar ops call the Python operator they stand for. Nothing here approximates a semantics:
a kiln op means what PyTorch does.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx as fx

from kiln.errors import KilnError
from kiln.ir.graph import Graph, Node, Value, map_values


class _Root(torch.nn.Module):
    pass


class _CallableModule(torch.nn.Module):
    """Wraps a compiled executable so fx can ``call_module`` it."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def to_fx(graph: Graph, submodules: dict[Node, Callable] | None = None) -> fx.GraphModule:
    root = _Root()
    fg = fx.Graph()
    env: dict[Value, fx.Node] = {}
    counter = 0
    for v in graph.inputs:
        # the parameter gets fx's unique, legal spelling of the name: %0, %def or %torch are not
        env[v] = fg.placeholder("self_" if v.name == "self" else v.name)
        env[v].target = env[v].name
    for node in graph.nodes:
        if node.op.name == "kiln.weight":
            wname = node.attrs["name"]
            if wname not in graph.weights:
                raise KilnError(f"weight {wname!r} of %{node.output.name} has no tensor attached")
            attr = f"w{counter}_{_attr_name(wname)}"
            counter += 1
            root.register_buffer(attr, graph.weights[wname], persistent=False)
            env[node.output] = fg.get_attr(attr)
            continue
        args = map_values(node.args, env.__getitem__)
        kwargs = {k: map_values(a, env.__getitem__) for k, a in node.kwargs.items()}
        if node.subgraph is not None or (submodules and node in submodules):
            mod_name = f"sub{counter}_{_attr_name(node.results[0].name if node.results else 'x')}"
            counter += 1
            sub = submodules.get(node) if submodules else None
            root.add_module(mod_name, _CallableModule(sub) if sub is not None else to_fx(node.subgraph))
            call = fg.call_module(mod_name, tuple(args), kwargs)
            multi = True
        else:
            if node.op.target is None:
                raise KilnError(f"op {node.op.name} has no executable semantics; lower it before running")
            call = fg.call_function(node.op.target, tuple(args), kwargs)
            multi = node.op.multi_result
        if multi:
            for i, r in enumerate(node.results):
                env[r] = fg.call_function(operator.getitem, (call, i))
        elif node.results:
            env[node.results[0]] = call
    fg.output(tuple(env[v] for v in graph.outputs))
    gm = fx.GraphModule(root, fg, class_name=f"kiln_{_attr_name(graph.name)}")
    return gm


def _attr_name(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)
