"""Registers one backend, then fails: the one it registered must not stay behind."""
import attnkit
from plugins_for_tests.good import Good


class Half(Good):
    name = "half"


@attnkit.hookimpl
def attnkit_register_backends(register):
    register(Half(), priority=50)
    raise RuntimeError("second backend's library missing")
