"""Parametrizing a suite module's fixtures from the checked backend's capabilities (the
``pytest_generate_tests`` each ``suite_*`` module declares)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest

from attnkit.registry import registry


def parametrize_cases(metafunc, generators: dict[str, Callable],
                      skip_reason: str | None = None) -> None:
    """For each ``fixture: generate`` the module's tests use, parametrize ``fixture`` with
    ``generate(capabilities, quick)`` (and ``device=`` where the generator takes it); ids are
    ``<backend>-<device>-<case id>`` (the first element's id where a generator yields
    tuples). A fixture with no cases for this backend gets one skipped case saying so
    (``skip_reason``, or that the backend declares none of the features it needs)."""
    config = metafunc.config
    name = config.getoption("--attnkit-backend", default=None)
    if not name:
        return
    caps = registry.get(name).capabilities
    quick = config.getoption("--attnkit-quick", default=False)
    device = config.getoption("--attnkit-device", default="cpu")
    prefix = f"{name}-{device}"
    for fixture, generate in generators.items():
        if fixture not in metafunc.fixturenames:
            continue
        takes_device = "device" in inspect.signature(generate).parameters
        cs = generate(caps, quick, device=device) if takes_device else generate(caps, quick)
        if not cs:
            reason = skip_reason or f"the backend declares none of the features {fixture} needs"
            metafunc.parametrize(fixture, [pytest.param(None, marks=pytest.mark.skip(
                reason=reason))], ids=[f"{prefix}-none"])
            continue
        ids = [f"{prefix}-{(c[0] if isinstance(c, tuple) else c).id}" for c in cs]
        metafunc.parametrize(fixture, cs, ids=ids)
