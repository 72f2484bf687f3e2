"""The ``kiln`` command line (console script ``kiln = kiln.cli:main``; also ``python -m kiln.cli``).

Commands:
- ``kiln compile MODULE:FACTORY [--target T] [-O/--pipeline P] [--size small|bench]
  [--example-inputs SPEC] -o OUT``: build the model, ``kiln.compile`` it and write a portable artifact
  (``kiln.runtime.artifact``) holding the example inputs too; prints a short summary.
  ``MODULE`` is an importable module name (the current directory is importable, as with ``python -m``)
  or a path to a ``.py`` file (imported as part of its package when it sits in one). ``FACTORY`` is a
  callable returning ``(model, example_inputs)`` or just a model, whose inputs then come from
  ``--example-inputs``: ``DTYPE[d0,d1,...]`` per input, separated by ``;`` (e.g. ``f32[2,8];i64[2,16]``;
  dtypes use the IR spelling ``f32``/``i64``/... or torch's ``float32``/...; floats are seeded
  ``randn``, integers and bools zeros). ``--example-inputs`` also overrides a factory's inputs. A factory
  with a ``size`` parameter gets ``--size`` (default ``small``). The factory runs with the global torch
  RNG seeded to 0 (restored afterwards), so it builds the same model each time; the model is put in
  eval mode.
- ``kiln run OUT [--inputs FILE.safetensors] [--check]``: load the artifact, run it on its stored inputs
  (or on FILE's tensors, named ``input_0``... or by graph input name) and print each output's type and
  checksum. ``--check`` rebuilds the model from the manifest's model ref, runs it eagerly and compares
  (``kiln.numerics.compare``).

Exit codes: 0 success; 1 ``run --check`` found a mismatch; 2 an error the user can fix (bad argument,
missing file, any ``KilnError``): one line ``kiln: error: ...`` on stderr, with the traceback only under
``--debug`` (``kiln --debug CMD`` or ``CMD --debug``); 3 an internal error (a bug in kiln).

``main(argv=None) -> int`` is the entry point. New commands register on the ``cli`` group and reuse
``load_model`` / ``parse_input_spec`` / ``make_inputs``.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from kiln.errors import KilnError, KilnInputError

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
SIZES = ("small", "bench")


@dataclass
class _State:
    debug: bool = False


# -- models: MODULE:FACTORY ----------------------------------------------------------------------

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
        raise KilnInputError(f"bad model reference {ref!r}: expected MODULE:FACTORY, e.g. "
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
        cwd = os.getcwd()
        if cwd not in sys.path:  # like `python -m`: modules in the current directory are importable
            sys.path.insert(0, cwd)
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


def _looks_like_path(text: str) -> bool:
    return text.endswith(".py") or "/" in text or os.sep in text


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise KilnInputError(f"cannot import module {name!r}: no module named {e.name!r}") from e
        raise KilnInputError(f"importing {name} failed: {type(e).__name__}: {e}") from e
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
    except Exception as e:
        del sys.modules[name]
        raise KilnInputError(f"importing {path} failed: {type(e).__name__}: {_one_line(e)}") from e
    return module


def load_model(ref: str, size: str | None = None, input_spec: str | None = None,
               *, size_given: bool = False) -> tuple[Any, tuple, LoadedFactory, dict[str, Any]]:
    """Build ``(model, example_inputs, factory, model_args)`` from ``MODULE:FACTORY``.

    ``size`` is passed when the factory takes a ``size`` parameter (an explicit ``size_given`` size for
    a factory without one is an error). ``input_spec`` (``f32[2,8];i64[2,16]``) gives or overrides the
    inputs. ``model_args`` records what was passed, so the model can be rebuilt (``kiln run --check``).
    """
    import torch

    specs = parse_input_spec(input_spec) if input_spec is not None else None
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
    elif (isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        model, inputs = result
    else:
        raise KilnInputError(f"{ref}: the factory returned a {type(result).__name__}; expected "
                             "(model, example_inputs) or a torch.nn.Module")
    model_args = dict(kwargs)
    if specs is not None:
        inputs = make_inputs(specs)
        model_args["example_inputs"] = input_spec
    elif inputs is None:
        raise KilnInputError(f"{ref}: the factory returned only a model; give its inputs with "
                             "--example-inputs, e.g. --example-inputs 'f32[2,8]'")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise KilnInputError(f"{ref}: example inputs must be a tensor or a tuple of tensors, got "
                             f"{type(inputs).__name__}")
    model.eval()
    return model, tuple(inputs), loaded, model_args


# -- --example-inputs specs ----------------------------------------------------------------------

_SPEC_RE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*\[([^\]]*)\]\s*$")


def parse_input_spec(spec: str) -> list[tuple[Any, tuple[int, ...]]]:
    """Parse ``f32[2,8];i64[2,16]`` into ``[(dtype, shape), ...]``; ``KilnInputError`` if malformed."""
    import torch

    from kiln.ir.types import DTYPE_BY_NAME

    hint = "expected DTYPE[d0,d1,...] per input, separated by ';', e.g. 'f32[2,8];i64[2,16]'"
    items = spec.split(";")
    if items and not items[-1].strip():
        items.pop()  # allow one trailing ';'
    if not items:
        raise KilnInputError(f"bad --example-inputs spec {spec!r}: {hint}")
    out = []
    for item in items:
        m = _SPEC_RE.match(item)
        if not m:
            raise KilnInputError(f"bad --example-inputs spec {item.strip()!r}: {hint}")
        name, dims_text = m.groups()
        dtype = DTYPE_BY_NAME.get(name)
        if dtype is None and isinstance(getattr(torch, name, None), torch.dtype):
            dtype = getattr(torch, name)
        if dtype is None:
            raise KilnInputError(f"bad --example-inputs spec {item.strip()!r}: unknown dtype {name!r}; "
                                 f"valid: {', '.join(DTYPE_BY_NAME)}")
        dims_list = [d.strip() for d in dims_text.split(",")] if dims_text.strip() else []
        if any(not d.isdigit() for d in dims_list):
            raise KilnInputError(f"bad --example-inputs spec {item.strip()!r}: dims must be non-negative "
                                 f"integers; {hint}")
        out.append((dtype, tuple(int(d) for d in dims_list)))
    return out


def make_inputs(specs: list[tuple[Any, tuple[int, ...]]], seed: int = 0) -> tuple:
    """Tensors for parsed specs: floating/complex from a seeded ``randn``, integers and bools zeros."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for dtype, shape in specs:
        if dtype.is_floating_point or dtype.is_complex:
            base = torch.complex64 if dtype.is_complex else torch.float32
            out.append(torch.randn(shape, generator=gen, dtype=base).to(dtype))
        else:
            out.append(torch.zeros(shape, dtype=dtype))
    return tuple(out)


