"""Plugin loading, selection, caching and the errors around them."""

import importlib.metadata
import time

import pytest
import torch

from attnkit import registry as registry_mod
from attnkit.registry import (
    AttnkitPluginWarning,
    NoBackendError,
    PluginLoadError,
    Registry,
)
from attnkit.spec import AttentionProblem

PLUGINS = {
    "good": "plugins_for_tests.good",
    "broken_import": "plugins_for_tests.broken_import",
    "raises_in_hook": "plugins_for_tests.raises_in_hook",
    "duplicate_name": "plugins_for_tests.duplicate_name",
    "no_hook": "plugins_for_tests.no_hook",
}


@pytest.fixture
def make_registry(monkeypatch):
    def make(*names, env=None):
        eps = [importlib.metadata.EntryPoint(n, PLUGINS[n], "attnkit") for n in names]
        monkeypatch.setattr(registry_mod.importlib.metadata, "entry_points",
                            lambda group: eps if group == "attnkit" else [])
        for key in ("ATTNKIT_PLUGINS", "ATTNKIT_STRICT_PLUGINS"):
            monkeypatch.delenv(key, raising=False)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        return Registry()
    return make


def problem(D=32, dtype=torch.float32, **kw):
    q = torch.randn(1, 2, 4, D, dtype=dtype)
    k = torch.randn(1, 2, 6, D, dtype=dtype)
    return AttentionProblem.from_tensors(q, k, k, **kw)


def test_builtin_reference_is_never_auto(make_registry):
    reg = make_registry()
    assert set(reg.registrations()) == {"reference"}
    assert reg.select(problem(), "reference").name == "reference"
    with pytest.raises(NoBackendError, match="no attnkit backend can compute"):
        reg.select(problem())


def test_selection_by_priority_and_capabilities(make_registry):
    reg = make_registry("good")
    assert reg.select(problem()).name == "better"  # highest priority that fits
    assert reg.select(problem(D=100)).name == "good"  # better's head dim stops at 64
    assert reg.select(problem(), "auto").name == "better"
    p = problem(softcap=3.0)
    assert reg.select(p).name == "better"
    # needs gradients: better has no backward, good no softcap -> nothing fits
    with pytest.raises(NoBackendError) as e:
        reg.select(problem(softcap=3.0, needs_grad=True))
    msg = str(e.value)
    assert "better" in msg and "gradients not supported" in msg
    assert "good" in msg and "softcap not supported" in msg
    assert "unavailable: needs a flux capacitor" in msg
    assert "D=32" in msg  # the inputs are listed


def test_named_backend_errors(make_registry):
    reg = make_registry("good")
    with pytest.raises(NoBackendError, match=r"backend 'better' cannot compute .*head dim 100 "
                                             r"outside supported \[1, 64\]"):
        reg.select(problem(D=100), "better")
    with pytest.raises(NoBackendError, match=r"unknown backend 'nope'; registered: "
                                             r"\['better', 'good', 'reference', 'unavailable'\]"):
        reg.select(problem(), "nope")
    with pytest.raises(NoBackendError, match="not available here: needs a flux capacitor"):
        reg.select(problem(), "unavailable")
    with pytest.raises(NoBackendError, match=r"dtype torch.float16 not in supported"):
        reg.select(problem(dtype=torch.float16), "good")


def test_explain_lists_every_backend(make_registry):
    ex = make_registry("good").explain(problem(D=100))
    assert ex.chosen == "good"
    names = [v.name for v in ex.verdicts]
    assert names == ["unavailable", "better", "good", "reference"]
    text = str(ex)
    assert "chosen: good" in text and "head dim 100 outside" in text
    assert "by name only" in text


def test_selection_is_cached(make_registry):
    reg = make_registry("good")
    p = problem()
    first = reg.select(p)
    calls = []
    better = reg.get("better")
    better.not_supported_reasons = lambda prob: calls.append(prob) or []
    assert reg.select(p) is first and calls == []  # cache hit: no registry walk
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        reg.select(p)
    per_call = (time.perf_counter() - t0) / n
    print(f"cached select: {per_call * 1e6:.2f} us")  # measured, not asserted


