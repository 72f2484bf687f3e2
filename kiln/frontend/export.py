"""Capture through ``torch.export`` and ``fx.symbolic_trace``.

Contract:
- ``from_export(model_or_ep, example_inputs=(), dynamic_shapes=None, decompose=True) -> Graph``:
  exports (``strict=False``), runs ``run_decompositions()`` to core ATen, and imports. Parameters,
  buffers and lifted constants become ``kiln.weight`` nodes named by their fully qualified names.
  Buffer mutations (e.g. BatchNorm in train mode) raise ``UnsupportedError``: export in eval() mode.
- ``from_symbolic_trace(model, example_inputs) -> Graph``: ``fx.symbolic_trace`` for the torch-level
  graph, then ``make_fx`` in fake mode with the core ATen decompositions for ATen ops with shapes
  propagated to every node; parameters keep their names.
- Graph outputs are the model's flattened outputs; ``graph.meta["out_spec"]`` holds the pytree spec.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from kiln.errors import KilnInputError, UnsupportedError, first_line
from kiln.frontend.fx_import import import_fx
from kiln.ir.graph import Graph


def check_model(model: Any, example_inputs: Any) -> tuple:
    if not isinstance(model, torch.nn.Module):
        raise KilnInputError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise KilnInputError("example_inputs must be a tuple of tensors, got "
                             f"{type(example_inputs).__name__}")
    for i, x in enumerate(example_inputs):
        if not isinstance(x, (torch.Tensor, int, float, bool)):
            raise KilnInputError(f"example input {i} is a {type(x).__name__}; kiln takes tensors "
                                 "(and Python numbers, which are specialized)")
    return tuple(example_inputs)


def from_export(model, example_inputs: Any = (), dynamic_shapes=None, decompose: bool = True,
                name: str | None = None) -> Graph:
    if isinstance(model, torch.export.ExportedProgram):
        ep = model
    else:
        example_inputs = check_model(model, example_inputs)
        try:
            ep = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as e:  # torch raises many types; keep the first line, chain the rest
            raise KilnInputError(f"torch.export failed for {type(model).__name__}: "
                                 f"{type(e).__name__}: {first_line(e)}") from e
    if decompose:
        with warnings.catch_warnings():
            # torch 2.13 warns about its own pytree internals while deep-copying the call graph
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
            ep = ep.run_decompositions()
    return import_exported_program(ep, name or _model_name(model))


def import_exported_program(ep: torch.export.ExportedProgram, name: str = "main") -> Graph:
    from torch.export.graph_signature import InputKind, OutputKind

    sig = ep.graph_signature
    weights: dict[str, tuple[str, torch.Tensor]] = {}
    for spec in sig.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            tensor = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
            weights[spec.arg.name] = (spec.target, tensor)
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            weights[spec.arg.name] = (spec.target, ep.constants[spec.target])
        elif spec.kind != InputKind.USER_INPUT:
            raise UnsupportedError(f"exported input kind {spec.kind.name} ({spec.arg.name}) is not supported")
    mutations = [s for s in sig.output_specs if s.kind != OutputKind.USER_OUTPUT]
    if mutations:
        kinds = sorted({s.kind.name for s in mutations})
        raise UnsupportedError(f"the exported program mutates state ({', '.join(kinds)}, e.g. "
                               f"{mutations[0].target}); call model.eval() before exporting")
    result = import_fx(ep.graph_module, name, weights)
    result.graph.meta["out_spec"] = ep.call_spec.out_spec
    return result.graph


def from_symbolic_trace(model: torch.nn.Module, example_inputs: Any, name: str | None = None) -> Graph:
    from torch._decomp import core_aten_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    example_inputs = check_model(model, example_inputs)
    try:
        traced = fx.symbolic_trace(model)
    except Exception as e:
        raise KilnInputError(f"fx.symbolic_trace failed for {type(model).__name__}: {first_line(e)}") from e
    named = {**dict(traced.named_parameters()), **dict(traced.named_buffers())}
    names = list(named)
    out_spec: list = []

    def flat_forward(*flat):
        state = dict(zip(names, flat[:len(names)]))
        out = torch.func.functional_call(traced, state, flat[len(names):])
        leaves, spec = pytree.tree_flatten(out)
        out_spec[:] = [spec]
        return tuple(leaves)

    with torch.no_grad():
        aten_gm = make_fx(flat_forward, decomposition_table=core_aten_decompositions(),
                          tracing_mode="fake")(*named.values(), *example_inputs)
    placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    weights = {p.name: (wname, named[wname].detach()) for p, wname in zip(placeholders, names)}
    graph = import_fx(aten_gm, name or _model_name(model), weights).graph
    graph.meta["out_spec"] = out_spec[0] if out_spec else None
    return graph


def _model_name(model) -> str:
    return type(model).__name__.lower() if isinstance(model, torch.nn.Module) else "main"

