"""The ``torch.compile(model, backend="kiln")`` entry point.

Contract: ``kiln_backend(gm, example_inputs, options=None)`` is registered under the
``torch_dynamo_backends`` entry point. Dynamo hands it an FX graph; AOTAutograd (with the core ATen
decompositions) turns that into ATen forward and backward graphs, each of which kiln imports, runs
through the pass pipeline and compiles for the target (``kiln.backends.driver``). So inference and
training steps both work. It never breaks a model: a graph kiln cannot import or compile runs as the
ATen graph AOTAutograd produced (eager PyTorch), unsupported ops inside a compiled graph fall back one
by one, and each fallback is logged and recorded (``kiln.fallback_reports()``). Invalid options are the
one thing that raises (``KilnInputError``), at compile time.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch

from kiln.backends.driver import FallbackReport, compile_graph
from kiln.errors import KilnInputError, first_line
from kiln.frontend.fx_import import import_fx, restore_outputs
from kiln.ir.verifier import verify
from kiln.options import CompileOptions

log = logging.getLogger("kiln")

REPORTS: list[FallbackReport] = []
_ids = itertools.count()


def fallback_reports() -> list[dict[str, Any]]:
    """Machine-readable record of every graph compiled through torch.compile in this process."""
    return [r.to_dict() for r in REPORTS]


def reset_reports() -> None:
    REPORTS.clear()


def kiln_backend(gm: torch.fx.GraphModule, example_inputs, options: dict[str, Any] | None = None, **kwargs):
    if kwargs:
        raise KilnInputError(f"kiln backend got unexpected argument(s) {sorted(kwargs)} "
                             "(use options={...}; mode= is not supported)")
    opts = CompileOptions.from_dict(options)
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.exc import RestartAnalysis, SkipFrame

    graph_id = next(_ids)

    def compiler(kind: str):
        return lambda fx_gm, inputs: compile_aten_graph(fx_gm, inputs, opts, f"{kind}{graph_id}")

    try:
        return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"),
                            inference_compiler=compiler("inference"),
                            decompositions=training_decompositions())(gm, example_inputs)
    except (RestartAnalysis, SkipFrame):  # Dynamo control flow (e.g. re-trace with tensorified floats)
        raise
    except Exception as e:  # AOTAutograd could not trace it: run Dynamo's graph as is
        reason = f"AOTAutograd failed: {type(e).__name__}: {first_line(e)}"
        _record(FallbackReport(f"dynamo{graph_id}", opts.target, reason=reason))
        return gm.forward


def training_decompositions() -> dict:
    """Core ATen decompositions, minus the ones measured to give wrong gradients.

    torch 2.13: decomposing ``_scaled_dot_product_flash_attention_for_cpu`` (SDPA on CPU) under
    AOTAutograd gives correct forward outputs but gradients off by ~200 (float64 reference, causal
    attention 2x4x16x8); kept whole, the op and its own backward kernel are exact. It stays one
    (attention) op in kiln IR, which is also what the fusion passes want.
    """
    from torch._decomp import core_aten_decompositions

    table = core_aten_decompositions()
    for op in (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,):
        table.pop(op, None)
    return table


def compile_aten_graph(fx_gm: torch.fx.GraphModule, inputs, opts: CompileOptions, name: str):
    """Compile one ATen graph from AOTAutograd; falls back to running it as is on any failure."""
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    try:
        # AOTAutograd calls compilers with Dynamo's fake mode active; kiln reads real constant tensors
        # (get_attr) and runs its own fake modes for type inference, so compile outside that mode.
        with unset_fake_temporarily():
            imported = import_fx(fx_gm, name)
            graph = imported.graph
            if opts.verify:
                verify(graph)
            from kiln.api import optimize

            optimize(graph, opts, f"{opts.debug_dir}/{name}" if opts.debug_dir else None)
            compiled = compile_graph(graph, opts.target, opts.backend_config())
    except KilnInputError:
        raise
    except Exception as e:  # import/pass/backend failure: correctness first, run the ATen graph
        _record(FallbackReport(name, opts.target, reason=f"{type(e).__name__}: {first_line(e)}"))
        return make_boxed_func(fx_gm.forward)
    _record(compiled.report)
    spec = imported.output_spec
    checked = not opts.check

    def run(*args):
        nonlocal checked
        outs = compiled(*args)
        if not checked:
            from kiln.numerics import assert_match

            with torch.no_grad():
                assert_match(list(outs), list(fx_gm(*args)), f"graph {name} output")
            checked = True
        return restore_outputs(spec, outs)

    return make_boxed_func(run)


def _record(report: FallbackReport) -> None:
    REPORTS.append(report)
    if report.reason is not None:  # op-level fallbacks were already logged by compile_graph
        log.warning(report.summary_line())

