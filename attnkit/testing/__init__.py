"""The conformance suite: run it against any installed backend with ``attnkit check NAME
[--device cuda] [--quick]``.

- `accuracy`: the accuracy rule (``ref64`` / ``ref_lp`` comparison) and bitwise comparison.
- `cases`: problem cases generated from a backend's declared capabilities;
  `decode_cases`: the KV-cache and merge cases; `paged_cases`: page pools and block tables
  built from contiguous caches. A dense or packed case takes its batch, heads and sizes
  (through ``dtype``) by position or keyword, a KV-cache case everything past its heads by
  keyword; options (mask, softcap, layout, tag, ...) are keyword-only everywhere.
- `checks`: the per-case checks as functions; `cuda_checks`: the checks only a CUDA device can
  pose (side streams, offsets past 2^31 elements).
- `scratch`: `uninitialised_scratch`, torch's uninitialised allocations filled with NaN.
- `plugin`: the pytest plugin (options ``--attnkit-backend``, ``--attnkit-device``,
  ``--attnkit-quick`` and the fixtures ``backend_name``, ``backend``, ``device``, ``quick``;
  tests taking ``case`` or ``refused`` are parametrized from the capabilities).
- `runner`: what ``attnkit check`` runs; `markers`: requirement markers (``cuda``, ``sm90``,
  ``interpreter``, ``nvcc``) for a tests directory's ``conftest.py``.
- ``suite_*.py``: the test modules ``attnkit check`` collects: ``attention`` (accuracy,
  repeatability, refusals, out-of-range ``seqlens_k``), ``decode``, ``compile``
  (``torch.compile(fullgraph=True)`` against eager), ``cuda``, ``isolation`` (keys no query
  sees and uninitialised scratch never read, a NaN row kept in its row), ``lse_grad``,
  ``varlen`` (packed variable-length batches, cases from `varlen_cases`), ``dropout``
  (the keep mask of `attnkit.dropout`, read back from the backend's output),
  ``varlen_dropout`` (dropout on packed batches: the dense batch of documents' mask), ``paged``
  (paged KV caches against the same keys laid out contiguously) and ``context_parallel``
  (the blocks of `attnkit.distributed`'s ring, simulated in one process, merged and
  differentiated with the global out and lse).
- `dropout_keep_mask`: a call's whole keep mask, materialised (for tests).

A backend's own cases: a backend adds paths only it has (a kernel route forced by a switch,
state it keeps between calls) to its ``attnkit check`` by overriding
``Backend.conformance_modules()`` to return importable module names::

    class MyBackend(Backend):
        def conformance_modules(self):
            return ("my_backend.conformance",)

``attnkit check`` collects those modules after the core's suite, in the same pytest session:
they get the same options and fixtures (``backend``, ``backend_name``, ``device``, ``quick``,
and ``case`` parametrized with the generated cases), every call of the backend is held to
the same boundary checks, and they may call `checks` and `cuda_checks`. The triton plugin's
``attnkit_triton.suite_launch_paths`` is one.

Memory checking: the suite is the workload for ``compute-sanitizer``, e.g.
``compute-sanitizer --tool memcheck attnkit check cupy --device cuda --quick -- -k decode``.
"""

from attnkit.dropout import keep_mask as dropout_keep_mask  # noqa: E402

__all__ = ["dropout_keep_mask"]
