import attnkit
from attnkit.reference_backend import ReferenceBackend


@attnkit.hookimpl
def attnkit_register_backends(register):
    register(ReferenceBackend(), priority=5)
