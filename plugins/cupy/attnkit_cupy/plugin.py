"""attnkit entry point of the attnkit-cupy distribution."""

from attnkit import hookimpl

from .backend import CupyBackend


@hookimpl
def attnkit_register_backends(register):
    register(CupyBackend(), priority={"cuda": 50})
