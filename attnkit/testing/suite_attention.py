"""Conformance: a backend's forward, lse and gradients against the float64 reference.

Collected by ``attnkit check NAME`` (through `attnkit.testing.plugin`); every case comes from
the backend's declared capabilities (`attnkit.testing.cases`).
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.registry import NoBackendError, registry
from attnkit.testing import cases as _cases
from attnkit.testing import checks


def test_matches_reference(case, backend, backend_name, device):
    checks.matches_reference(case, backend, device)


def test_repeatable(repeat_case, backend, backend_name, device):
    """Three identical calls give the same forward, bit for bit; the same backward too,
    under ``torch.use_deterministic_algorithms(True)``, if the backend says so. A backend
    that sets launch state up on a signature's first call and reuses it later is held to
    the first call's numbers, and the last call to the accuracy rule."""
    case = repeat_case
    caps = backend.capabilities
    gen, seed = checks.seeded(case)
    q, k, v, seqlens_k = case.make_inputs(device, gen)
    grad = caps.backward
    q, k, v = (t.requires_grad_(grad) for t in (q, k, v))
    dout = torch.randn(q.shape, generator=gen, dtype=torch.float32).to(device, q.dtype)
    runs = []
    # A declared deterministic backward is one under torch's deterministic mode (warn_only:
    # torch ops without a deterministic kernel warn instead of failing the backend).
    was = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(caps.deterministic, warn_only=True)
    try:
        for _ in range(3):
            out, lse = checks.run(backend_name, case, q, k, v, seqlens_k, caps.lse)
            grads = torch.autograd.grad(out, (q, k, v), dout) if grad else ()
            runs.append((out, lse, grads))
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    where = f"[seed {seed}] {case.id}"
    o1, l1, g1 = runs[0]
    for call, (o, lse, g) in enumerate(runs[1:], 2):
        assert torch.equal(o1, o), f"{where}: forward out of call {call} differs from call 1"
        if l1 is not None:
            assert torch.equal(l1, lse), f"{where}: lse of call {call} differs from call 1"
        if caps.deterministic:
            for name, a, b in zip("qkv", g1, g):
                assert torch.equal(a, b), (
                    f"{where}: d{name} of call {call} differs from call 1, but the backend "
                    "declares a deterministic backward")
    verdicts = case.judge(q, k, v, seqlens_k, dout, out=runs[-1][0], grads=runs[-1][2] or None)
    bad = [msg for ok, msg in verdicts if not ok]
    assert not bad, f"{where}: call 3: " + "; ".join(bad)


def test_seqlens_k_out_of_range(backend, backend_name, device):
    """``seqlens_k`` below 0 and above Sk. On CPU the spec rejects it before any backend
    runs. On a GPU the host does not read it (that would sync every call), so the backend
    must clamp it to [0, Sk] (no device error; out, lse and gradients bit for bit those of
    the call with the clamped lengths) or, if it reads the lengths on the host anyway, refuse
    them with a ValueError naming seqlens_k."""
    caps = backend.capabilities
    if not caps.seqlens_k:
        pytest.skip("the backend does not declare seqlens_k")
    case = _cases.Case(batch=3, heads_q=4 if caps.gqa else 2, heads_kv=2, seqlen_q=5,
                       seqlen_k=40, dtype=_cases._primary_dtype(caps), causal=caps.causal,
                       head_dim=max(caps.head_dim_min, min(64, caps.head_dim_max)))
    gen, seed = checks.seeded(case)
    q, k, v, _ = case.make_inputs(device, gen)
    bad = torch.tensor([-7, 1000, 17], dtype=torch.int32, device=device)
    if device.startswith("cpu"):
        with pytest.raises(ValueError, match=r"seqlens_k .* values must lie in \[0, Sk=40\]"):
            attnkit.attention(q, k, v, seqlens_k=bad, causal=case.causal, backend=backend_name)
        return
    dout = torch.randn(q.shape, generator=gen, dtype=torch.float32).to(device, q.dtype)

    def call(seqlens_k):
        qq, kk, vv = (t.detach().requires_grad_(caps.backward) for t in (q, k, v))
        out, lse = checks.run(backend_name, case, qq, kk, vv, seqlens_k, caps.lse)
        grads = torch.autograd.grad(out, (qq, kk, vv), dout) if caps.backward else ()
        torch.cuda.synchronize()  # a device error surfaces here, inside this test
        return (out, lse, *grads)

    try:
        got = call(bad)
    except ValueError as e:  # a backend that reads the lengths on the host may refuse them
        assert "seqlens_k" in str(e), f"the refusal must name seqlens_k: {e}"
        return
    want = call(bad.clamp(0, case.seqlen_k))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        if a is not None:
            assert torch.equal(a, b), (f"[seed {seed}] seqlens_k {bad.tolist()} (Sk=40): {name} "
                                       "differs from the call with the lengths clamped to "
                                       "[0, Sk]")


def test_refuses_what_it_does_not_claim(refused, backend_name, device):
    """A problem outside the declared capabilities raises instead of computing wrongly."""
    what, case = refused
    q, k, v, seqlens_k = case.make_inputs(device)
    if case.grad:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    with pytest.raises(NoBackendError, match=backend_name):
        attnkit.attention(q, k, v, **case.options(seqlens_k), backend=backend_name)


def pytest_generate_tests(metafunc):
    # Repeatability runs on three representative cases, not the whole grid.
    if "repeat_case" in metafunc.fixturenames:
        name = metafunc.config.getoption("--attnkit-backend")
        caps = registry.get(name).capabilities
        cs = _cases.repeatable(caps, quick=metafunc.config.getoption("--attnkit-quick"),
                               device=metafunc.config.getoption("--attnkit-device"))
        metafunc.parametrize("repeat_case", cs, ids=[f"{name}-{c.id}" for c in cs])
