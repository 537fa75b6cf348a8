"""``attnkit check``: run the conformance suite through pytest against one backend."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

SUITE_DIR = os.path.dirname(os.path.abspath(__file__))


def suite_files(backend=None) -> list[str]:
    """The core's suite modules, then the backend's own (`backend_modules`), as files."""
    core = sorted(os.path.join(SUITE_DIR, f) for f in os.listdir(SUITE_DIR)
                  if f.startswith("suite_") and f.endswith(".py"))
    return core + ([] if backend is None else backend_modules(backend))


def backend_modules(backend) -> list[str]:
    """Files of the modules a backend adds to its suite: ``backend.conformance_modules()``,
    importable module names (none if the backend has no such method)."""
    hook = getattr(backend, "conformance_modules", None)
    names = tuple(hook()) if hook is not None else ()
    files = []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError) as e:
            raise pytest.UsageError(f"backend {backend.name!r} names conformance module "
                                    f"{name!r}, which cannot be found: {e}") from e
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            raise pytest.UsageError(f"backend {backend.name!r} names conformance module "
                                    f"{name!r}, which is not an importable .py file")
        files.append(spec.origin)
    return files


def run_check(backend: str, device: str = "cpu", quick: bool = False,
              pytest_args: list[str] | None = None, part: str | None = None) -> int:
    """Exit code of pytest; a run that collected no test is a failure, not a pass.
    ``part`` ``"K/N"`` runs the K-th of N consecutive slices of the suite (a suite longer
    than one sitting on a GPU machine runs as N calls; together they run every test once)."""
    from ..registry import NoBackendError, registry

    extra = [a for a in (pytest_args or []) if a != "--"]
    try:
        own = backend_modules(registry.get(backend))
    except NoBackendError:
        own = []  # the plugin reports the unknown or failed backend as a usage error
    except pytest.UsageError as e:
        print(f"attnkit check: {e}", file=sys.stderr)
        return int(pytest.ExitCode.USAGE_ERROR)
    args = [
        *suite_files(), *own,
        "-p", "attnkit.testing.plugin",
        f"--attnkit-backend={backend}",
        f"--attnkit-device={device}",
        "-q", "-rfEs",
        "-p", "no:cacheprovider",
        # The suite's files live in site-packages: keep pytest from picking up a rootdir
        # conftest of whatever directory the user stands in.
        "--rootdir", SUITE_DIR, "--noconftest",
        *(["--attnkit-quick"] if quick else []),
        *([f"--attnkit-part={part}"] if part else []),
        *extra,
    ]
    code = pytest.main(args)
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        print(f"attnkit check: no conformance test ran for backend {backend!r}", file=sys.stderr)
        return 1
    return int(code)
