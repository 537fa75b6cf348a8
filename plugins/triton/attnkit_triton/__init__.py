"""attnkit's Triton backend: fused forward and backward attention kernels."""

from .backend import TritonBackend

__all__ = ["TritonBackend"]
