"""``attnkit check``: run the conformance suite through pytest against one backend."""

from __future__ import annotations

import os
import sys

import pytest

SUITE_DIR = os.path.dirname(os.path.abspath(__file__))


def suite_files() -> list[str]:
    return sorted(os.path.join(SUITE_DIR, f) for f in os.listdir(SUITE_DIR)
                  if f.startswith("suite_") and f.endswith(".py"))


def run_check(backend: str, device: str = "cpu", quick: bool = False,
              pytest_args: list[str] | None = None) -> int:
    """Exit code of pytest; a run that collected no test is a failure, not a pass."""
    extra = [a for a in (pytest_args or []) if a != "--"]
    args = [
        *suite_files(),
        "-p", "attnkit.testing.plugin",
        f"--attnkit-backend={backend}",
        f"--attnkit-device={device}",
        "-q", "-rfE",
        "-p", "no:cacheprovider",
        # The suite's files live in site-packages: keep pytest from picking up a rootdir
        # conftest of whatever directory the user stands in.
        "--rootdir", SUITE_DIR, "--noconftest",
        *(["--attnkit-quick"] if quick else []),
        *extra,
    ]
    code = pytest.main(args)
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        print(f"attnkit check: no conformance test ran for backend {backend!r}", file=sys.stderr)
        return 1
    return int(code)
