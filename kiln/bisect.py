"""Find the first pass of a pipeline after which a model's outputs differ from eager, and write a reproducer.

Contract:
- ``bisect_pipeline(graph, inputs, expected, passes, scale=1.0) -> BisectResult``: ``graph`` is the
  imported graph before any pass (transformed in place), ``expected`` the eager model's outputs on
  ``inputs``, ``passes`` pass names (or ``Pass`` objects) in order. First the graph is checked as imported
  (a mismatch there is the frontend's, ``culprit="<import>"``, index -1); then each pass runs in turn,
  the verifier checks the IR and the graph runs through the reference executor (``to_fx``) and is compared
  with ``expected`` (``kiln.numerics.compare``, tolerances times ``scale``). The first pass that raises,
  leaves invalid IR, or changes the outputs beyond tolerance is the culprit (``kind``: "error",
  "verify" or "numerics"; ``message`` says what). Later passes do not run. ``before`` is a copy of
  the graph as the culprit received it; ``checked`` the number of passes run. No culprit: ``culprit``
  is None.
  This is a linear scan (each pass is checked once, in order), not a binary search: passes are cheap
  next to running the graph, a pass can only be judged on the output of all passes before it, and a
  later pass can hide an earlier one's error, so the first bad pass is only found by checking in order.
- ``write_reproducer(result, directory, plugins=(), model_ref=None) -> Path`` writes (atomically, replacing
  an earlier reproducer there): ``before.kir`` (the IR the culprit received), ``weights.safetensors``,
  ``inputs.safetensors`` (``input_0``...), ``expected.safetensors`` (eager outputs, ``output_0``...),
  ``bisect.json`` (pass, index, kind, message, tolerance scale, plugins, model ref, the strides of
  permuted weights such as folded transposes, versions) and
  ``repro.py``: a standalone script that imports the plugins, parses ``before.kir``, runs just that pass,
  and exits 1 if the pass still breaks the graph (printing the message), 0 if not. Nothing is pickled.
  The directory holds the IR *before* the pass, so the pass author can debug the pass alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from kiln.errors import KilnError, VerificationError
from kiln.ir.clone import clone_graph
from kiln.ir.graph import Graph
from kiln.passes.base import Pass, PassContext, get_pass

IMPORT = "<import>"


@dataclass
class BisectResult:
    culprit: str | None
    index: int | None
    kind: str | None
    message: str | None
    before: Graph | None
    inputs: tuple
    expected: Any
    passes: list[str]
    checked: int
    scale: float = 1.0


def check_graph(graph: Graph, inputs: tuple, expected: Any, scale: float = 1.0) -> tuple[str, str] | None:
    """(kind, message) if ``graph`` is invalid or its outputs differ from ``expected``; else None."""
    from kiln.ir.verifier import verify
    from kiln.numerics import compare
    from kiln.passes.manager import run_reference

    try:
        verify(graph)
    except VerificationError as e:
        return "verify", f"invalid IR: {e}"
    try:
        outputs = run_reference(graph, inputs)
    except Exception as e:  # an op the pass built wrongly fails at run time
        return "error", f"the graph fails to run: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    flat = pytree.tree_leaves(expected)
    msg = compare(list(outputs), flat, "output", scale)
    return None if msg is None else ("numerics", msg)


def run_one_pass(p: Pass, graph: Graph) -> None:
    from kiln.passes.base import PassResult

    result = p.run(graph, PassContext())
    if not isinstance(result, PassResult):
        raise KilnError(f"pass '{p.name}' returned {type(result).__name__}, expected PassResult")


def bisect_pipeline(graph: Graph, inputs: tuple, expected: Any, passes: list[str | Pass],
                    scale: float = 1.0) -> BisectResult:
    objs = [get_pass(p) if isinstance(p, str) else p for p in passes]
    names = [p.name for p in objs]
    result = BisectResult(None, None, None, None, None, tuple(inputs), expected, names, 0, scale)
    bad = check_graph(graph, inputs, expected, scale)
    if bad is not None:
        result.culprit, result.index, (result.kind, result.message) = IMPORT, -1, bad
        result.before = clone_graph(graph)
        return result
    for i, p in enumerate(objs):
        before = clone_graph(graph)
        result.checked = i + 1
        try:
            run_one_pass(p, graph)
            bad = check_graph(graph, inputs, expected, scale)
        except Exception as e:
            bad = ("error", f"the pass raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        if bad is not None:
            result.culprit, result.index, (result.kind, result.message) = p.name, i, bad
            result.before = before
            return result
    return result


REPRO = '''"""Reproducer written by `kiln bisect`: runs pass {name!r} alone on the IR it received.

