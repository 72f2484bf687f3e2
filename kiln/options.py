"""Compile options: one validated record shared by ``torch.compile(..., options=...)``, ``kiln.compile``
and the CLI.

Contract: ``CompileOptions.from_dict(d)`` accepts exactly the documented keys and raises
``KilnInputError`` naming an unknown key or a bad value (with the valid choices). Keys:
- ``target``: backend name (``reference`` now; ``tvm``/``triton``/``fpga``/``accel`` are later issues);
- ``pipeline``: a pipeline name (``O0``/``O1``/``O2``) or comma-separated pass names (default ``O1``);
- ``verify``: run the verifier after import and after every pass (default False);
- ``check``: compare the compiled result with the reference on the first call (default False);
- ``debug_dir``: dump the IR before/after every pass there (default: ``$KILN_DEBUG_DIR`` if set);
- ``backend_options``: a dict passed to the backend's ``compile``;
- ``quantize`` (``int8``/``int8-dynamic``/``int4-weight``/``mixed``): quantize the graph before the pipeline
  (``kiln.passes.quantize``), calibrated on the example inputs; ``mixed`` picks int8/int4 per layer under
  a budget of ``MIXED_BUDGET`` of the float32 weight bytes (what int8 everywhere costs);
- ``tune_trials`` (an int >= 0): MetaSchedule trials per kernel for the ``tvm`` target (0 or None: kiln's
  untuned default schedules); any other target refuses it with ``UnsupportedError``;
- ``compile_cache`` (default True): ``kiln.compile`` keeps what it compiled in the compile cache
  (``kiln.runtime.compile_cache``) and loads it when the same model (same code path, weights, inputs and
  options) is compiled again; False compiles every time;
- ``prune`` (a target sparsity in [0, 1)): accepted and checked, then refused with ``UnsupportedError``
  naming the issue that builds it (``NOT_IMPLEMENTED``) until it lands; never silently ignored.
``None`` (the default) means off. ``backend_config()`` is what the backend's ``compile`` receives:
``backend_options`` plus ``tune_trials`` when set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from kiln.errors import KilnInputError, UnsupportedError

QUANTIZE_SCHEMES = ("int8", "int8-dynamic", "int4-weight", "mixed")

# Options whose implementation is another issue's work: option -> what builds it.
NOT_IMPLEMENTED = {
    "prune": "the pruning/sparsity issue",
}
TUNABLE_TARGETS = ("tvm",)
MIXED_BUDGET = 0.25  # --quantize mixed: int8-everywhere bytes; int4 on robust layers pays for float elsewhere


@dataclass(frozen=True)
class CompileOptions:
    target: str = "reference"
    pipeline: str = "O1"
    verify: bool = False
    check: bool = False
    debug_dir: str | None = field(default_factory=lambda: os.environ.get("KILN_DEBUG_DIR") or None)
    backend_options: dict[str, Any] = field(default_factory=dict)
    quantize: str | None = None
    prune: float | None = None
    tune_trials: int | None = None
    compile_cache: bool = True

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
        for key in ("verify", "check", "compile_cache"):
            if key in d and not isinstance(d[key], bool):
                raise KilnInputError(f"option {key!r} must be True or False, got {d[key]!r}")
        if "backend_options" in d and not isinstance(d["backend_options"], dict):
            raise KilnInputError("option 'backend_options' must be a dict")
        if d.get("quantize") is not None and d["quantize"] not in QUANTIZE_SCHEMES:
            raise KilnInputError(f"option 'quantize' must be one of {', '.join(QUANTIZE_SCHEMES)}, "
                                 f"got {d['quantize']!r}")
        prune = d.get("prune")
        if prune is not None and (isinstance(prune, bool) or not isinstance(prune, (int, float))
                                  or not 0 <= prune < 1):
            raise KilnInputError(f"option 'prune' must be a target sparsity in [0, 1), got {prune!r}")
        trials = d.get("tune_trials")
        if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 0):
            raise KilnInputError(f"option 'tune_trials' must be an int >= 0, got {trials!r}")
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
        for key, issue in NOT_IMPLEMENTED.items():
            if getattr(self, key) is not None:
                raise UnsupportedError(f"option {key!r} is not implemented yet ({issue})")
        if self.tune_trials and self.target not in TUNABLE_TARGETS:
            raise UnsupportedError(f"option 'tune_trials' applies to the {', '.join(TUNABLE_TARGETS)} target, "
                                   f"not {self.target!r}")

    def backend_config(self) -> dict[str, Any]:
        """The options dict the target backend's ``compile`` receives."""
        config = dict(self.backend_options)
        if self.tune_trials:
            config["tune_trials"] = self.tune_trials
        return config
