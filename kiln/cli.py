"""The ``kiln`` command line (console script ``kiln = kiln.cli:main``; also ``python -m kiln.cli``).

MODEL is ``MODULE:FACTORY`` or a saved ExportedProgram ``FILE.pt2``. ``MODULE`` is an importable module
name (the current directory is importable, as with ``python -m``) or a path to a ``.py`` file (imported
as part of its package when it sits in one). ``FACTORY`` is a callable returning ``(model,
example_inputs)`` or just a model, whose inputs then come from ``--example-inputs``. A factory with a
``size`` parameter gets ``--size``. The factory runs with the global torch RNG seeded to 0 (restored
afterwards), so it builds the same model each time; the model is put in eval mode. A ``.pt2`` file is
read with ``torch.export.load``, which unpickles parts of the file: it runs code from the file, so only
use ``.pt2`` files you trust as you would a Python script (kiln's own artifacts hold no pickles).
Its inputs are the program's saved example inputs unless ``--example-inputs`` gives others.

``--example-inputs SPEC``: ``DTYPE[d0,d1,...]`` per input, separated by ``;`` (``f32[2,8];i64[2,16]``;
dtypes in the IR spelling ``f32``/``i64``/... or torch's ``float32``/...). A dim is an integer, or a name
(``f32[batch,3,32,32]``, ``f32[s0=8,16]``): a symbolic dim, exported as a dynamic dim shared by every
input that names it; its example size is the number after ``=`` (default 4; at least 2, since
torch.export specializes sizes 0 and 1). Floats are seeded ``randn``, integers and bools zeros.

``--plugin FILE.py|MODULE`` (any command that builds a model, repeatable) imports a module before
anything else, so the passes it registers (``@register_pass``) can be named in ``-O``.

Commands:
- ``kiln compile MODEL [--target/--backend T] [-O P] [--size] [--example-inputs] [--cache-dir D]
  [--quantize S] [--prune F] [--tune-trials N] -o OUT``: compile and write a portable artifact
  (``kiln.runtime.artifact``) holding the example inputs too; prints a short summary. ``--cache-dir``
  sets ``$KILN_CACHE_DIR`` for this run (compiled-kernel and tuning caches live under it).
  ``--quantize`` quantizes first, calibrated on the example inputs; ``--tune-trials`` tunes the ``tvm``
  target's kernels; ``--prune`` is checked, then refused (exit 2) until its issue lands
  (``kiln.options.NOT_IMPLEMENTED``).
- ``kiln run OUT [--inputs FILE.safetensors] [--check]``: load the artifact, run it on its stored inputs
  (or on FILE's tensors, named ``input_0``... or by graph input name) and print each output's type and
  checksum. ``--check`` rebuilds the model from the manifest's model ref, runs it eagerly and compares
  (a quantized artifact is compared with its quantized graph run by the reference, and its distance
  from the float model is printed as quantization error).
- ``kiln bench MODEL [--target T ...] [--no-inductor] [--reps N] [--warmup N] [--json PATH]``: eager vs
  Inductor vs kiln on one model, one process (``kiln.report.bench``, the code of ``benchmarks/e2e.py``).
- ``kiln explain MODEL -o report.html [-O P] [--target T] [--arena M] [--no-measure]``: a
  self-contained HTML report (``kiln.report``).
- ``kiln bisect MODEL -O P [-o DIR]``: the first pass after which outputs differ from eager, and a
  reproducer in DIR (``kiln.bisect``).

Exit codes: 0 success; 1 ``run --check`` found a mismatch, or ``bisect`` found a bad pass; 2 an error
the user can fix (bad argument, missing file, any ``KilnError``): one line ``kiln: error: ...`` on
stderr, with the traceback only under ``--debug`` (``kiln --debug CMD`` or ``CMD --debug``); 3 an
internal error (a bug in kiln). ``$KILN_LOGS`` (``kiln.logs``) switches logging areas on.

``main(argv=None) -> int`` is the entry point. Commands reuse ``load_model`` (-> ``ModelBundle``),
``parse_input_spec`` / ``make_inputs`` and ``import_graph`` / ``compile_bundle``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import click

from kiln.errors import KilnError, KilnInputError

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
SIZES = ("small", "bench")
DEFAULT_SYMBOLIC_SIZE = 4


@dataclass
class _State:
    debug: bool = False


# -- models: MODULE:FACTORY or FILE.pt2 ----------------------------------------------------------

@dataclass
class LoadedFactory:
    ref: str  # the reference to record: an absolute path for files, else as given
    module: Any
    factory: Any
    accepts_size: bool


def load_factory(ref: str) -> LoadedFactory:
    """Import ``MODULE:FACTORY``; raises ``KilnInputError`` naming what is wrong."""
    module_part, sep, attr = ref.rpartition(":")
    if not sep or not module_part or not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise KilnInputError(f"bad model reference {ref!r}: expected MODULE:FACTORY or FILE.pt2, e.g. "
                             "examples/models/mlp.py:make_model or examples.models.mlp:make_model")
    if _looks_like_path(module_part):
        path = Path(module_part)
        if not path.is_file():
            raise KilnInputError(f"{module_part}: no such file")
        module = _import_file(path.resolve())
        record = f"{path.resolve()}:{attr}"
    else:
        if not all(p.isidentifier() for p in module_part.split(".")):
            raise KilnInputError(f"bad module name {module_part!r} in {ref!r}: expected a dotted module "
                                 "name or a path to a .py file")
        _cwd_importable()
        module = _import_module(module_part)
        record = ref
    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = module_part if i == 0 else f"{module_part}:{'.'.join(attr.split('.')[:i])}"
            hint = ""
            if i == 0:
                makers = sorted(n for n in vars(module) if n.startswith("make") and callable(vars(module)[n]))
                hint = f"; callables named make*: {', '.join(makers)}" if makers else ""
            raise KilnInputError(f"{where} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise KilnInputError(f"{ref}: {attr} is a {type(obj).__name__}, not a callable factory")
    try:
        params = inspect.signature(obj).parameters
        accepts_size = "size" in params
    except (TypeError, ValueError):
        accepts_size = False
    return LoadedFactory(record, module, obj, accepts_size)


def _cwd_importable() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path:  # like `python -m`: modules in the current directory are importable
        sys.path.insert(0, cwd)


def _looks_like_path(text: str) -> bool:
    return text.endswith(".py") or "/" in text or os.sep in text


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise KilnInputError(f"cannot import module {name!r}: no module named {e.name!r}") from e
        raise KilnInputError(f"importing {name} failed: {type(e).__name__}: {e}") from e
    except KilnError:
        raise
    except Exception as e:
        raise KilnInputError(f"importing {name} failed: {type(e).__name__}: {_one_line(e)}") from e


def _import_file(path: Path):
    """Import a .py file, as part of its package if its directory has an ``__init__.py``."""
    parts = [path.stem]
    root = path.parent
    while (root / "__init__.py").is_file():
        parts.insert(0, root.name)
        root = root.parent
    if len(parts) > 1 and all(p.isidentifier() for p in parts):
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        name = ".".join(parts)
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if not (e.name and (name == e.name or name.startswith(e.name + "."))):
                raise KilnInputError(f"importing {path} failed: {type(e).__name__}: {e}") from e
            module = None  # a package of the same name shadows it (see below)
        except KilnError:
            raise
        except Exception as e:
            raise KilnInputError(f"importing {path} failed: {type(e).__name__}: {_one_line(e)}") from e
        if module is not None and Path(getattr(module, "__file__", "") or "").resolve() == path:
            return module
        # another package of the same name shadows it: fall back to importing the file on its own
    name = f"_kiln_user_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    if str(path.parent) not in sys.path:  # like running the script: its siblings are importable
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise KilnInputError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except KilnError:
        del sys.modules[name]
        raise
    except Exception as e:
        del sys.modules[name]
        raise KilnInputError(f"importing {path} failed: {type(e).__name__}: {_one_line(e)}") from e
    return module


def load_plugin(ref: str):
    """Import a plugin (a ``.py`` path or a module name) so the passes it registers can be used."""
    try:
        if _looks_like_path(ref):
            path = Path(ref)
            if not path.is_file():
                raise KilnInputError(f"no such file: {ref}")
            return _import_file(path.resolve())
        if not all(p.isidentifier() for p in ref.split(".")):
            raise KilnInputError(f"expected a .py file or a dotted module name, got {ref!r}")
        _cwd_importable()
        return _import_module(ref)
    except KilnError as e:
        raise KilnInputError(f"--plugin {ref}: {_one_line(e)}") from e


@dataclass
class ModelBundle:
    """What a command needs about MODEL: the eager model, its inputs and how to rebuild it."""

    model: Any
    inputs: tuple
    ref: str  # recorded in manifests: an absolute path for files
    model_args: dict[str, Any] = field(default_factory=dict)
    dynamic_shapes: tuple | None = None
    exported: Any = None  # the ExportedProgram of a .pt2 MODEL


def load_model(ref: str, size: str | None = None, input_spec: str | None = None,
               *, size_given: bool = False) -> ModelBundle:
    """Build the model and its inputs from ``MODULE:FACTORY`` or ``FILE.pt2``.

    ``size`` is passed when the factory takes a ``size`` parameter (an explicit ``size_given`` size for
    a factory without one is an error). ``input_spec`` (``f32[s0,8];i64[s0,16]``) gives or overrides the
    inputs, and its named dims become dynamic dims. ``model_args`` records what was passed, so the model
    can be rebuilt (``kiln run --check``).
    """
    import torch

    specs = parse_input_spec(input_spec) if input_spec is not None else None
    if ref.endswith(".pt2") and ":" not in Path(ref).name:
        bundle = _load_exported_program(ref, size_given)
    else:
        bundle = _load_from_factory(ref, size, size_given)
    if specs is not None:
        bundle.inputs = make_inputs(specs)
        bundle.dynamic_shapes = dynamic_shapes_for(specs)
        bundle.model_args["example_inputs"] = input_spec
    elif bundle.inputs is None:
        raise KilnInputError(f"{ref}: the factory returned only a model; give its inputs with "
                             "--example-inputs, e.g. --example-inputs 'f32[2,8]'")
    inputs = bundle.inputs
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise KilnInputError(f"{ref}: example inputs must be a tensor or a tuple of tensors, got "
                             f"{type(inputs).__name__}")
    bundle.inputs = tuple(inputs)
    if bundle.exported is None:
        bundle.model.eval()
    return bundle


def _load_from_factory(ref: str, size: str | None, size_given: bool) -> ModelBundle:
    import torch

    loaded = load_factory(ref)
    kwargs: dict[str, Any] = {}
    if loaded.accepts_size:
        kwargs["size"] = size or "small"
    elif size_given:
        raise KilnInputError(f"{ref}: the factory takes no 'size' parameter; drop --size")
    try:
        with torch.random.fork_rng(devices=[]):  # a factory that draws from the global RNG builds the same
            torch.manual_seed(0)                 # model every time (so `kiln run --check` can rebuild it)
            result = loaded.factory(**kwargs)
    except Exception as e:
        raise KilnInputError(f"{ref}: the factory raised {type(e).__name__}: {_one_line(e)}") from e
    if isinstance(result, torch.nn.Module):
        model, inputs = result, None
    elif isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        model, inputs = result
    else:
        raise KilnInputError(f"{ref}: the factory returned a {type(result).__name__}; expected "
                             "(model, example_inputs) or a torch.nn.Module")
    return ModelBundle(model, inputs, loaded.ref, dict(kwargs))


def _load_exported_program(ref: str, size_given: bool) -> ModelBundle:
    import torch

    path = Path(ref)
    if size_given:
        raise KilnInputError(f"{ref}: a saved ExportedProgram takes no --size")
    if not path.is_file():
        raise KilnInputError(f"{ref}: no such file")
    try:
        ep = torch.export.load(path)  # unpickles: .pt2 files are trusted like code (see the module doc)
    except Exception as e:
        raise KilnInputError(f"{ref}: cannot load a saved ExportedProgram: {type(e).__name__}: "
                             f"{_one_line(e)}") from e
    inputs = None
    saved = getattr(ep, "example_inputs", None)
    if saved is not None:
        args, kwargs = saved
        if kwargs:
            raise KilnInputError(f"{ref}: the program's example inputs use keyword arguments "
                                 f"({', '.join(sorted(kwargs))}); give them with --example-inputs")
        inputs = tuple(args)
    return ModelBundle(ep.module(), inputs, str(path.resolve()), {}, exported=ep)


# -- --example-inputs specs ----------------------------------------------------------------------

class InputSpec(NamedTuple):
    dtype: Any  # torch.dtype
    shape: tuple[int, ...]  # the example's concrete shape
    dims: tuple[str | None, ...] = ()  # per dim: the name of a symbolic dim, or None if static


_SPEC_RE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*\[([^\]]*)\]\s*$")
_DIM_RE = re.compile(r"^(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)(?:\s*=\s*(\d+))?)$")
_SPEC_HINT = ("expected DTYPE[d0,d1,...] per input, separated by ';', where a dim is an integer or a "
              "symbolic name (optionally NAME=SIZE), e.g. 'f32[2,8];i64[2,16]' or 'f32[batch,3,32,32]'")


def parse_input_spec(spec: str) -> list[InputSpec]:
    """Parse ``f32[s0,8];i64[s0=4,16]`` into ``InputSpec`` s; ``KilnInputError`` if malformed."""
    import torch

    from kiln.ir.types import DTYPE_BY_NAME

    items = spec.split(";")
    if items and not items[-1].strip():
        items.pop()  # allow one trailing ';'
    if not items:
        raise KilnInputError(f"bad --example-inputs spec {spec!r}: {_SPEC_HINT}")
    out = []
    sizes: dict[str, int] = {}
    for item in items:
        m = _SPEC_RE.match(item)
        if not m:
            raise KilnInputError(f"bad --example-inputs spec {item.strip()!r}: {_SPEC_HINT}")
        name, dims_text = m.groups()
        dtype = DTYPE_BY_NAME.get(name)
        if dtype is None and isinstance(getattr(torch, name, None), torch.dtype):
            dtype = getattr(torch, name)
        if dtype is None:
            raise KilnInputError(f"bad --example-inputs spec {item.strip()!r}: unknown dtype {name!r}; "
                                 f"valid: {', '.join(DTYPE_BY_NAME)}")
        shape, names = [], []
        for d in ([d.strip() for d in dims_text.split(",")] if dims_text.strip() else []):
            dm = _DIM_RE.match(d)
            if not dm:
                raise KilnInputError(f"bad --example-inputs spec {item.strip()!r}: bad dim {d!r}; {_SPEC_HINT}")
            number, sym_name, sym_size = dm.groups()
            if number is not None:
                shape.append(int(number))
                names.append(None)
                continue
            size = int(sym_size) if sym_size is not None else sizes.get(sym_name, DEFAULT_SYMBOLIC_SIZE)
            if size < 2:
                raise KilnInputError(f"bad --example-inputs spec {item.strip()!r}: symbolic dim {sym_name!r} "
                                     f"needs an example size >= 2 (torch.export specializes 0 and 1)")
            if sizes.setdefault(sym_name, size) != size:
                raise KilnInputError(f"bad --example-inputs spec {item.strip()!r}: symbolic dim {sym_name!r} "
                                     f"has example size {size} here but {sizes[sym_name]} earlier")
            shape.append(size)
            names.append(sym_name)
        out.append(InputSpec(dtype, tuple(shape), tuple(names)))
    return out


def make_inputs(specs: list[InputSpec], seed: int = 0) -> tuple:
    """Tensors for parsed specs: floating/complex from a seeded ``randn``, integers and bools zeros."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in specs:
        dtype, shape = spec.dtype, spec.shape
        if dtype.is_floating_point or dtype.is_complex:
            base = torch.complex64 if dtype.is_complex else torch.float32
            out.append(torch.randn(shape, generator=gen, dtype=base).to(dtype))
        else:
            out.append(torch.zeros(shape, dtype=dtype))
    return tuple(out)


