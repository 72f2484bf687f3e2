"""The compile cache: ``kiln.compile`` of a model it has compiled before loads the result instead of
exporting, optimizing and lowering again (issue 6: warm compile <= 1 s).

Contract:
- ``CompileCache.for_options(opts) -> CompileCache | None``: None when off: ``opts.compile_cache`` False,
  ``$KILN_CACHE_DIR=off``, ``backend_options["cache_dir"]`` False (kernels would not be on disk), or a
  ``debug_dir`` (IR dumps of every pass need a real compile).
  Entries live in ``$KILN_CACHE_DIR/compiled`` (default ``~/.cache/kiln/compiled``).
- ``cache.key(model, inputs, opts, dynamic_shapes) -> (key | None, reason)``: sha256 over the model's
  fingerprint (``kiln.frontend.fingerprint``), the options (without ``debug_dir``/``check``), kiln's own
  source, and the backend's ``cache_version()`` (TVM: its version and the CPU target). None (with the
  reason) when the model cannot be fingerprinted soundly: it is then compiled every time.
- ``cache.load(key) -> CompiledModel | None``: a hit rebuilds the compiled model from the entry's flat plan
  (``kiln.runtime.plan``) without exporting or compiling; ``.graph`` (the optimized IR) is parsed only
  when read. A missing entry is a miss; a corrupt, foreign-version or unloadable entry (e.g. a kernel gone
  from the kernel cache) is a miss with a ``KilnCacheWarning`` naming the file and the reason, and the
  next store overwrites it. It never raises and never runs an entry whose files fail their checksums
  (CRC-32 and size, recorded in ``entry.json``).
- ``cache.store(key, compiled, example_inputs) -> str | None`` (None when stored, else why not): flattens
  the compiled model, reloads the plan and checks it on the example inputs against the compiled model
  (bit-for-bit equal outputs) before writing the entry atomically; once stored, ``compiled`` itself runs
  the flat program too (cold and warm compiles run the same code); a model whose plan cannot be written
  (``PlanUnsupported``: e.g. an opaque closure, the arena executor) or does not reproduce the outputs is
  not cached (logged).
- Entries hold the model's weights, so the cache is bounded: after a store, the least recently used
  entries (a hit counts as a use) are deleted until it holds at most ``$KILN_COMPILE_CACHE_MAX_GB``
  (default 4) GB (``prune``).
- ``CompiledModel.cache`` says what happened: ``"hit"``, ``"stored"``, or ``"off: <why>"``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Any

import sympy
import torch
import torch.utils._pytree as pytree

from kiln.errors import ArtifactError, KilnCacheWarning, KilnError
from kiln.runtime.artifact import _all_weights, _dump_spec, _load_spec

log = logging.getLogger("kiln")

FORMAT = "kiln-compile-cache"
FORMAT_VERSION = 1
MANIFEST = "entry.json"
GRAPH_FILE = "graph.kir"


DEFAULT_MAX_GB = 4.0


def max_bytes() -> int:
    """The compile cache's size limit: ``$KILN_COMPILE_CACHE_MAX_GB`` (default 4) GB."""
    try:
        gb = float(os.environ.get("KILN_COMPILE_CACHE_MAX_GB", DEFAULT_MAX_GB))
    except ValueError:
        gb = DEFAULT_MAX_GB
    return int(gb * 1e9)


