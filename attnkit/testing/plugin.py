"""The pytest plugin behind ``attnkit check``: options, fixtures and case parametrization.

Load it with ``-p attnkit.testing.plugin`` and point it at a backend with
``--attnkit-backend NAME [--attnkit-device cuda] [--attnkit-quick] [--attnkit-part K/N]``.
Tests that take a ``case`` argument are parametrized with the cases generated from that
backend's capabilities; ``refused`` with the problems it does not claim. Every call of the
backend's forward and backward is checked at the boundary (inputs left as they were,
gradients in their inputs' dtype and shape), and the session fails if the forward never ran.
"""

from __future__ import annotations

import pytest
import torch

from ..registry import NoBackendError, registry
from . import cases as _cases

_calls = {"forward": 0, "backward": 0, "forward_varlen": 0, "backward_varlen": 0,
          "forward_paged": 0}


def pytest_addoption(parser):
    group = parser.getgroup("attnkit", "attnkit conformance")
    group.addoption("--attnkit-backend", default=None, help="backend under test")
    group.addoption("--attnkit-device", default="cpu", help="device: cpu or cuda")
    group.addoption("--attnkit-quick", action="store_true", help="small grid")
    group.addoption("--attnkit-part", default=None, metavar="K/N",
                    help="run only the K-th of N consecutive slices of the collected tests")


def parse_part(text: str) -> tuple[int, int]:
    """``"K/N"`` as ``(K, N)`` with ``1 <= K <= N``; anything else raises ``ValueError``."""
    k, sep, n = text.partition("/")
    if sep and k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n):
        return int(k), int(n)
    raise ValueError(f"expected K/N with 1 <= K <= N, e.g. 1/2; got {text!r}")