def dynamic_shapes_for(specs: list[InputSpec]) -> tuple | None:
    """``torch.export`` dynamic shapes for the specs' named dims (one ``Dim`` per name), or None."""
    import torch

    if not any(n for s in specs for n in s.dims):
        return None
    dims: dict[str, Any] = {}
    shapes = []
    for s in specs:
        named = {i: dims.setdefault(n, torch.export.Dim(n)) for i, n in enumerate(s.dims) if n}
        shapes.append(named or None)
    return tuple(shapes)


# -- compiling -----------------------------------------------------------------------------------

def import_graph(bundle: ModelBundle):
    """The model's kiln IR before any pass (torch.export -> core ATen -> kiln IR)."""
    from kiln.frontend.export import from_export

    if bundle.exported is not None:
        if bundle.model_args.get("example_inputs") is not None:
            return from_export(bundle.model, bundle.inputs, dynamic_shapes=bundle.dynamic_shapes)
        return from_export(bundle.exported)
    return from_export(bundle.model, bundle.inputs, dynamic_shapes=bundle.dynamic_shapes)


def compile_bundle(bundle: ModelBundle, opts):
    """``kiln.compile`` for a bundle; a saved ExportedProgram is imported as is (no re-export)."""
    import kiln

    if bundle.exported is None:
        return kiln.compile(bundle.model, bundle.inputs, dynamic_shapes=bundle.dynamic_shapes,
                            **_compile_kwargs(opts))
    import torch

    from kiln.api import CompiledModel, optimize
    from kiln.backends.driver import compile_graph

    graph = import_graph(bundle)
    records = optimize(graph, opts, calib_inputs=bundle.inputs)
    compiled = CompiledModel(graph, compile_graph(graph, opts.target, opts.backend_config(), bundle.inputs),
                             graph.meta.get("out_spec"), records)
    if opts.check:
        from kiln.numerics import assert_match

        with torch.no_grad():
            assert_match(compiled(*bundle.inputs), bundle.model(*bundle.inputs), "kiln compile output")
    return compiled


