"""Plugin loading and backend selection.

Plugins are modules named by entry points in the ``attnkit`` group; each is loaded on its own
so one broken plugin costs only itself: any exception while importing it or in its hook
(``SystemExit`` included, not ``KeyboardInterrupt``) is recorded as its failure, and the
backends its hook registered before failing are withdrawn. Plugins load once per process;
under ``ATTNKIT_STRICT_PLUGINS=1`` every later use raises the recorded failures again.

A backend name claimed by two plugins (two distributions, or two entry points) is a conflict
that the order of ``sys.path`` or of the entry points must not decide: neither claimant gets
the name, and each plugin's failure names both. The built-in backends (``reference``) are the
one exception: they are always registered, and a plugin claiming one of their names fails.

Selection picks, per problem, the highest-priority available backend with no reasons against
it, and caches that choice.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import numbers
import os
import threading
import traceback
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import pluggy

from . import hookspecs
from .backend import Backend
from .spec import AttentionProblem

ENTRY_POINT_GROUP = "attnkit"
#: Built in, but loaded through the hook like any plugin.
BUILTIN_PLUGINS = ("attnkit.reference_backend",)


class PluginLoadError(RuntimeError):
    """A plugin failed to load and ``ATTNKIT_STRICT_PLUGINS=1`` is set."""


class AttnkitPluginWarning(UserWarning):
    """One or more plugins failed to load; ``attnkit backends`` lists them."""


class NoBackendError(ValueError):
    """No backend (or not the one asked for) can compute this problem."""


@dataclass
class PluginFailure:
    plugin: str
    distribution: str
    error: str
    traceback: str = ""
    #: Backend names this failure cost (a name two plugins claimed), for `Registry.get`.
    backends: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} (distribution {self.distribution}): {self.error}"


@dataclass
class Registration:
    backend: Backend
    priority: int | Mapping[str, int] | None
    plugin: str
    distribution: str
    version: str
    _availability: tuple[bool, str] | None = field(default=None, repr=False)

    def priority_for(self, device_type: str) -> int | None:
        """None means: only when asked for by name."""
        if self.priority is None or isinstance(self.priority, int):
            return self.priority
        return self.priority.get(device_type)

    @property
    def availability(self) -> tuple[bool, str]:
        if self._availability is None:
            try:
                ok, reason = self.backend.availability()
                self._availability = (bool(ok), str(reason or ""))
            except Exception as e:  # availability must never raise; record it if it does
                self._availability = (False, f"availability() raised {type(e).__name__}: {e}")
        return self._availability


@dataclass
class Verdict:
    """One backend's answer to one problem, as ``explain`` reports it."""

    name: str
    priority: int | None
    available: bool
    reasons: list[str]

    @property
    def ok(self) -> bool:
        return self.available and not self.reasons


class Explanation:
    """Every backend's verdict on one problem, best first, and the one `auto` would choose."""

    def __init__(self, problem: AttentionProblem, verdicts: list[Verdict], chosen: str | None):
        self.problem = problem
        self.verdicts = verdicts
        self.chosen = chosen

    def __str__(self) -> str:
        lines = [f"problem: {self.problem.describe()}",
                 f"chosen: {self.chosen or 'none'}"]
        for v in self.verdicts:
            prio = "by name only" if v.priority is None else f"priority {v.priority}"
            status = "ok" if v.ok else "; ".join(v.reasons)
            lines.append(f"  {v.name:<16} ({prio}): {status}")
        return "\n".join(lines)

    __repr__ = __str__


