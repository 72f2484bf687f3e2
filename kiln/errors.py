"""kiln's error types: every error a user can cause is one of these, with a message that names the
file, node or argument at fault.

- ``KilnError``: base class.
- ``KilnInputError``: bad user input (not a module, wrong example inputs, bad CLI argument).
- ``KilnParseError``: malformed IR text; carries ``line`` and ``column`` (1-based) and the source name.
- ``VerificationError``: malformed IR; names the node and what is wrong with it.
- ``UnsupportedError``: something kiln cannot represent or compile; callers fall back to eager.
- ``ArtifactError``: a missing, corrupted or incompatible artifact or cache file; names the file.
- ``KilnCacheWarning``: a cache entry (TVM kernel, tuning record, compiled model) was ignored: corrupt,
  foreign version, unreadable. The warning names the file and the reason; the work is redone.
"""

from __future__ import annotations


class KilnError(Exception):
    pass


class KilnInputError(KilnError, ValueError):
    pass


class KilnParseError(KilnError):
    def __init__(self, message: str, line: int, column: int, source: str = "<ir>"):
        self.line, self.column, self.source = line, column, source
        super().__init__(f"{source}:{line}:{column}: {message}")


class VerificationError(KilnError):
    def __init__(self, message: str, node=None):
        self.node = node
        super().__init__(message)


class UnsupportedError(KilnError, NotImplementedError):
    pass


class ArtifactError(KilnError):
    pass


class KilnCacheWarning(UserWarning):
    pass


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (torch's messages run to pages)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