def _compile_kwargs(opts) -> dict[str, Any]:
    from dataclasses import fields

    return {f.name: getattr(opts, f.name) for f in fields(opts)}


# -- shared options ------------------------------------------------------------------------------

def _set_debug(ctx: click.Context, _param, value: bool) -> bool:
    if value and isinstance(ctx.obj, _State):
        ctx.obj.debug = True
    return value


_debug_option = click.option("--debug", is_flag=True, expose_value=False, callback=_set_debug,
                             is_eager=True, help="Show the full traceback of an error.")


def _model_options(default_size: str = "small"):
    """MODEL argument, --size, --example-inputs and --plugin, in that order on the command line."""
    def deco(fn):
        fn = click.option("--plugin", "plugins", multiple=True, metavar="FILE.py|MODULE",
                          help="Import this first (e.g. to register passes for -O). Repeatable.")(fn)
        fn = click.option("--example-inputs", "example_inputs", metavar="SPEC",
                          help="Input shapes, e.g. 'f32[2,8];i64[2,16]'; a named dim is symbolic "
                               "('f32[batch,3,32,32]', 'f32[s0=8,16]').")(fn)
        fn = click.option("--size", type=click.Choice(SIZES), default=default_size, show_default=True,
                          help="Passed to a factory that takes a 'size' parameter.")(fn)
        return click.argument("model_ref", metavar="MODEL")(fn)
    return deco