class CompileCache:
    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def for_options(cls, opts) -> CompileCache | None:
        if not opts.compile_cache or os.environ.get("KILN_CACHE_DIR", "").lower() == "off":
            return None
        if opts.debug_dir:  # the user wants the IR of every pass: that takes a real compile
            return None
        if opts.backend_config().get("cache_dir") is False:
            return None
        from kiln.runtime.files import kiln_cache_root

        return cls(kiln_cache_root() / "compiled")

    # -- keys ------------------------------------------------------------------------------------

    def key(self, model: torch.nn.Module, example_inputs: tuple, opts,
            dynamic_shapes=None) -> tuple[str | None, str | None]:
        import kiln
        from kiln.backends.base import get_backend
        from kiln.frontend.fingerprint import model_fingerprint, source_digest

        options = {"target": opts.target, "pipeline": opts.pipeline, "verify": opts.verify,
                   "quantize": opts.quantize, "backend_options": opts.backend_config()}
        try:
            spelled = json.dumps(options, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError):
            return None, "backend_options are not plain JSON values"
        fp = model_fingerprint(model, example_inputs, dynamic_shapes)
        if fp.key is None:
            return None, fp.reason
        parts = [FORMAT, str(FORMAT_VERSION), fp.key, spelled, source_digest(str(Path(kiln.__file__).parent)),
                 get_backend(opts.target).cache_version()]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest(), None

    # -- loading ---------------------------------------------------------------------------------

    def load(self, key: str):
        entry = self.root / key
        manifest_path = entry / MANIFEST
        if not manifest_path.exists():
            return None
        try:
            compiled = _load_entry(entry)
            os.utime(manifest_path)  # recently used: pruned last
            return compiled
        except Exception as e:  # a cache never breaks a compile: any bad entry is a miss, said out loud
            what = str(e) if isinstance(e, (ArtifactError, KilnError)) else f"{type(e).__name__}: {e}"
            warnings.warn(f"kiln: ignoring compile cache entry {entry}: {what}", KilnCacheWarning, stacklevel=3)
            return None

    # -- storing ---------------------------------------------------------------------------------

    def store(self, key: str, compiled, example_inputs: tuple) -> str | None:
        """Write ``compiled`` under ``key``; returns None on success, else why it was not cached."""
        from kiln.ir.printer import print_graph
        from kiln.runtime.files import atomic_dir
        from kiln.runtime.plan import PlanUnsupported, flatten, load_plan, save_plan

        try:
            flat = flatten(compiled.compiled.module)
        except PlanUnsupported as e:
            return f"not cacheable: {e}"
        except Exception as e:  # a cache never breaks a compile that worked
            log.warning("kiln: could not flatten the compiled model for the compile cache: %s: %s",
                        type(e).__name__, e)
            return f"not cacheable: {type(e).__name__}: {e}"
        graph = compiled.graph
        executables = compiled.compiled.executables
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "graph_name": graph.name,
            "inputs": [[v.name, _spell_type(v.type)] for v in graph.inputs],
            "out_spec": _dump_spec(compiled.out_spec),
            "report": compiled.report.to_dict(),
            "tuned": any(getattr(exe, "tuning", None) is not None for exe in executables),
            "kernel_paths": [p for exe in executables for p in getattr(exe, "kernel_paths", None) or []],
        }
        weights = _all_weights(graph)
        try:
            with tempfile.TemporaryDirectory(prefix="kiln-plan-") as tmp, torch.no_grad():
                save_plan(flat, tmp, extra_tensors=weights)
                reloaded, _ = load_plan(tmp)
                if not _same(reloaded(*example_inputs), compiled.compiled.module(*example_inputs)):
                    return "not cacheable: the flat plan's outputs differ from the compiled model's"
                with atomic_dir(self.root / key) as out:
                    for f in Path(tmp).iterdir():
                        shutil.copyfile(f, out / f.name)
                    (out / GRAPH_FILE).write_text(print_graph(graph) + "\n", encoding="utf-8")
                    manifest["files"] = {f.name: _checksum(f) for f in sorted(out.iterdir())}
                    (out / MANIFEST).write_text(json.dumps(manifest, sort_keys=True, indent=1, allow_nan=False),
                                                encoding="utf-8")
        except PlanUnsupported as e:
            return f"not cacheable: {e}"
        except Exception as e:  # a full disk, a read-only cache, a plan that does not run: compile on
            log.warning("kiln: could not write compile cache entry %s: %s: %s", self.root / key, type(e).__name__, e)
            return f"not written: {type(e).__name__}: {e}"
        # the compile that was just stored runs the same flat program a hit will: one straight-line fx
        # program instead of nested modules (measured, interleaved: rnn 111.7 -> 97.2 ms, transformer
        # 53.7 -> 51.6, gpt 96.0 -> 94.6); it reproduced the nested module's outputs bit for bit above
        compiled.compiled.module = flat
        self.prune(keep=key)
        return None

    def prune(self, keep: str | None = None) -> list[str]:
        """Delete the least recently used entries until the cache holds at most ``max_bytes()``; returns
        the deleted keys (never ``keep``, the entry just written)."""
        entries = []
        for entry in self.root.iterdir() if self.root.is_dir() else []:
            manifest = entry / MANIFEST
            if entry.name.startswith(".") or not manifest.exists():
                continue
            size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
            entries.append((manifest.stat().st_mtime, entry.name, size))
        total, deleted = sum(e[2] for e in entries), []
        for _, name, size in sorted(entries):
            if total <= max_bytes():
                break
            if name != keep:
                shutil.rmtree(self.root / name, ignore_errors=True)
                total -= size
                deleted.append(name)
        return deleted


