"""Triton kernels of the four passes (one file per kernel family) and their backend.

Importing this package imports triton; ``gradreg_kernels.backends`` imports it lazily,
only when the "triton" backend is first asked for.
"""

from .backend import TritonBackend

__all__ = ["TritonBackend"]
