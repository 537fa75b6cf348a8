"""Entry point module: registers the Triton backend with attnkit."""

import attnkit

from .backend import TritonBackend


@attnkit.hookimpl
def attnkit_register_backends(register):
    register(TritonBackend(), priority={"cuda": 100})
