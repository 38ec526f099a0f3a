"""Marlin int4 weights: the packed layout (``format``), the matmul backends (``backends``) and their kernels."""