# -- entries -------------------------------------------------------------------------------------

def _load_entry(entry: Path):
    from kiln.api import CompiledModel
    from kiln.backends.driver import FallbackReport
    from kiln.runtime.plan import load_plan

    manifest_path = entry / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{manifest_path}: unreadable ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{manifest_path}: not a {FORMAT} version {FORMAT_VERSION} entry")
    files = manifest["files"]
    for name, digest in files.items():
        if _checksum(entry / name) != digest:
            raise ArtifactError(f"{entry / name}: checksum mismatch (corrupt or modified)")
    gm, weights = load_plan(entry)
    report = FallbackReport(**manifest["report"])
    out_spec = _load_spec(manifest["out_spec"], manifest_path)
    inputs = [(name, _parse_type(t)) for name, t in manifest["inputs"]]
    graph_path = entry / GRAPH_FILE

    def parse_graph():
        from kiln.ir.parser import parse_graph as parse

        graph = parse(graph_path.read_text(encoding="utf-8"), weights, source=str(graph_path))
        graph.meta["out_spec"] = out_spec
        return graph

    compiled = CachedGraph(gm, report, manifest.get("kernel_paths") or [], bool(manifest.get("tuned")))
    return CompiledModel(None, compiled, out_spec, [], graph_loader=parse_graph,
                         graph_name=manifest["graph_name"], inputs=inputs)


class CachedGraph:
    """A compiled graph rebuilt from a compile cache entry (``CompiledGraph``'s reading interface)."""

    def __init__(self, module, report, kernel_paths: list[dict], tuned: bool = False):
        self.module = module
        self.tuned = tuned
        self.report = report
        self.quant_lowering = None
        run = _Run(module, kernel_paths)
        self.executables = [run]

    def __call__(self, *inputs) -> tuple:
        return self.module(*inputs)

    def artifact_files(self) -> dict[str, bytes]:
        """The compiled code an artifact ships: what the plan's leaves offer (TVM kernels: their kernel
        cache entries). A tuned compile's tuning records are not in the entry: refused."""
        if self.tuned:
            raise KilnError("a tuned model loaded from the compile cache cannot be saved as an artifact (its "
                            "tuning records are not cached); compile it with compile_cache=False")
        files: dict[str, bytes] = {}
        for node in self.module.graph.nodes:
            leaf = getattr(node.target, "kiln_leaf", None) if node.op == "call_function" else None
            if leaf is not None and callable(getattr(leaf, "artifact_files", None)):
                files.update(leaf.artifact_files())
        return files


class _Run:
    def __init__(self, module, kernel_paths):
        self.graph_module = module
        self.kernel_paths = kernel_paths
        self.tuning = None

    def __call__(self, *inputs):
        return self.graph_module(*inputs)


def _same(a: Any, b: Any) -> bool:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return len(la) == len(lb) and all(
        (torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y)
        for x, y in zip(la, lb))


def _checksum(path: Path) -> str:
    """CRC-32 and size of a file: catches a truncated or corrupted entry at 4 GB/s (sha256 runs at 1.4 here,
    and a hit must stay under a second: the entry is the user's own, so this guards accidents, not attacks;
    the key itself is a sha256)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return f"crc32:{crc:08x}:{size}"


def _spell_type(t) -> Any:
    from kiln.ir.types import TensorType

    if not isinstance(t, TensorType):
        return None
    dims = [d if isinstance(d, int) else (str(d) if d.is_Symbol else None) for d in t.shape]
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": dims, "layout": t.layout}


def _parse_type(spec: Any):
    from kiln.ir.types import TensorType

    if spec is None:
        return None
    dims = []
    for d in spec["shape"]:
        # a symbol binds equal dims across inputs; a dim that is an expression is not checked (a fresh dummy)
        dims.append(d if isinstance(d, int) else sympy.Symbol(d, integer=True, positive=True) if d else
                    sympy.Dummy(integer=True, positive=True))
    return TensorType(tuple(dims), getattr(torch, spec["dtype"]), spec["layout"])
