"""Imports the built-in passes so that they register themselves by name."""

from kiln.passes import canonicalize, constant_fold, cse, dce  # noqa: F401
