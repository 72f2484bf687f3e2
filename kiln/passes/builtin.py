"""Imports the built-in passes so that they register themselves by name (``quantize``: -O quantize,O2)."""

from kiln.passes import attention, canonicalize, constant_fold, cse, dce, fold_bn, fusion, layout, quantize  # noqa: F401
