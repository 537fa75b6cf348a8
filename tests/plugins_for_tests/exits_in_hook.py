import attnkit


@attnkit.hookimpl
def attnkit_register_backends(register):
    raise SystemExit("plugin gave up")
