"""kiln: a compiler for PyTorch models.

Public entry points (spellings are stable; see docs/architecture.md):
- ``torch.compile(model, backend="kiln", options={"target": ..., "pipeline": ...})``
- ``kiln.compile(model, example_inputs, target=..., pipeline=...)`` -> ``CompiledModel``
- ``kiln.fallback_reports()``: what fell back to eager in this process, machine-readable.
- ``kiln.set_logs("+passes,fusion")``: the ``KILN_LOGS`` switches from Python.
"""

from __future__ import annotations

__version__ = "0.1.0"

from kiln.api import CompiledModel, compile  # noqa: E402
from kiln.errors import KilnError, KilnInputError, KilnParseError, UnsupportedError, VerificationError  # noqa: E402
from kiln.frontend.dynamo import fallback_reports, reset_reports  # noqa: E402
from kiln.logs import init_from_env as _init_logs  # noqa: E402
from kiln.logs import set_logs  # noqa: E402
from kiln.runtime.artifact import load_artifact as load  # noqa: E402

_init_logs()  # KILN_LOGS works for Python and torch.compile users too, not only the CLI

__all__ = ["CompiledModel", "KilnError", "KilnInputError", "KilnParseError", "UnsupportedError",
           "VerificationError", "compile", "fallback_reports", "load", "reset_reports", "set_logs", "__version__"]