def _bundle(ctx: click.Context, model_ref: str, size: str, example_inputs: str | None) -> ModelBundle:
    size_given = ctx.get_parameter_source("size") not in (click.core.ParameterSource.DEFAULT, None)
    return load_model(model_ref, size, example_inputs, size_given=size_given)


def _model_name(ref: str) -> str:
    """A short name for a model ref: the file's stem or the module's last component."""
    module_part = ref.rpartition(":")[0] if not ref.endswith(".pt2") else ref
    if _looks_like_path(module_part) or module_part.endswith(".pt2"):
        return Path(module_part).stem
    return module_part.rpartition(".")[2]


def _load_plugins_first(ctx: click.Context) -> None:
    """Plugins register passes that option checks (``-O``) must already know."""
    for plugin in ctx.params.get("plugins", ()):
        load_plugin(plugin)


_target_option = click.option("--target", "--backend", "target", default="reference", show_default=True,
                              help="Backend to compile for.")
_pipeline_option = click.option("-O", "--pipeline", default="O1", show_default=True,
                                help="Pass pipeline (O0/O1/O2) or comma-separated pass names.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@_debug_option
@click.version_option(package_name="kiln", prog_name="kiln")
def cli() -> None:
    """kiln: compile PyTorch models offline, run, benchmark, explain and bisect them."""


# -- kiln compile --------------------------------------------------------------------------------

@cli.command("compile")
@_model_options()
@_target_option
@_pipeline_option
@click.option("--quantize", metavar="SCHEME",
              help="int8, int8-dynamic, int4-weight or mixed; calibrated on the example inputs.")
@click.option("--prune", type=float, metavar="SPARSITY", help="Target weight sparsity in [0, 1).")
@click.option("--tune-trials", "tune_trials", type=int, metavar="N",
              help="MetaSchedule trials per kernel (target tvm); results persist in the tuning cache.")
@click.option("--cache-dir", "cache_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="kiln's cache directory for this run (sets $KILN_CACHE_DIR).")
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="Artifact directory to write.")
@_debug_option
@click.pass_context
def compile_cmd(ctx: click.Context, model_ref: str, size: str, example_inputs: str | None,
                plugins: tuple[str, ...], target: str, pipeline: str, quantize: str | None,
                prune: float | None, tune_trials: int | None, cache_dir: str | None, output: str) -> int:
    """Compile MODEL and write the artifact directory OUT."""
    from kiln.backends.base import get_backend
    from kiln.options import CompileOptions
    from kiln.runtime.artifact import save_artifact

    _load_plugins_first(ctx)
    # fail fast, before the (slow) model build and export
    # an artifact carries the kernels and tuning records of a real compile: the compile cache is not read
    opts = CompileOptions.from_dict({"target": target, "pipeline": pipeline, "quantize": quantize,
                                     "prune": prune, "tune_trials": tune_trials, "compile_cache": False})
    if cache_dir is not None:
        os.environ["KILN_CACHE_DIR"] = str(Path(cache_dir).resolve())
    get_backend(opts.target)
    bundle = _bundle(ctx, model_ref, size, example_inputs)
    start = time.perf_counter()
    compiled = compile_bundle(bundle, opts)
    seconds = time.perf_counter() - start
    path = save_artifact(compiled, output, model_ref=bundle.ref, options=opts, example_inputs=bundle.inputs,
                         model_args=bundle.model_args)
    _print_compile_summary(compiled, opts, seconds, path)
    return EXIT_OK


def _print_compile_summary(compiled, opts, seconds: float, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from kiln.ir.ops import FUSED, WEIGHT

    console = Console(highlight=False, soft_wrap=True)
    graph, report = compiled.graph, compiled.report
    weights = sum(1 for n in graph.nodes if n.op is WEIGHT)
    fused = sum(1 for n in graph.nodes if n.op is FUSED)
    console.print(f"compiled [bold]@{graph.name}[/] for target {opts.target!r} (pipeline {opts.pipeline!r}) "
                  f"in {seconds:.2f} s")
    console.print(f"graph: {len(graph.nodes)} nodes ({weights} weights, {fused} fused groups)")
    fallbacks = ", ".join(f"{k} x{v}" for k, v in sorted(report.fallback_ops.items())) or "none"
    if report.reason:
        fallbacks = f"whole graph in eager: {report.reason}"
    console.print(f"partitions: {report.partitions} ({report.compiled_nodes}/{report.nodes} nodes compiled); "
                  f"fallbacks: {fallbacks}")
    if compiled.pass_records:
        table = Table("pass", "ms", "changed", "nodes", title="pass timings", title_justify="left")
        for r in compiled.pass_records:
            table.add_row(r.name, f"{r.seconds * 1e3:.1f}", "yes" if r.changed else "-",
                          f"{r.nodes_before} -> {r.nodes_after}")
        console.print(table)
    lowering = compiled.compiled.quant_lowering
    if lowering is not None:
        chosen = ", ".join(f"{k} x{v}" for k, v in sorted(lowering.paths().items()))
        console.print(f"quantized ops -> kernels (measured here): {chosen}")
    click.echo(f"wrote {path}")


# -- kiln run ------------------------------------------------------------------------------------

@cli.command("run")
@click.argument("artifact", metavar="OUT")
@click.option("--inputs", "inputs_file", metavar="FILE.safetensors",
              help="Run on these tensors (named input_0, input_1... or by graph input name).")
@click.option("--check", is_flag=True, help="Compare with the eager model named in the manifest.")
@_debug_option
def run_cmd(artifact: str, inputs_file: str | None, check: bool) -> int:
    """Load the artifact OUT and run it on its stored (or given) inputs."""
    import torch
    import torch.utils._pytree as pytree

    from kiln.runtime.artifact import load_artifact

    loaded = load_artifact(artifact)
    if inputs_file is not None:
        inputs = _read_inputs_file(Path(inputs_file), loaded)
    else:
        inputs = loaded.example_inputs()
        if inputs is None:
            raise KilnInputError(f"{artifact}: the artifact stores no inputs; pass --inputs FILE.safetensors")
    with torch.no_grad():
        outputs = loaded(*inputs)
    for i, leaf in enumerate(pytree.tree_leaves(outputs)):
        click.echo(f"output[{i}]: {_describe(leaf)}")
    if not check:
        return EXIT_OK

    from kiln.numerics import compare

    ref = loaded.model_ref
    if not ref:
        raise KilnInputError(f"{artifact}: the manifest has no model ref to check against")
    model_args = loaded.model_args
    model = load_model(ref, model_args.get("size"), model_args.get("example_inputs")).model
    with torch.no_grad():
        expected = model(*inputs)
    scheme = (loaded.manifest.get("options") or {}).get("quantize")
    if scheme:
        return _check_quantized(loaded, inputs, outputs, expected, ref, scheme)
    msg = compare(outputs, expected, "output")
    if msg is not None:
        click.echo(f"kiln: check failed against eager {ref}: {msg}", err=True)
        return EXIT_MISMATCH
    click.echo(f"check: matches eager PyTorch ({ref})")
    return EXIT_OK


def _check_quantized(loaded, inputs, outputs, expected, ref: str, scheme: str) -> int:
    """A quantized artifact must match its own quantized graph run by the reference (exact semantics, up
    to the integer kernels' rounding: 1e-3 of the output's magnitude); its distance from the float model
    is quantization error, reported, not checked."""
    import torch
    import torch.utils._pytree as pytree

    from kiln.numerics import compare
    from kiln.passes.manager import run_reference

    reference = run_reference(loaded.graph, inputs)
    leaves = [t for t in pytree.tree_leaves(reference) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    magnitude = 10 * max((float(t.abs().max()) for t in leaves if t.numel()), default=1.0)
    msg = compare(pytree.tree_leaves(outputs), pytree.tree_leaves(reference), "output", magnitude=magnitude)
    if msg is not None:
        click.echo(f"kiln: check failed against the {scheme} reference graph: {msg}", err=True)
        return EXIT_MISMATCH
    click.echo(f"check: matches the {scheme} quantized reference graph")
    for i, (got, want) in enumerate(zip(pytree.tree_leaves(outputs), pytree.tree_leaves(expected))):
        if isinstance(want, torch.Tensor) and want.is_floating_point() and want.numel():
            err = float((got.float() - want.float()).abs().max()) / max(float(want.abs().max()), 1e-12)
            click.echo(f"quantization error vs eager float ({ref}) output[{i}]: max |diff| / max |eager| = "
                       f"{err:.4f}")
    return EXIT_OK


def _read_inputs_file(path: Path, loaded) -> tuple:
    from safetensors.torch import load

    try:
        tensors = load(path.read_bytes())
    except FileNotFoundError:
        raise KilnInputError(f"{path}: no such file") from None
    except OSError as e:
        raise KilnInputError(f"{path}: cannot read: {e.strerror or e}") from e
    except Exception as e:
        raise KilnInputError(f"{path}: not a valid safetensors file: {_one_line(e)}") from e
    n = len(loaded.graph.inputs)
    by_index = [f"input_{i}" for i in range(n)]
    by_name = [v.name for v in loaded.graph.inputs]
    for names in (by_index, by_name):
        if set(tensors) == set(names):
            return tuple(tensors[k] for k in names)
    raise KilnInputError(f"{path}: expected tensors named {', '.join(by_index)} (or {', '.join(by_name)}), "
                         f"got {', '.join(sorted(tensors)) or 'none'}")


def _describe(x) -> str:
    import torch

    from kiln.ir.types import DTYPES

    if not isinstance(x, torch.Tensor):
        return repr(x)
    t = x.detach().contiguous()
    digest = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    total = t.double().sum().item() if not t.is_complex() else t.sum().item()
    return f"{DTYPES.get(t.dtype, t.dtype)}{list(t.shape)} sum={total:.6g} sha256={digest[:16]}"


# -- kiln bench ----------------------------------------------------------------------------------

@cli.command("bench")
@_model_options(default_size="bench")
@click.option("--target", "--backend", "targets", multiple=True, default=("reference",), show_default=True,
              help="kiln target to time (repeatable: one row column per target).")
@_pipeline_option
@click.option("--no-inductor", is_flag=True, help="Leave out torch.compile (Inductor).")
@click.option("--reps", type=click.IntRange(1), default=20, show_default=True, help="Timed calls per contender.")
@click.option("--warmup", type=click.IntRange(0), default=3, show_default=True, help="Untimed calls first.")
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True, help="torch threads.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), metavar="PATH",
              help="Write rows, summary and environment as JSON.")
@_debug_option
@click.pass_context
def bench_cmd(ctx: click.Context, model_ref: str, size: str, example_inputs: str | None,
              plugins: tuple[str, ...], targets: tuple[str, ...], pipeline: str, no_inductor: bool, reps: int,
              warmup: int, threads: int, json_path: str | None) -> int:
    """Time MODEL in eager PyTorch, Inductor and kiln, side by side in this process."""
    import torch

    from kiln.report.bench import contenders_for, print_results, run_model, summarize, write_json
    from kiln.report.roofline import measure_machine

    _load_plugins_first(ctx)
    contenders = contenders_for(targets, pipeline=pipeline, inductor=not no_inductor)
    torch.set_num_threads(threads)
    bundle = _bundle(ctx, model_ref, size, example_inputs)
    peaks = measure_machine()
    row = run_model(_model_name(bundle.ref), bundle.model, bundle.inputs, contenders, warmup=warmup, reps=reps,
                    peaks=peaks)
    summary = summarize([row], contenders)
    print_results([row], summary, contenders, out=click.echo)
    click.echo(f"roofline peaks: {peaks.source}")
    if json_path:
        write_json(json_path, [row], summary, contenders, {"model_ref": bundle.ref, "machine": vars(peaks)})
        click.echo(f"wrote {json_path}")
    return EXIT_OK


# -- kiln explain --------------------------------------------------------------------------------

@cli.command("explain")
@_model_options()
@_target_option
@_pipeline_option
@click.option("--arena", type=click.Choice(["greedy", "best-fit", "cpsat"]), default="best-fit",
              show_default=True, help="Arena planner drawn in the memory timeline.")
@click.option("--no-measure", is_flag=True,
              help="Do not time kernels or measure the machine (roofline from the labelled constants).")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
              metavar="REPORT.html", help="HTML file to write.")
@_debug_option
@click.pass_context
def explain_cmd(ctx: click.Context, model_ref: str, size: str, example_inputs: str | None,
                plugins: tuple[str, ...], target: str, pipeline: str, arena: str, no_measure: bool,
                output: str) -> int:
    """Write a self-contained HTML report of how kiln compiles MODEL."""
    from kiln.backends.base import get_backend
    from kiln.options import CompileOptions
    from kiln.report import explain, render_html
    from kiln.runtime.files import atomic_write_text

    _load_plugins_first(ctx)
    opts = CompileOptions.from_dict({"target": target, "pipeline": pipeline})
    get_backend(opts.target)
    bundle = _bundle(ctx, model_ref, size, example_inputs)
    graph = import_graph(bundle)
    data = explain(graph, bundle.inputs, pipeline=opts.pipeline, target=opts.target, arena=arena,
                   measure=not no_measure, title=bundle.ref)
    atomic_write_text(output, render_html(data))
    click.echo(f"passes: {', '.join(r.name for r in data.records) or 'none'}; "
               f"fused groups: {len(data.fused_groups)}; fallbacks: {data.fallback_summary}")
    click.echo(f"wrote {output}")
    return EXIT_OK


# -- kiln bisect ---------------------------------------------------------------------------------

@cli.command("bisect")
@_model_options()
@click.option("-O", "--pipeline", required=True, help="Pass pipeline to bisect (O1, or 'cse,my-pass').")
@click.option("--tolerance-scale", type=float, default=1.0, show_default=True,
              help="Multiply kiln.numerics' per-dtype tolerances.")
@click.option("-o", "--output", "output", default="kiln-bisect", show_default=True,
              type=click.Path(file_okay=False), help="Directory for the reproducer.")
@_debug_option
@click.pass_context
def bisect_cmd(ctx: click.Context, model_ref: str, size: str, example_inputs: str | None,
               plugins: tuple[str, ...], pipeline: str, tolerance_scale: float, output: str) -> int:
    """Find the first pass of a pipeline after which MODEL's outputs differ from eager."""
    import torch

    from kiln.bisect import bisect_pipeline, write_reproducer
    from kiln.passes.manager import parse_pipeline

    _load_plugins_first(ctx)
    passes = parse_pipeline(pipeline)
    bundle = _bundle(ctx, model_ref, size, example_inputs)
    with torch.no_grad():
        expected = bundle.model(*bundle.inputs)
    graph = import_graph(bundle)
    result = bisect_pipeline(graph, bundle.inputs, expected, passes, scale=tolerance_scale)
    click.echo(f"checked {result.checked} of {len(passes)} pass(es) against eager {bundle.ref}")
    if result.culprit is None:
        click.echo("no pass changed the outputs beyond tolerance")
        return EXIT_OK
    path = write_reproducer(result, output, plugins=[str(Path(p).resolve()) if _looks_like_path(p) else p
                                                     for p in plugins], model_ref=bundle.ref)
    click.echo(f"first bad pass: {result.culprit} (#{result.index}): {result.message}")
    click.echo(f"reproducer: {path} (rerun: python {path / 'repro.py'})")
    return EXIT_MISMATCH


# -- entry point ---------------------------------------------------------------------------------

def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return "; ".join(lines) if lines else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    from kiln.logs import init_from_env

    state = _State()
    try:
        init_from_env()
        rv = cli.main(args=argv, prog_name="kiln", standalone_mode=False, obj=state)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.format_message())
        return EXIT_USAGE
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        click.echo(f"kiln: error: {_one_line(e.format_message())}{hint}", err=True)
        return EXIT_USAGE
    except click.ClickException as e:
        click.echo(f"kiln: error: {_one_line(e.format_message())}", err=True)
        return EXIT_USAGE
    except click.Abort:
        click.echo("kiln: error: aborted", err=True)
        return EXIT_USAGE
    except KilnError as e:
        if state.debug:
            traceback.print_exc()
        click.echo(f"kiln: error: {_one_line(e)}", err=True)
        return EXIT_USAGE
    except Exception as e:
        if state.debug:
            traceback.print_exc()
        click.echo(f"kiln: error: internal error (a bug in kiln): {type(e).__name__}: {_one_line(e)}"
                   + ("" if state.debug else " (rerun with --debug for the traceback)"), err=True)
        return EXIT_INTERNAL
    return rv if isinstance(rv, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
