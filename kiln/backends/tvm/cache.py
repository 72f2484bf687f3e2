"""The persistent kernel cache: compiled TVM kernels on disk, keyed by workload and target, so the second
compile of a model (or of another model with the same kernels) compiles nothing.

Contract:
- ``cache_dir()``: ``$KILN_CACHE_DIR/tvm`` if set, else ``$XDG_CACHE_HOME/kiln/tvm`` (default
  ``~/.cache/kiln/tvm``). ``KernelCache(root=None)`` uses it unless given a directory; ``KernelCache(False)``
  (or ``KILN_CACHE_DIR=off``) disables the disk.
- ``workload_key(graph, target, schedule_id)``: sha256 over the graph's *canonical* text (values and
  weights renamed in order, graph name dropped: kernels of two models with the same shapes and ops share
  an entry), the target, TVM's version, ``te_ops.LOWERING_VERSION`` (bump it when a lowering changes
  the code it generates) and the schedule's identity (``SCHEDULE_VERSION`` of kiln's default schedule;
  bump it when ``schedule_cpu`` changes).
- ``KernelCache(root, prebuilt=DIR)`` also reads entries from ``DIR`` (read-only, looked up first): an
  artifact's ``kernels/`` directory. ``entry_files(key)`` gives a verified entry's two files as bytes.
- ``get(key) -> tvm function | None``, ``put(key, module, meta)``: an entry is ``KEY.so`` (TVM's
  ``export_library``) plus ``KEY.json`` (format version, kiln/TVM versions, target, the .so's sha256).
  Both are written atomically (temporary file + rename, the .so first). Before a .so is loaded its
  sha256 and versions are checked; a corrupt, truncated, foreign-version or unreadable entry is ignored
  with a ``KilnCacheWarning`` naming the file and the reason (and will be overwritten by the next put);
  it never raises and never loads an unverified library.
- ``stats``: hits, misses, rejected, stored — tests and reports read them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import tvm

from kiln.errors import KilnCacheWarning  # noqa: F401  (re-exported: tests and tune_db import it from here)
from kiln.ir.clone import clone_graph
from kiln.ir.graph import Graph
from kiln.ir.ops import WEIGHT
from kiln.ir.printer import print_graph
from kiln.runtime.files import atomic_write_text, kiln_cache_root

from .te_ops import LOWERING_VERSION

FORMAT_VERSION = 1


def cache_dir() -> Path:
    return kiln_cache_root() / "tvm"


def canonical_text(graph: Graph) -> str:
    g = clone_graph(graph)
    g.name = "kernel"
    for i, v in enumerate(g.inputs):
        v.name = f"in{i}"
    renamed: dict[str, str] = {}
    for i, node in enumerate(g.nodes):
        if node.op is WEIGHT:
            new = renamed.setdefault(node.attrs["name"], f"w{len(renamed)}")
            node.attrs["name"] = new
        for j, r in enumerate(node.results):
            r.name = f"v{i}_{j}"
    g.weights = {}
    return print_graph(g)


def _kiln_version() -> str:
    try:
        return metadata.version("kiln")
    except metadata.PackageNotFoundError:
        return "unknown"


def workload_key(graph: Graph, target: Any, schedule_id: str) -> str:
    text = "\n".join([canonical_text(graph), str(target), tvm.__version__, LOWERING_VERSION, schedule_id])
    return hashlib.sha256(text.encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    rejected: int = 0
    stored: int = 0


class KernelCache:
    def __init__(self, root: str | os.PathLike | None | bool = None, prebuilt: str | os.PathLike | None = None):
        if root is False or (root is None and os.environ.get("KILN_CACHE_DIR", "").lower() == "off"):
            self.root = None
        else:
            self.root = Path(root) if root not in (None, True) else cache_dir()
        self.prebuilt = Path(prebuilt) if prebuilt is not None else None  # read-only (an artifact's kernels)
        self.stats = CacheStats()

    def _reject(self, path: Path, reason: str) -> None:
        self.stats.rejected += 1
        warnings.warn(f"kiln: ignoring TVM cache entry {path}: {reason}", KilnCacheWarning, stacklevel=4)

    def _roots(self) -> list[Path]:
        return [r for r in (self.prebuilt, self.root) if r is not None]

    def get(self, key: str):
        for root in self._roots():
            lib_path = self._verified(root, key)
            if lib_path is None:
                continue
            try:
                function = tvm.runtime.load_module(str(lib_path))["main"]
            except Exception as e:  # TVM raises its own error types for a bad library
                self._reject(lib_path, f"TVM could not load it ({type(e).__name__})")
                continue
            self.stats.hits += 1
            return function
        self.stats.misses += 1
        return None

    def entry_files(self, key: str) -> dict[str, bytes]:
        """The verified files of entry ``key`` (``KEY.so``, ``KEY.json``), e.g. to put in an artifact;
        empty if no root holds a valid entry."""
        for root in self._roots():
            lib_path = self._verified(root, key)
            if lib_path is not None:
                return {f"{key}.so": lib_path.read_bytes(), f"{key}.json": (root / f"{key}.json").read_bytes()}
        return {}

    def _verified(self, root: Path, key: str) -> Path | None:
        """``root/KEY.so`` if its metadata is readable, of this format and TVM version, and its sha256
        matches; None (with a warning for a bad entry, silently for a missing one) otherwise."""
        meta_path, lib_path = root / f"{key}.json", root / f"{key}.so"
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            self._reject(meta_path, f"unreadable metadata ({e})")
            return None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            self._reject(meta_path, f"cache format {meta.get('format') if isinstance(meta, dict) else '?'}, "
                                    f"expected {FORMAT_VERSION}")
            return None
        if meta.get("tvm") != tvm.__version__:
            self._reject(meta_path, f"built by TVM {meta.get('tvm')}, this is TVM {tvm.__version__}")
            return None
        try:
            digest = _sha256(lib_path)
        except OSError as e:
            self._reject(lib_path, f"library unreadable ({e})")
            return None
        if digest != meta.get("sha256"):
            self._reject(lib_path, "sha256 mismatch (corrupt or modified library)")
            return None
        return lib_path

    def put(self, key: str, module, meta: dict[str, Any]) -> None:
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        lib_path = self.root / f"{key}.so"
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".so", dir=self.root)
        os.close(fd)
        try:
            module.export_library(tmp)
            digest = _sha256(Path(tmp))
            os.replace(tmp, lib_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        record = {"format": FORMAT_VERSION, "kiln": _kiln_version(), "tvm": tvm.__version__,
                  "sha256": digest, **meta}
        atomic_write_text(self.root / f"{key}.json", json.dumps(record, indent=1, sort_keys=True) + "\n")
        self.stats.stored += 1
