"""Imports the built-in passes so that they register themselves by name."""

from kiln.passes import attention, canonicalize, constant_fold, cse, dce, fold_bn, fusion, layout  # noqa: F401
