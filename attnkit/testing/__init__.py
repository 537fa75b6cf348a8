"""The conformance suite: run it against any installed backend with ``attnkit check NAME``.

- `accuracy`: DESIGN.md's accuracy rule (``ref64`` / ``ref_lp`` comparison).
- `cases`: problem cases generated from a backend's declared capabilities.
- `plugin`: the pytest plugin (options ``--attnkit-backend``, ``--attnkit-device``,
  ``--attnkit-quick`` and the fixtures ``backend_name``, ``backend``, ``device``, ``quick``).
- ``suite_*.py``: the test modules ``attnkit check`` collects.
"""
