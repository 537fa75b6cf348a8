"""Registers ``torch-blocked``: the first choice on CPU (and MPS), below the compiled GPU
backends (triton 100, cupy 50) on CUDA and XPU."""

import attnkit

from .backend import TorchBlockedBackend

PRIORITY = {"cpu": 100, "mps": 100, "cuda": 10, "xpu": 10}


@attnkit.hookimpl
def attnkit_register_backends(register):
    register(TorchBlockedBackend(), priority=PRIORITY)
