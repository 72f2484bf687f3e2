"""kiln: a compiler for PyTorch models.

Public entry points (spellings are stable; see docs/architecture.md):
- ``torch.compile(model, backend="kiln", options={"target": ..., "pipeline": ...})``
- ``kiln.compile(model, example_inputs, target=..., pipeline=...)`` -> ``CompiledModel``
- ``kiln.fallback_reports()``: what fell back to eager in this process, machine-readable.
"""

from __future__ import annotations

__version__ = "0.1.0"

from kiln.api import CompiledModel, compile  # noqa: E402
from kiln.errors import KilnError, KilnInputError, KilnParseError, UnsupportedError, VerificationError  # noqa: E402
from kiln.frontend.dynamo import fallback_reports, reset_reports  # noqa: E402
from kiln.runtime.artifact import load_artifact as load  # noqa: E402

__all__ = ["CompiledModel", "KilnError", "KilnInputError", "KilnParseError", "UnsupportedError",
           "VerificationError", "compile", "fallback_reports", "load", "reset_reports", "__version__"]
