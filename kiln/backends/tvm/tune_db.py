"""The persistent tuning database: one kiln-owned JSON record per tuned workload, so a second compile of a
model — or of another model with an identical kernel — performs no tuning.

Contract:
- ``tuning_dir()``: ``$KILN_CACHE_DIR/tvm-tuning`` if set, else ``$XDG_CACHE_HOME/kiln/tvm-tuning`` (default
  ``~/.cache/kiln/tvm-tuning``), a sibling of the kernel cache (``cache.cache_dir()``).
  ``TuningDatabase(root=None)`` uses it unless given a directory; ``TuningDatabase(False)`` (or
  ``KILN_CACHE_DIR=off``) keeps everything in memory for this object only.
- ``record_key(kind, workload_text, target)``: sha256 over the record kind (``"kernel"``: the tuned
  schedule of one TIR kernel; ``"gemm-choice"``: the measured TIR-vs-PyTorch choice of a GEMM/conv group),
  kiln's canonical text of the workload (``cache.canonical_text``: names dropped, so identical workloads
  of different models share a record), the target and TVM's version.
- ``get(key, min_trials=0) -> dict | None``: the record ``KEY.json``, or None when there is none, when it
  was tuned with fewer than ``min_trials`` trials (it will be re-tuned and overwritten), or when it is
  unusable: unreadable or not JSON, another record format (``FORMAT_VERSION``), another TVM version,
  another target or key, or a ``sha256`` that does not match its payload (a hand-edited or truncated
  file). Each unusable record is ignored with a ``KilnCacheWarning`` naming the file and the reason,
  never raised and never used.
- ``put(key, payload)``: writes ``{"format", "kiln", "tvm", "target", "key", "sha256", "payload"}``
  atomically (``kiln.runtime.files``); ``sha256`` is over the payload's canonical JSON.
- ``stats``: hits, misses, rejected, stale (fewer trials than asked), stored.
- ``TuningDatabase(root, target, prebuilt=DIR)`` also reads records ``DIR/tuning-KEY.json`` (read-only,
  looked up first: an artifact's ``kernels/``). ``record_files()``: every record this object read or
  wrote, as ``{"tuning-KEY.json": bytes}``, for an artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm

from kiln.runtime.files import atomic_write_text

from .cache import KilnCacheWarning, _kiln_version, kiln_cache_root

FORMAT_VERSION = 1


def tuning_dir() -> Path:
    return kiln_cache_root() / "tvm-tuning"


def record_key(kind: str, workload_text: str, target: Any) -> str:
    text = "\n".join([kind, workload_text, str(target), tvm.__version__])
    return hashlib.sha256(text.encode()).hexdigest()


def _payload_sha(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class TuningDBStats:
    hits: int = 0
    misses: int = 0
    rejected: int = 0
    stale: int = 0
    stored: int = 0


class TuningDatabase:
    def __init__(self, root: str | os.PathLike | None | bool = None, target: Any = None,
                 prebuilt: str | os.PathLike | None = None):
        if root is False or (root is None and os.environ.get("KILN_CACHE_DIR", "").lower() == "off"):
            self.root = None
        else:
            self.root = Path(root) if root not in (None, True) else tuning_dir()
        self.target = str(target) if target is not None else None
        self.stats = TuningDBStats()
        self._memory: dict[str, dict] = {}
        self.prebuilt = Path(prebuilt) if prebuilt is not None else None
        self._used: dict[str, bytes] = {}  # key -> the record file's bytes

    def path(self, key: str) -> Path | None:
        return None if self.root is None else self.root / f"{key}.json"

    def _reject(self, path: Path, reason: str) -> None:
        self.stats.rejected += 1
        warnings.warn(f"kiln: ignoring TVM tuning record {path}: {reason}", KilnCacheWarning, stacklevel=3)

    def _read(self, key: str) -> dict | None:
        if self.prebuilt is not None and (self.prebuilt / f"tuning-{key}.json").exists():
            payload = self._read_file(self.prebuilt / f"tuning-{key}.json", key)
            if payload is not None:
                return payload
        if self.root is None:
            return self._memory.get(key)
        return self._read_file(self.root / f"{key}.json", key)

    def _read_file(self, path: Path, key: str) -> dict | None:
        if not path.exists():
            return None
        try:
            text = path.read_text()
            record = json.loads(text)
        except (OSError, ValueError) as e:
            self._reject(path, f"unreadable or not JSON ({e})")
            return None
        if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION:
            found = record.get("format") if isinstance(record, dict) else "?"
            self._reject(path, f"record format {found}, expected {FORMAT_VERSION}")
            return None
        if record.get("tvm") != tvm.__version__:
            self._reject(path, f"tuned with TVM {record.get('tvm')}, this is TVM {tvm.__version__}")
            return None
        if self.target is not None and record.get("target") != self.target:
            self._reject(path, f"tuned for target {record.get('target')}, this is {self.target}")
            return None
        if record.get("key") != key:
            self._reject(path, "its key does not match its file name")
            return None
        payload = record.get("payload")
        if not isinstance(payload, dict) or record.get("sha256") != _payload_sha(payload):
            self._reject(path, "sha256 mismatch (corrupt or modified record)")
            return None
        self._used[key] = text.encode()
        return payload

    def get(self, key: str, min_trials: int = 0) -> dict | None:
        payload = self._read(key)
        if payload is None:
            self.stats.misses += 1
            return None
        if int(payload.get("trials", 0)) < min_trials:
            self.stats.stale += 1
            return None
        self.stats.hits += 1
        return payload

    def put(self, key: str, payload: dict) -> None:
        self.stats.stored += 1
        record = {"format": FORMAT_VERSION, "kiln": _kiln_version(), "tvm": tvm.__version__,
                  "target": self.target, "key": key, "sha256": _payload_sha(payload), "payload": payload}
        text = json.dumps(record, indent=1, sort_keys=True) + "\n"
        self._used[key] = text.encode()
        if self.root is None:
            self._memory[key] = payload
            return
        atomic_write_text(self.root / f"{key}.json", text)

    def record_files(self) -> dict[str, bytes]:
        return {f"tuning-{key}.json": data for key, data in sorted(self._used.items())}