class Registry:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._loaded = False
        self._regs: dict[str, Registration] = {}
        self.failures: list[PluginFailure] = []
        self._strict_error: str | None = None
        self._cache: dict[tuple[AttentionProblem, str | None], Backend] = {}

    # -- loading -------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if not self._loaded:
            with self._lock:
                if not self._loaded:
                    try:
                        self._load()
                    finally:  # once, even when it raises: a retry would register twice
                        self._loaded = True
        if self._strict_error is not None:  # a fresh exception each time, same message
            raise PluginLoadError(self._strict_error)

    def _sources(self) -> list[tuple[str, str, str, str, bool]]:
        """``(plugin, module target, distribution, version, built in)`` for every plugin."""
        from . import __version__

        builtin = f"attnkit {__version__} (built in)"
        sources = [(name, name, builtin, __version__, True) for name in BUILTIN_PLUGINS]
        allowed = os.environ.get("ATTNKIT_PLUGINS")
        allowed_names = None
        if allowed is not None:
            allowed_names = {n.strip() for n in allowed.split(",") if n.strip()}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if allowed_names is not None and ep.name not in allowed_names:
                continue
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown"
            sources.append((ep.name, ep.value, dist, ep.dist.version if ep.dist else "", False))
        return sources

    def _load(self) -> None:
        pm = pluggy.PluginManager("attnkit")
        pm.add_hookspecs(hookspecs)
        claims: dict[str, list[tuple[str, str, bool, Registration]]] = {}
        for plugin, target, dist, version, builtin in self._sources():
            offered: list[Registration] = []
            try:
                module = importlib.import_module(target.split(":")[0])
                pm.register(module, name=plugin)
                impls = [i for i in pm.hook.attnkit_register_backends.get_hookimpls()
                         if i.plugin_name == plugin]
                if not impls:
                    raise RuntimeError(f"{target} defines no attnkit_register_backends hook")
                for impl in impls:
                    impl.function(register=self._collector(plugin, dist, version, offered))
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # SystemExit too: a plugin must not end the process
                self._record_failure(plugin, dist, e)  # what it registered is withdrawn:
                continue  # `offered` is dropped
            for reg in offered:
                claims.setdefault(reg.backend.name, []).append((plugin, dist, builtin, reg))
        self._resolve(claims)
        if self.failures:
            if os.environ.get("ATTNKIT_STRICT_PLUGINS") == "1":
                self._strict_error = (
                    "attnkit plugins failed to load (ATTNKIT_STRICT_PLUGINS=1):\n"
                    + "\n".join(f"  {f}" for f in self.failures))
                return
            warnings.warn(
                "attnkit: some plugins failed to load; the others work. "
                + "; ".join(str(f) for f in self.failures)
                + " (see `attnkit backends`)",
                AttnkitPluginWarning,
                stacklevel=4,
            )

    def _resolve(self, claims) -> None:
        """Register each claimed name, or record the conflict: a built-in keeps its name, two
        or more plugins claiming one name all lose it (whatever order they loaded in)."""
        for name in sorted(claims):
            owners = claims[name]
            builtins = [c for c in owners if c[2]]
            if len(owners) == 1 or len(builtins) == 1:
                winner = builtins[0] if builtins else owners[0]
                self._regs[name] = winner[3]
                losers = [c for c in owners if c is not winner]
                outcome = f"the built-in {name!r} is kept"
            else:
                losers, outcome = owners, "neither is registered"
            for plugin, dist, _builtin, _reg in losers:
                others = ", ".join(f"plugin {p!r} ({d})" for p, d, _b, _r in owners
                                   if p != plugin)
                self.failures.append(PluginFailure(
                    plugin, dist, f"ValueError: backend name {name!r} is claimed by plugin "
                    f"{plugin!r} ({dist}) and by {others}; {outcome}", backends=(name,)))
        self._cache.clear()

    def _record_failure(self, plugin: str, dist: str, e: BaseException) -> None:
        self.failures.append(
            PluginFailure(plugin, dist, f"{type(e).__name__}: {e}", traceback.format_exc())
        )

    def _collector(self, plugin: str, dist: str, version: str, offered: list):
        """The ``register`` a plugin's hook calls while loading: it validates and collects;
        `_resolve` registers what survives once every plugin has loaded."""
        def register(backend: Backend, priority: int | Mapping[str, int] | None = 0) -> None:
            reg = self._registration(plugin, dist, version, backend, priority)
            if any(r.backend.name == backend.name for r in offered):
                raise ValueError(f"plugin {plugin!r} registers backend {backend.name!r} twice")
            offered.append(reg)

        return register

    @staticmethod
    def _registration(plugin: str, dist: str, version: str, backend: Backend,
                      priority) -> Registration:
        if not isinstance(backend, Backend):
            raise TypeError(f"plugin {plugin!r}: register() takes a Backend instance, got "
                            f"{backend!r}")
        if not backend.name or not isinstance(backend.name, str):
            raise ValueError(f"plugin {plugin!r}: {type(backend).__name__} has no name")
        return Registration(backend, _checked_priority(plugin, backend.name, priority),
                            plugin, dist, backend.version or version)

    def register(self, backend: Backend, priority: int | Mapping[str, int] | None = 0,
                 plugin: str = "runtime") -> None:
        """Register a backend at run time (tests, notebooks) as if a plugin had; a name that is
        taken raises ``ValueError``."""
        self._ensure_loaded()
        with self._lock:
            reg = self._registration(plugin, "registered at run time", "", backend, priority)
            if backend.name in self._regs:
                other = self._regs[backend.name]
                raise ValueError(f"backend name {backend.name!r} is already registered by "
                                 f"plugin {other.plugin!r} ({other.distribution})")
            self._regs[backend.name] = reg
            self._cache.clear()

    def unregister(self, name: str) -> None:
        self._ensure_loaded()
        with self._lock:
            self._regs.pop(name, None)
            self._cache.clear()

    # -- queries -------------------------------------------------------------------------
    def registrations(self) -> dict[str, Registration]:
        self._ensure_loaded()
        return dict(self._regs)

    def get(self, name: str) -> Backend:
        """The backend registered as `name`, or an error naming what is registered."""
        self._ensure_loaded()
        reg = self._regs.get(name)
        if reg is None:
            failed = [f for f in self.failures if name in f.backends] or [
                f for f in self.failures if f.plugin == name]
            if failed:
                raise NoBackendError(f"backend {name!r} failed to load: {failed[0]}")
            raise NoBackendError(
                f"unknown backend {name!r}; registered: {sorted(self._regs)}"
                + (f"; failed to load: {[f.plugin for f in self.failures]}"
                   if self.failures else "")
            )
        return reg.backend

    def verdicts(self, problem: AttentionProblem) -> list[Verdict]:
        self._ensure_loaded()
        out = []
        for name, reg in self._regs.items():
            ok, why = reg.availability
            reasons = [] if ok else [f"unavailable: {why}"]
            if ok:
                try:
                    reasons = list(reg.backend.not_supported_reasons(problem))
                except Exception as e:
                    reasons = [f"not_supported_reasons() raised {type(e).__name__}: {e}"]
            out.append(Verdict(name, reg.priority_for(problem.device.type), ok, reasons))
        # Best first: automatic candidates by priority, then by-name-only ones.
        out.sort(key=lambda v: (v.priority is None, -(v.priority or 0), v.name))
        return out

    def explain(self, problem: AttentionProblem) -> Explanation:
        verdicts = self.verdicts(problem)
        chosen = next((v.name for v in verdicts if v.ok and v.priority is not None), None)
        return Explanation(problem, verdicts, chosen)

    def select(self, problem: AttentionProblem, name: str | None = None) -> Backend:
        """The backend that runs `problem`: `name`'s, or the best for ``None``/``"auto"``."""
        if name == "auto":
            name = None
        key = (problem, name)
        backend = self._cache.get(key)
        if backend is not None:
            return backend
        self._ensure_loaded()
        with self._lock:
            backend = self._select_uncached(problem, name)
            if len(self._cache) > 4096:  # shapes vary without bound in some workloads
                self._cache.clear()
            self._cache[key] = backend
        return backend

    def _select_uncached(self, problem: AttentionProblem, name: str | None) -> Backend:
        if name is not None:
            backend = self.get(name)
            reg = self._regs[name]
            ok, why = reg.availability
            if not ok:
                raise NoBackendError(f"backend {name!r} is not available here: {why}")
            reasons = backend.not_supported_reasons(problem)
            if reasons:
                raise NoBackendError(
                    f"backend {name!r} cannot compute {problem.describe()}: " + "; ".join(reasons)
                )
            return backend
        explanation = self.explain(problem)
        if explanation.chosen is None:
            raise NoBackendError(
                "no attnkit backend can compute this problem.\n" + str(explanation))
        return self._regs[explanation.chosen].backend


def _checked_priority(plugin: str, name: str, priority):
    """``priority`` as None, an int, or a dict of device type to int; else ``TypeError``
    naming the plugin and the backend (selection would fail on every call otherwise)."""
    def bad(why: str):
        return TypeError(f"plugin {plugin!r} registers backend {name!r} with priority="
                         f"{priority!r}: {why}; give None (by name only), an int, or a dict "
                         "from device type to int such as {'cuda': 80}")

    def as_int(p):
        if isinstance(p, bool) or not isinstance(p, numbers.Integral):
            raise bad(f"{p!r} is not an int")
        return int(p)

    if priority is None:
        return None
    if isinstance(priority, Mapping):
        checked = {}
        for device, p in priority.items():
            if not isinstance(device, str):
                raise bad(f"device type {device!r} is not a string")
            checked[device] = as_int(p)
        return checked
    return as_int(priority)


#: The process-wide registry; plugins load on first use, not at ``import attnkit``.
registry = Registry()