def test_cache_cleared_on_register(make_registry):
    reg = make_registry("good")
    p = problem()
    assert reg.select(p).name == "better"
    from plugins_for_tests.good import Good

    class Best(Good):
        name = "best"

    reg.register(Best(), priority=50)
    assert reg.select(p).name == "best"
    reg.unregister("best")
    assert reg.select(p).name == "better"


def test_broken_plugins_are_recorded_and_others_work(make_registry):
    reg = make_registry("broken_import", "good", "raises_in_hook", "duplicate_name", "no_hook")
    with pytest.warns(AttnkitPluginWarning, match="some plugins failed to load"):
        names = set(reg.registrations())
    assert names == {"reference", "good", "better", "unavailable"}
    failures = {f.plugin: f.error for f in reg.failures}
    assert "ModuleNotFoundError" in failures["broken_import"]
    assert "a_module_that_does_not_exist" in failures["broken_import"]
    assert failures["raises_in_hook"] == "RuntimeError: hook exploded"
    assert "backend name 'reference' is already registered by plugin" in failures["duplicate_name"]
    assert "defines no attnkit_register_backends hook" in failures["no_hook"]
    assert reg.select(problem()).name == "better"
    with pytest.raises(NoBackendError, match=r"backend 'broken_import' failed to load: .*"
                                             r"ModuleNotFoundError"):
        reg.get("broken_import")


def test_strict_plugins(make_registry):
    reg = make_registry("good", "raises_in_hook", env={"ATTNKIT_STRICT_PLUGINS": "1"})
    with pytest.raises(PluginLoadError, match="hook exploded"):
        reg.registrations()


@pytest.mark.parametrize("env, expected", [
    ("", {"reference"}),
    ("good", {"reference", "good", "better", "unavailable"}),
    ("raises_in_hook, nothing_else", {"reference"}),
])
def test_attnkit_plugins_limits_loading(make_registry, env, expected, recwarn):
    reg = make_registry("good", "raises_in_hook", env={"ATTNKIT_PLUGINS": env})
    assert set(reg.registrations()) == expected


def test_availability_that_raises_is_recorded(make_registry):
    reg = make_registry("good")
    from plugins_for_tests.good import Good

    class Explodes(Good):
        name = "explodes"

        def availability(self):
            raise OSError("driver gone")

    reg.register(Explodes(), priority=100)
    assert reg.select(problem()).name == "better"
    verdict = next(v for v in reg.explain(problem()).verdicts if v.name == "explodes")
    assert "availability() raised OSError: driver gone" in verdict.reasons[0]


def test_cuda_capability_min_is_checked_by_the_base_class(monkeypatch):
    """`Capabilities.cuda_capability_min`: older GPUs are refused by name, an unreadable one
    says why, other devices are not asked."""
    import attnkit.backend as backend_mod
    from attnkit.backend import Backend, Capabilities

    class NeedsAmpere(Backend):
        name = "needs-ampere"
        capabilities = Capabilities(devices=frozenset({"cuda", "cpu"}),
                                    dtypes=frozenset({torch.float16}),
                                    cuda_capability_min=(8, 0))

    def problem(device):
        return AttentionProblem(1, 1, 1, 4, 4, 16, torch.float16, torch.device(device))

    def broken(device):
        raise RuntimeError("no driver")

    b = NeedsAmpere()
    monkeypatch.setattr(backend_mod, "cuda_capability", lambda device: (7, 5))
    assert b.not_supported_reasons(problem("cuda:1")) == [
        "cuda:1 has compute capability 7.5; the needs-ampere backend needs 8.0 or newer"]
    assert b.not_supported_reasons(problem("cpu")) == []
    monkeypatch.setattr(backend_mod, "cuda_capability", lambda device: (8, 6))
    assert b.not_supported_reasons(problem("cuda:1")) == []
    monkeypatch.setattr(backend_mod, "cuda_capability", broken)
    assert b.not_supported_reasons(problem("cuda:1")) == [
        "cannot read the compute capability of cuda:1 (RuntimeError: no driver)"]
