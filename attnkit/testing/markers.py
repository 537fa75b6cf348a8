"""Requirement markers for a tests directory: a test marked ``@pytest.mark.cuda`` (or
``sm90``, ``interpreter``, ``nvcc``) is skipped, with the reason, where the machine does not
meet it. A directory's ``conftest.py`` defines the markers it uses, once::

    from attnkit.testing import markers

    pytest_configure, pytest_runtest_setup = markers.hooks(
        cuda=markers.cuda, nvcc=markers.nvcc)

Each requirement is a function returning ``""`` when met, else why not; its docstring is the
marker's description (``pytest --markers``). A directory may pass its own.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytest
import torch

#: Read when this module is imported, as Triton decides at import whether to interpret.
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def cuda() -> str:
    """needs a CUDA device"""
    return "" if torch.cuda.is_available() else "needs a CUDA device"


def sm90() -> str:
    """needs an sm_90 (Hopper) GPU"""
    if not torch.cuda.is_available():
        return "needs an sm_90 GPU: no CUDA device"
    cc = torch.cuda.get_device_capability()
    return "" if cc == (9, 0) else f"needs an sm_90 GPU; this one is sm_{cc[0]}{cc[1]}"


def compiled(requirement: Callable[[], str]) -> Callable[[], str]:
    """``requirement``, with the Triton interpreter off (it runs kernels on CPU tensors
    only): for GPU tests of a Triton backend, whose tests also run interpreted."""
    def check() -> str:
        return ("TRITON_INTERPRET=1 runs Triton kernels on CPU tensors only" if _INTERPRETING
                else requirement())

    check.__doc__ = f"{(requirement.__doc__ or '').strip()}, with TRITON_INTERPRET unset"
    return check


def interpreter() -> str:
    """runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1 before triton is imported"""
    return "" if _INTERPRETING else ("needs TRITON_INTERPRET=1 in the environment of the "
                                     "pytest process (kernels on CPU tensors)")


def nvcc() -> str:
    """needs nvcc on PATH"""
    return "" if shutil.which("nvcc") else "nvcc is not on PATH"


def backend_usable(name: str) -> Callable[[], str]:
    """A requirement: a CUDA device, and backend ``name`` available on it."""
    def usable() -> str:
        why = cuda()
        if why:
            return why
        import attnkit

        reg = attnkit.backends().get(name)
        if reg is None:
            return f"backend {name!r} is not registered"
        ok, reason = reg.availability
        return "" if ok else f"backend {name!r} is not available: {reason}"

    usable.__doc__ = f"needs a CUDA device usable by the {name} backend"
    return usable


def hooks(**requirements: Callable[[], str]):
    """``(pytest_configure, pytest_runtest_setup)`` for a conftest: the first registers one
    marker per keyword, the second skips a test marked with one whose requirement is unmet
    (each requirement asked once per session)."""
    answers: dict[str, str] = {}

    def pytest_configure(config):
        for name, check in requirements.items():
            config.addinivalue_line("markers", f"{name}: {(check.__doc__ or '').strip()}")

    def pytest_runtest_setup(item):
        for name, check in requirements.items():
            if item.get_closest_marker(name) is None:
                continue
            if name not in answers:
                answers[name] = check()
            if answers[name]:
                pytest.skip(answers[name])

    return pytest_configure, pytest_runtest_setup
