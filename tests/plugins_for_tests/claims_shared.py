"""One of two plugins (with ``claims_shared_too``) that both name a backend ``shared``; each
also has a backend of its own."""
import attnkit
from plugins_for_tests.good import Good


def named(name):
    return type(name.title(), (Good,), {"name": name})()


@attnkit.hookimpl
def attnkit_register_backends(register):
    register(named("shared"), priority=30)
    register(named("only-first"), priority=None)
