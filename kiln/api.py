"""kiln's Python entry points: ``kiln.compile`` (offline, through torch.export) and ``CompiledModel``.

Contract:
- ``kiln.compile(model, example_inputs, target="reference", pipeline="O1", dynamic_shapes=None,
  **options) -> CompiledModel``: export -> kiln IR -> pass pipeline -> partition + backend compile.
  Options are validated like ``torch.compile(..., options=...)`` (``kiln.options``).
- ``CompiledModel(*inputs)`` checks the inputs against the graph's input types (count, dtype, static
  dims; symbolic dims must agree with each other) and raises ``KilnInputError`` naming the input, then
  returns outputs in the model's own structure. ``.graph`` is the optimized IR, ``.report`` the fallback
  report, ``.pass_records`` per-pass timings and changes (empty on a compile-cache hit).
- With ``compile_cache`` on (the default), ``kiln.compile`` first looks the model up in the compile cache
  (``kiln.runtime.compile_cache``): a hit loads the compiled program without exporting or compiling; a
  miss compiles and stores it. ``CompiledModel.cache`` says which ("hit", "stored", "off: <why>").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import sympy
import torch
import torch.utils._pytree as pytree

from kiln.backends.base import get_backend
from kiln.backends.driver import CompiledGraph, compile_graph
from kiln.errors import KilnInputError
from kiln.frontend.export import check_model, from_export
from kiln.ir.graph import Graph
from kiln.ir.printer import format_type
from kiln.ir.types import DTYPES, TensorType
from kiln.options import CompileOptions
from kiln.passes.manager import DumpIRInstrument, PassManager, VerifyInstrument, context_for, parse_pipeline

log = logging.getLogger("kiln")


class CompiledModel:
    def __init__(self, graph: Graph | None, compiled: CompiledGraph, out_spec=None, pass_records=None, *,
                 graph_loader: Callable[[], Graph] | None = None, graph_name: str | None = None,
                 inputs: list[tuple[str, Any]] | None = None, cache: str | None = None):
        self._graph, self._graph_loader = graph, graph_loader
        self.compiled = compiled
        self.out_spec = out_spec
        self.pass_records = list(pass_records or [])
        self.graph_name = graph_name if graph_name is not None else graph.name
        # (value name, type) per graph input: what calls are checked against, without the graph at hand
        self.inputs = inputs if inputs is not None else [(v.name, v.type) for v in graph.inputs]
        self.cache = cache  # the compile cache: "hit", "stored", "off: <why>" (None: not kiln.compile)

    @property
    def graph(self) -> Graph:
        """The optimized IR (a compile-cache hit parses it from the entry on first use)."""
        if self._graph is None:
            self._graph = self._graph_loader()
        return self._graph

    @property
    def report(self):
        return self.compiled.report

    def check_inputs(self, inputs: tuple) -> None:
        check_inputs(self.graph_name, self.inputs, inputs)

    def __call__(self, *args, **kwargs):
        flat = pytree.tree_leaves((args, kwargs))
        self.check_inputs(tuple(flat))
        outs = self.compiled(*flat)
        if self.out_spec is not None:
            return pytree.tree_unflatten(list(outs), self.out_spec)
        return outs[0] if len(outs) == 1 else outs


def check_inputs(graph_name: str, expected: list[tuple[str, Any]], inputs: tuple) -> None:
    """``inputs`` against a graph's (value name, type) inputs: count, dtype, rank, static dims, and equal
    values for each symbolic dim; ``KilnInputError`` names the input."""
    if len(inputs) != len(expected):
        sig = ", ".join(format_type(t) if t is not None else "?" for _, t in expected)
        raise KilnInputError(f"graph '{graph_name}' takes {len(expected)} input(s) ({sig}), "
                             f"got {len(inputs)}")
    bound: dict[sympy.Symbol, int] = {}
    for i, ((name, t), x) in enumerate(zip(expected, inputs)):
        if not isinstance(t, TensorType):
            continue
        want = format_type(t)
        if not isinstance(x, torch.Tensor):
            raise KilnInputError(f"input {i} (%{name}): expected a tensor {want}, got {type(x).__name__}")
        got = f"{DTYPES.get(x.dtype, x.dtype)}{list(x.shape)}"
        if x.dtype != t.dtype or x.dim() != t.rank:
            raise KilnInputError(f"input {i} (%{name}): expected {want}, got {got}")
        for d, s in zip(t.shape, x.shape):
            if isinstance(d, int):
                if d != s:
                    raise KilnInputError(f"input {i} (%{name}): expected {want}, got {got}")
            elif d.is_Symbol:
                if bound.setdefault(d, s) != s:
                    raise KilnInputError(f"input {i} (%{name}): dim {d} is {s} here but {bound[d]} "
                                         "in an earlier input")


def optimize(graph, opts: CompileOptions, dump_dir: str | None = None, calib_inputs: Any = None) -> list:
    """Run ``opts.pipeline`` on ``graph`` in place for ``opts.target`` (verifier and IR dumps as the options
    say; dumps go to ``dump_dir`` or ``opts.debug_dir``); returns the pass records. With ``opts.quantize``
    the ``quantize`` pass runs first, calibrated on ``calib_inputs`` (an input tuple or a list of them)."""
    from kiln.options import MIXED_BUDGET
    from kiln.passes.quantize import QuantizePass

    instruments = [VerifyInstrument()] if opts.verify else []
    if dump_dir or opts.debug_dir:
        instruments.append(DumpIRInstrument(dump_dir or opts.debug_dir))
    passes = parse_pipeline(opts.pipeline)
    if opts.quantize:
        if calib_inputs is None and opts.quantize in ("int8", "mixed"):
            raise KilnInputError(f"quantize={opts.quantize!r} calibrates on example inputs and none were given "
                                 "(torch.compile passes kiln none): use kiln.compile or `kiln compile`, or a "
                                 "scheme that needs no calibration data, int8-dynamic or int4-weight")
        passes = [QuantizePass(opts.quantize, awq=calib_inputs is not None,
                               budget=MIXED_BUDGET if opts.quantize == "mixed" else None), *passes]
    return PassManager(passes, instruments).run(graph, context_for(opts.target, calib_inputs=calib_inputs))


def compile(model: torch.nn.Module, example_inputs: Any, target: str = "reference", pipeline: str = "O1",
            dynamic_shapes=None, **options: Any) -> CompiledModel:
    from kiln.runtime.compile_cache import CompileCache

    opts = CompileOptions.from_dict({"target": target, "pipeline": pipeline, **options})
    get_backend(opts.target)  # a target that is not built yet fails before the (slow) export
    example_inputs = check_model(model, example_inputs)
    cache = CompileCache.for_options(opts)
    key, why = cache.key(model, example_inputs, opts, dynamic_shapes) if cache is not None else (None, "disabled")
    cm = cache.load(key) if key is not None else None
    if cm is not None:
        cm.cache = "hit"
    else:
        graph = from_export(model, example_inputs, dynamic_shapes=dynamic_shapes)
        records = optimize(graph, opts, calib_inputs=example_inputs)
        compiled = compile_graph(graph, opts.target, opts.backend_config(), example_inputs=example_inputs)
        cm = CompiledModel(graph, compiled, graph.meta.get("out_spec"), records)
        if key is not None:
            why = cache.store(key, cm, example_inputs)
        cm.cache = "stored" if key is not None and why is None else f"off: {why}"
        if key is not None and why is not None:
            log.info("kiln: compile cache: %s", why)
    if opts.check:
        from kiln.numerics import assert_match

        with torch.no_grad():
            assert_match(cm(*example_inputs), model(*example_inputs), "kiln.compile output")
    return cm