# -- commands ------------------------------------------------------------------------------------

def _set_debug(ctx: click.Context, _param, value: bool) -> bool:
    if value and isinstance(ctx.obj, _State):
        ctx.obj.debug = True
    return value


_debug_option = click.option("--debug", is_flag=True, expose_value=False, callback=_set_debug,
                             is_eager=True, help="Show the full traceback of an error.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@_debug_option
@click.version_option(package_name="kiln", prog_name="kiln")
def cli() -> None:
    """kiln: compile PyTorch models offline and run the compiled artifacts."""


@cli.command("compile")
@click.argument("model_ref", metavar="MODULE:FACTORY")
@click.option("--target", default="reference", show_default=True, help="Backend to compile for.")
@click.option("-O", "--pipeline", default="O1", show_default=True,
              help="Pass pipeline (O0/O1/O2) or comma-separated pass names.")
@click.option("--size", type=click.Choice(SIZES), default="small", show_default=True,
              help="Passed to a factory that takes a 'size' parameter.")
@click.option("--example-inputs", "example_inputs", metavar="SPEC",
              help="Input shapes, e.g. 'f32[2,8];i64[2,16]' (for a factory that returns only a model).")
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="Artifact directory to write.")
@_debug_option
@click.pass_context
def compile_cmd(ctx: click.Context, model_ref: str, target: str, pipeline: str, size: str,
                example_inputs: str | None, output: str) -> int:
    """Compile MODULE:FACTORY and write the artifact directory OUT."""
    import kiln
    from kiln.backends.base import get_backend
    from kiln.options import CompileOptions
    from kiln.runtime.artifact import save_artifact

    opts = CompileOptions.from_dict({"target": target, "pipeline": pipeline})  # fail fast, before the model
    get_backend(opts.target)
    size_given = ctx.get_parameter_source("size") not in (click.core.ParameterSource.DEFAULT, None)
    model, inputs, factory, model_args = load_model(model_ref, size, example_inputs, size_given=size_given)
    start = time.perf_counter()
    compiled = kiln.compile(model, inputs, target=opts.target, pipeline=opts.pipeline)
    seconds = time.perf_counter() - start
    path = save_artifact(compiled, output, model_ref=factory.ref, options=opts, example_inputs=inputs,
                         model_args=model_args)
    _print_compile_summary(compiled, opts, seconds, path)
    return EXIT_OK


def _print_compile_summary(compiled, opts, seconds: float, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from kiln.ir.ops import WEIGHT

    console = Console(highlight=False, soft_wrap=True)
    graph, report = compiled.graph, compiled.report
    weights = sum(1 for n in graph.nodes if n.op is WEIGHT)
    console.print(f"compiled [bold]@{graph.name}[/] for target {opts.target!r} (pipeline {opts.pipeline!r}) "
                  f"in {seconds:.2f} s")
    console.print(f"graph: {len(graph.nodes)} nodes ({weights} weights)")
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
    click.echo(f"wrote {path}")


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
    model, _, _, _ = load_model(ref, model_args.get("size"), model_args.get("example_inputs"))
    with torch.no_grad():
        expected = model(*inputs)
    msg = compare(outputs, expected, "output")
    if msg is not None:
        click.echo(f"kiln: check failed against eager {ref}: {msg}", err=True)
        return EXIT_MISMATCH
    click.echo(f"check: matches eager PyTorch ({ref})")
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


# -- entry point ---------------------------------------------------------------------------------

def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return "; ".join(lines) if lines else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    state = _State()
    try:
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