Exit 0: the pass no longer breaks the graph; exit 1: it still does (the reason is printed).
Run from anywhere: python {script}
"""

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from kiln.bisect import check_graph, run_one_pass
from kiln.ir.parser import parse_graph
from kiln.passes.base import get_pass

HERE = Path(__file__).resolve().parent
info = json.loads((HERE / "bisect.json").read_text())
for plugin in info["plugins"]:  # modules that register the pass
    if plugin.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(plugin).stem, plugin)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        importlib.import_module(plugin)
weights = load_file(HERE / "weights.safetensors")
for wname, stride in info["weight_strides"].items():  # permuted layouts, e.g. constant-folded transposes
    t = weights[wname]
    weights[wname] = torch.empty_strided(tuple(t.shape), tuple(stride), dtype=t.dtype).copy_(t)
graph = parse_graph((HERE / "before.kir").read_text(), weights, source=str(HERE / "before.kir"))
inputs = load_file(HERE / "inputs.safetensors")
expected = load_file(HERE / "expected.safetensors")
inputs = tuple(inputs[f"input_{{i}}"] for i in range(len(inputs)))
expected = [expected[f"output_{{i}}"] for i in range(len(expected))]
if info["pass"] != "<import>":
    try:
        run_one_pass(get_pass(info["pass"]), graph)
        bad = check_graph(graph, inputs, expected, info["tolerance_scale"])
    except Exception as e:
        bad = ("error", f"the pass raised {{type(e).__name__}}: {{e}}")
else:
    bad = check_graph(graph, inputs, expected, info["tolerance_scale"])
if bad is None:
    print(f"pass {{info['pass']!r}}: outputs match eager now")
    sys.exit(0)
print(f"pass {{info['pass']!r}} still breaks the graph ({{bad[0]}}): {{bad[1]}}")
sys.exit(1)
'''


def _is_permuted_dense(t: torch.Tensor) -> bool:
    """Strides that are a permutation of a dense layout (what a folded transpose leaves)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: (p[1], p[0])):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def write_reproducer(result: BisectResult, directory: str | Path, plugins: list[str] | tuple = (),
                     model_ref: str | None = None) -> Path:
    import kiln
    from kiln.errors import ArtifactError
    from kiln.ir.printer import print_graph
    from kiln.runtime.files import atomic_dir

    if result.culprit is None or result.before is None:
        raise KilnError("nothing to reproduce: no pass changed the outputs")
    from safetensors.torch import save

    path = Path(directory)
    if path.exists() and not (path / "bisect.json").is_file() and (not path.is_dir() or any(path.iterdir())):
        raise ArtifactError(f"{path}: exists and is not a kiln bisect reproducer; refusing to replace it")
    g = result.before

    def tensors(prefix: str, values) -> bytes:
        return save({f"{prefix}_{i}": t.detach().contiguous().clone() for i, t in enumerate(values)})

    strides = {k: list(t.stride()) for k, t in sorted(g.weights.items())
               if not t.is_contiguous() and _is_permuted_dense(t)}
    info = {"pass": result.culprit, "index": result.index, "kind": result.kind, "message": result.message,
            "pipeline": result.passes, "tolerance_scale": result.scale, "plugins": list(plugins),
            "model_ref": model_ref, "weight_strides": strides, "kiln_version": kiln.__version__,
            "torch_version": torch.__version__}
    with atomic_dir(path) as tmp:
        (tmp / "before.kir").write_text(print_graph(g) + "\n", encoding="utf-8")
        (tmp / "weights.safetensors").write_bytes(
            save({k: t.detach().contiguous().clone() for k, t in sorted(g.weights.items())}))
        (tmp / "inputs.safetensors").write_bytes(tensors("input", result.inputs))
        (tmp / "expected.safetensors").write_bytes(tensors("output", pytree.tree_leaves(result.expected)))
        (tmp / "bisect.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / "repro.py").write_text(REPRO.format(name=result.culprit, script=path.resolve() / "repro.py"),
                                      encoding="utf-8")
    return path