def part_slice(count: int, k: int, n: int) -> slice:
    """The K-th of N consecutive slices of ``count`` tests; the N slices cover each test once.
    Consecutive, not interleaved: neighbouring cases share compiled kernels, so each slice
    compiles about its own share of them."""
    return slice((k - 1) * count // n, k * count // n)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    part = config.getoption("--attnkit-part", default=None)
    if not part or not config.getoption("--attnkit-backend"):
        return
    try:
        keep = part_slice(len(items), *parse_part(part))
    except ValueError as e:
        raise pytest.UsageError(f"--attnkit-part: {e}") from None
    dropped = items[:keep.start] + items[keep.stop:]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = items[keep]


def _backend_name(config) -> str:
    name = config.getoption("--attnkit-backend")
    if not name:
        raise pytest.UsageError("the attnkit conformance suite needs --attnkit-backend NAME")
    return name


def _backend(config):
    name = _backend_name(config)
    try:
        backend = registry.get(name)  # carries the recorded error of a failed plugin
    except NoBackendError as e:
        raise pytest.UsageError(str(e)) from e
    ok, why = registry.registrations()[name].availability
    if not ok:
        raise pytest.UsageError(f"backend {name!r} is not available here: {why}")
    return backend


def pytest_configure(config):
    if not config.getoption("--attnkit-backend"):
        return
    backend = _backend(config)
    device = config.getoption("--attnkit-device")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise pytest.UsageError("--attnkit-device cuda but torch sees no CUDA device")
    if device.split(":")[0] not in backend.capabilities.devices:
        raise pytest.UsageError(
            f"backend {backend.name!r} declares devices {sorted(backend.capabilities.devices)}, "
            f"not {device!r}")
    _watch_calls(backend)


def pytest_unconfigure(config):
    """Unwrap what `_watch_calls` wrapped: a session run in-process (pytester) leaves the
    registered instance as it found it."""
    if not config.getoption("--attnkit-backend", default=None):
        return
    backend = registry.get(config.getoption("--attnkit-backend"))
    if getattr(backend, "_attnkit_watched", False):
        for method in _INPUTS:
            vars(backend).pop(method, None)
        del backend._attnkit_watched


def _watch_calls(backend):
    """Wrap the instance's forward/backward so the session can prove the backend ran, and
    hold every call to the contract at the boundary (`_checked`)."""
    if getattr(backend, "_attnkit_watched", False):
        return
    for method in _INPUTS:
        inner = getattr(backend, method)

        def watched(*args, _inner=inner, _method=method, **kwargs):
            _calls[_method] += 1
            return _checked(_method, _inner, args, kwargs)

        setattr(backend, method, watched)
    backend._attnkit_watched = True


_INPUTS = {"forward": ("q", "k", "v", "seqlens_k"),
           "backward": ("q", "k", "v", "out", "lse", "dout", "seqlens_k"),
           "forward_varlen": ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"),
           "backward_varlen": ("q", "k", "v", "out", "lse", "dout", "cu_seqlens_q",
                               "cu_seqlens_k"),
           "forward_paged": ("q", "k_pages", "v_pages", "block_table", "seqlens_k")}


def _checked(method, inner, args, kwargs):
    """Call ``inner`` and check what autograd would hide: the inputs are left as they were
    (dout may be a buffer other gradients still use), and dq, dk, dv have q's, k's and v's
    dtype and shape (autograd casts a wrong dtype silently; under torch.compile the fake
    kernel promises the right one). The suite's tensors are small, so copies are cheap."""
    named = dict(zip(_INPUTS[method], args[1:]))
    named.update((n, t) for n, t in kwargs.items() if isinstance(t, torch.Tensor))  # dlse
    before = {n: t.clone() for n, t in named.items() if isinstance(t, torch.Tensor)}
    result = inner(*args, **kwargs)
    for n, t in before.items():
        if not _same(named[n], t):
            raise AssertionError(f"backend {method} wrote into its input {n} "
                                 f"(shape {tuple(t.shape)}, dtype {t.dtype})")
    if method.startswith("backward"):
        for n, g in zip(("dq", "dk", "dv"), result):
            t = named[n[1]]
            if g.dtype != t.dtype or g.shape != t.shape:
                raise AssertionError(f"backend backward returned {n} {g.dtype} "
                                     f"{tuple(g.shape)}; the contract is {n[1]}'s "
                                     f"{t.dtype} {tuple(t.shape)}")
    return result


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    # NaN where there was NaN counts as unchanged (a backend without lse may return NaN).
    if torch.equal(a, b):
        return True
    return bool(((a == b) | (a.isnan() & b.isnan())).all()) if a.is_floating_point() else False


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if not config.getoption("--attnkit-backend"):
        return
    backend = _backend(config)
    caps = backend.capabilities
    quick = config.getoption("--attnkit-quick")
    device = config.getoption("--attnkit-device")
    prefix = f"{backend.name}-{device}"
    if "case" in metafunc.fixturenames:
        cs = _cases.generate(caps, quick=quick, device=device)
        metafunc.parametrize("case", cs, ids=[f"{prefix}-{c.id}" for c in cs])
    if "refused" in metafunc.fixturenames:
        rs = _cases.refused_problems(caps)
        if not rs:
            reason = "the backend claims every dtype and feature: nothing to refuse"
            metafunc.parametrize("refused", [pytest.param(None, marks=pytest.mark.skip(reason))],
                                 ids=[f"{prefix}-nothing"])
        else:
            metafunc.parametrize("refused", rs, ids=[f"{prefix}-{r[0].replace(' ', '_')}"
                                                     for r in rs])


@pytest.fixture(scope="session")
def backend_name(pytestconfig) -> str:
    return _backend_name(pytestconfig)


@pytest.fixture(scope="session")
def backend(pytestconfig):
    return _backend(pytestconfig)


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    return pytestconfig.getoption("--attnkit-device")


@pytest.fixture(scope="session")
def quick(pytestconfig) -> bool:
    return pytestconfig.getoption("--attnkit-quick")


def _xdist_controller(config) -> bool:
    """Under pytest-xdist the tests run in workers; each worker checks its own calls."""
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config,
                                                                             "workerinput")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not config.getoption("--attnkit-backend") or _xdist_controller(config):
        return
    terminalreporter.write_line(
        f"attnkit conformance: backend {_backend_name(config)!r} on "
        f"{config.getoption('--attnkit-device')}: forward ran {_calls['forward']} times, "
        f"backward {_calls['backward']} times"
        + (f", forward_varlen {_calls['forward_varlen']}, backward_varlen "
           f"{_calls['backward_varlen']}" if _calls["forward_varlen"] else "")
        + (f", forward_paged {_calls['forward_paged']}" if _calls["forward_paged"] else ""))


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if (not config.getoption("--attnkit-backend") or exitstatus != 0
            or config.option.collectonly or _xdist_controller(config)):
        return
    if not (_calls["forward"] or _calls["forward_varlen"] or _calls["forward_paged"]):
        # Green without the backend ever running would be a lie.
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
