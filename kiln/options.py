"""Compile options: one validated record shared by ``torch.compile(..., options=...)``, ``kiln.compile``
and the CLI.

Contract: ``CompileOptions.from_dict(d)`` accepts exactly the documented keys and raises
``KilnInputError`` naming an unknown key or a bad value (with the valid choices). Keys:
- ``target``: backend name (``reference`` now; ``tvm``/``triton``/``fpga``/``accel`` are later issues);
- ``pipeline``: a pipeline name (``O0``/``O1``/``O2``) or comma-separated pass names (default ``O1``);
- ``verify``: run the verifier after import and after every pass (default False);
- ``check``: compare the compiled result with the reference on the first call (default False);
- ``debug_dir``: dump the IR before/after every pass there (default: ``$KILN_DEBUG_DIR`` if set);
- ``backend_options``: a dict passed to the backend's ``compile``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from kiln.errors import KilnInputError


@dataclass(frozen=True)
class CompileOptions:
    target: str = "reference"
    pipeline: str = "O1"
    verify: bool = False
    check: bool = False
    debug_dir: str | None = field(default_factory=lambda: os.environ.get("KILN_DEBUG_DIR") or None)
    backend_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> CompileOptions:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise KilnInputError(f"unknown kiln option(s) {unknown}; valid options: {sorted(known)}")
        for key in ("target", "pipeline"):
            if key in d and not isinstance(d[key], str):
                raise KilnInputError(f"option {key!r} must be a string, got {type(d[key]).__name__}")
        for key in ("verify", "check"):
            if key in d and not isinstance(d[key], bool):
                raise KilnInputError(f"option {key!r} must be True or False, got {d[key]!r}")
        if "backend_options" in d and not isinstance(d["backend_options"], dict):
            raise KilnInputError("option 'backend_options' must be a dict")
        opts = cls(**d)
        opts.validate()
        return opts

    def validate(self) -> None:
        from kiln.backends.base import PLANNED_TARGETS, available_backends
        from kiln.passes.manager import parse_pipeline

        if self.target not in available_backends() and self.target not in PLANNED_TARGETS:
            raise KilnInputError(f"unknown target {self.target!r}; known targets: "
                                 f"{', '.join(available_backends() + sorted(PLANNED_TARGETS))}")
        parse_pipeline(self.pipeline)
