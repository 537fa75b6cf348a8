"""The other plugin claiming ``shared`` (see ``claims_shared``)."""
import attnkit
from plugins_for_tests.claims_shared import named


@attnkit.hookimpl
def attnkit_register_backends(register):
    register(named("shared"), priority=40)
    register(named("only-second"), priority=None)
