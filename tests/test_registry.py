"""Plugin loading, selection, caching and the errors around them."""

import sys
import time
import types

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
    "bad_priority": "plugins_for_tests.bad_priority",
    "exits_on_import": "plugins_for_tests.exits_on_import",
    "exits_in_hook": "plugins_for_tests.exits_in_hook",
    "fails_part_way": "plugins_for_tests.fails_part_way",
    "claims_shared": "plugins_for_tests.claims_shared",
    "claims_shared_too": "plugins_for_tests.claims_shared_too",
}


def _entry_point(name):
    """An entry point of a distribution named after the plugin (``dist-<name> 1.0``)."""
    dist = types.SimpleNamespace(name=f"dist-{name}", version="1.0")
    return types.SimpleNamespace(name=name, value=PLUGINS[name], dist=dist)


@pytest.fixture
def make_registry(monkeypatch):
    def make(*names, env=None):
        eps = [_entry_point(n) for n in names]
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
    assert failures["duplicate_name"] == (
        "ValueError: backend name 'reference' is claimed by plugin 'duplicate_name' "
        "(dist-duplicate_name 1.0) and by plugin 'attnkit.reference_backend' (attnkit 0.1.0 "
        "(built in)); the built-in 'reference' is kept")
    assert "defines no attnkit_register_backends hook" in failures["no_hook"]
    assert reg.select(problem()).name == "better"
    with pytest.raises(NoBackendError, match=r"backend 'broken_import' failed to load: .*"
                                             r"ModuleNotFoundError"):
        reg.get("broken_import")


def test_strict_plugins(make_registry):
    reg = make_registry("good", "raises_in_hook", env={"ATTNKIT_STRICT_PLUGINS": "1"})
    with pytest.raises(PluginLoadError, match="hook exploded"):
        reg.registrations()


def test_strict_plugins_load_once_and_raise_the_same_failure(make_registry, monkeypatch):
    """Each use raises the recorded failure again; nothing is imported or registered twice
    (a reload piled up "already registered" failures blamed on the built-ins)."""
    reg = make_registry("good", "raises_in_hook", env={"ATTNKIT_STRICT_PLUGINS": "1"})
    imports = []
    real_import = registry_mod.importlib.import_module
    monkeypatch.setattr(registry_mod.importlib, "import_module",
                        lambda name: imports.append(name) or real_import(name))
    messages = []
    for call in (reg.registrations, lambda: reg.get("good"), reg.registrations):
        with pytest.raises(PluginLoadError) as e:
            call()
        messages.append(str(e.value))
    assert len(imports) == 3  # the built-in and the two plugins, once
    assert messages[0] == messages[1] == messages[2]
    assert "hook exploded" in messages[0] and "already registered" not in messages[0]
    assert len(reg.failures) == 1


def test_priority_is_validated_at_registration(make_registry):
    """A priority selection cannot use fails its plugin at load, naming it, instead of
    breaking every automatic selection afterwards."""
    reg = make_registry("bad_priority", "good")
    with pytest.warns(AttnkitPluginWarning):
        assert reg.select(problem()).name == "better"
    (failure,) = reg.failures
    assert failure.plugin == "bad_priority"
    assert failure.error.startswith("TypeError: plugin 'bad_priority' registers backend 'good' "
                                    "with priority='high': 'high' is not an int")
    from plugins_for_tests.good import Good

    class Other(Good):
        name = "other"

    for bad, why in ((True, "True is not an int"), (2.5, "2.5 is not an int"),
                     ({"cuda": "80"}, "'80' is not an int"), ({0: 1}, "device type 0 is not")):
        with pytest.raises(TypeError, match=f"plugin 'runtime' registers backend 'other' "
                                            f"with priority=.*: {why}"):
            reg.register(Other(), priority=bad)
    assert "other" not in reg.registrations()
    reg.register(Other(), priority={"cpu": 60})
    assert reg.select(problem()).name == "other"


@pytest.mark.parametrize("plugin, error", [
    ("exits_on_import", "SystemExit: 3"),
    ("exits_in_hook", "SystemExit: plugin gave up"),
])
def test_system_exit_in_a_plugin_is_contained(make_registry, plugin, error):
    reg = make_registry(plugin, "good")
    with pytest.warns(AttnkitPluginWarning, match=error):
        assert reg.select(problem()).name == "better"
    assert [(f.plugin, f.error) for f in reg.failures] == [(plugin, error)]
    sys.modules.pop(PLUGINS[plugin], None)


def test_keyboard_interrupt_is_not_contained(make_registry, monkeypatch):
    reg = make_registry("good")

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(registry_mod.importlib, "import_module", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reg.registrations()


def test_hook_failing_part_way_withdraws_what_it_registered(make_registry):
    reg = make_registry("fails_part_way", "good")
    with pytest.warns(AttnkitPluginWarning, match="second backend's library missing"):
        assert "half" not in reg.registrations()
    assert reg.select(problem()).name == "better"  # half (priority 50) is gone


@pytest.mark.parametrize("order", [("claims_shared", "claims_shared_too"),
                                   ("claims_shared_too", "claims_shared")])
def test_name_claimed_by_two_distributions(make_registry, order):
    """Neither claimant gets the name, whatever the load order; both failures name both
    distributions, and asking for the name says why it is missing."""
    reg = make_registry(*order, "good")
    with pytest.warns(AttnkitPluginWarning):
        names = set(reg.registrations())
    assert names == {"reference", "good", "better", "unavailable", "only-first", "only-second"}
    errors = {f.plugin: f.error for f in reg.failures}
    assert set(errors) == {"claims_shared", "claims_shared_too"}
    for plugin, other in (order, order[::-1]):
        assert errors[plugin] == (
            f"ValueError: backend name 'shared' is claimed by plugin {plugin!r} "
            f"(dist-{plugin} 1.0) and by plugin {other!r} (dist-{other} 1.0); neither is "
            "registered")
    with pytest.raises(NoBackendError, match=r"backend 'shared' failed to load: .* claimed by"):
        reg.get("shared")
    assert reg.select(problem()).name == "better"


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
