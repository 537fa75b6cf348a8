"""Registers with a priority selection cannot use (a string)."""
import attnkit
from plugins_for_tests.good import Good


@attnkit.hookimpl
def attnkit_register_backends(register):
    register(Good(), priority="high")
