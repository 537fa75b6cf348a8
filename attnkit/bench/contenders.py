"""What gets timed: attnkit backends and SDPA peers behind one small interface."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .. import api
from ..spec import AttentionProblem
from . import peers


@dataclass
class Contender:
    """One thing to time. ``kind`` is "attnkit" (a registered backend, called through
    ``attnkit.attention(backend=name)``) or "sdpa" (a pinned SDPA kernel)."""

    name: str
    kind: str
    backend: object = None  # the attnkit Backend, for its declared capabilities
    notes: list[str] = field(default_factory=list)

    def reasons(self, problem: AttentionProblem) -> list[str]:
        """Why this contender declines ``problem`` up front (attnkit backends only: SDPA says
        so when called, and `peers.PeerError` carries its reasons)."""
        if self.kind != "attnkit":
            return []
        return list(self.backend.not_supported_reasons(problem))

    def context(self):
        return peers.pinned(self.name) if self.kind == "sdpa" else nullcontext()

    def attention(self, q, k, v, *, causal: bool, dropout_p: float = 0.0):
        if self.kind == "sdpa":
            return peers.sdpa(q, k, v, causal=causal, gqa=q.shape[1] != k.shape[1],
                              dropout_p=dropout_p)
        return api.attention(q, k, v, causal=causal, dropout_p=dropout_p, backend=self.name)

    def decode(self, q, k_cache, v_cache, cache_seqlens):
        """Attend ``q`` (the newest ``Sq`` tokens) to the filled part of the cache."""
        if self.kind == "sdpa":
            # Full caches: bottom-right causal with one query sees every key, which for SDPA
            # (top-left causal) is is_causal=False.
            return peers.sdpa(q, k_cache, v_cache, causal=False,
                              gqa=q.shape[1] != k_cache.shape[1])
        import attnkit

        if hasattr(attnkit, "attention_with_kvcache"):
            return attnkit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens,
                                                  k_new=None, causal=True, backend=self.name)
        return api.attention(q, k_cache, v_cache, seqlens_k=cache_seqlens, causal=True,
                             backend=self.name)


def known_names() -> list[str]:
    return sorted(api.backends()) + list(peers.PEERS)


def select(device: torch.device, dtype: torch.dtype, head_dim: int,
           names: list[str] | None = None) -> tuple[list[Contender], dict[str, str]]:
    """The contenders for a run, and the left-out ones with why.

    By default: every registered attnkit backend that is available and runs on ``device``
    (except ``reference``, only timed when named), then every SDPA kernel that runs a tiny
    problem on ``device`` in ``dtype``. ``names`` picks exactly those (unknown names raise).
    """
    regs = api.backends()
    if names is not None:
        unknown = [n for n in names if n not in regs and n not in peers.PEERS]
        if unknown:
            raise ValueError(f"unknown backend(s) {unknown}; known: {known_names()}")
    chosen: list[Contender] = []
    left_out: dict[str, str] = {}
    for name, reg in regs.items():
        if names is None and name == "reference":
            left_out[name] = "the oracle, timed only when named (--backends reference)"
            continue
        if names is not None and name not in names:
            continue
        ok, why = reg.availability
        if not ok:
            left_out[name] = f"unavailable: {why}"
        elif device.type not in reg.backend.capabilities.devices:
            left_out[name] = (f"does not run on {device.type} (devices "
                              f"{sorted(reg.backend.capabilities.devices)})")
        else:
            chosen.append(Contender(name, "attnkit", reg.backend))
    for name in peers.PEERS:
        if names is not None and name not in names:
            continue
        why = peers.probe(name, device, dtype, head_dim)
        if why is None:
            chosen.append(Contender(name, "sdpa"))
        else:
            left_out[name] = f"unavailable: {why}"
    # The baseline first (every ratio needs it), the slow materializing peer last, so a time
    # limit cuts what matters least.
    order = {peers.BASELINE: 0, "sdpa-math": 2}
    chosen.sort(key=lambda c: order.get(c.name, 1))
    return chosen, left_out


def select_declaring(device: torch.device, names: list[str] | None, feature: str,
                     peers: tuple[str, ...] = ()) -> tuple[list[Contender], dict[str, str]]:
    """attnkit backends that declare ``feature`` (reference only when named), then the SDPA
    ``peers`` (all, or those named); the others with why they are left out."""
    regs = api.backends()
    if names is not None:
        unknown = [n for n in names if n not in regs and n not in peers]
        if unknown:
            raise ValueError(f"unknown backend(s) {unknown}; known: "
                             f"{sorted(regs) + list(peers)}")
    chosen, left_out = [], {}
    for name, reg in regs.items():
        if (names is None and name == "reference") or (names is not None
                                                       and name not in names):
            if names is None:
                left_out[name] = "the oracle, timed only when named (--backends reference)"
            continue
        ok, why = reg.availability
        caps = reg.backend.capabilities
        if not ok:
            left_out[name] = f"unavailable: {why}"
        elif device.type not in caps.devices:
            left_out[name] = f"does not run on {device.type}"
        elif not getattr(caps, feature):
            left_out[name] = f"does not declare {feature}"
        else:
            chosen.append(Contender(name, "attnkit", reg.backend))
    chosen += [Contender(name, "sdpa") for name in peers if names is None or name in names]
    return chosen, left_out
