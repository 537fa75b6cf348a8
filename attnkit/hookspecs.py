"""The one hook a plugin implements.

A plugin is a module named by an entry point in the ``attnkit`` group::

    [project.entry-points.attnkit]
    mybackend = "my_package.attnkit_plugin"

and the module implements::

    from attnkit import hookimpl

    @hookimpl
    def attnkit_register_backends(register):
        register(MyBackend(), priority={"cuda": 80})
"""

import pluggy

hookspec = pluggy.HookspecMarker("attnkit")
hookimpl = pluggy.HookimplMarker("attnkit")


@hookspec
def attnkit_register_backends(register):
    """Register this plugin's backends by calling ``register(backend, priority=...)``.

    ``priority`` is an int, or a dict from device type (``"cpu"``, ``"cuda"``) to int; the
    highest-priority backend that can run a problem is chosen for ``backend="auto"``.
    ``priority=None`` registers a backend that is only ever used when asked for by name.
    """
