"""Conformance: a backend's forward, lse and gradients against the float64 reference.

Collected by ``attnkit check NAME`` (through `attnkit.testing.plugin`); every case comes from
the backend's declared capabilities (`attnkit.testing.cases`).
"""

from __future__ import annotations

import random

import pytest
import torch

import attnkit
from attnkit import reference
from attnkit.registry import NoBackendError, registry
from attnkit.testing import cases as _cases
from attnkit.testing.accuracy import GRAD_FACTOR, OUT_FACTOR, assert_close


def _generator(case) -> tuple[torch.Generator, int]:
    # Fresh inputs on every run; the seed is printed on failure to reproduce it.
    seed = random.randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


def _run(backend_name, case, q, k, v, seqlens_k, return_lse):
    res = attnkit.attention(q, k, v, **case.options(seqlens_k), return_lse=return_lse,
                            backend=backend_name)
    return res if return_lse else (res, None)


def test_matches_reference(case, backend, backend_name, device):
    caps = backend.capabilities
    gen, seed = _generator(case)
    q, k, v, seqlens_k = case.make_inputs(device, gen)
    if case.grad:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    where = f"[seed {seed}] {case.id}"

    out, lse = _run(backend_name, case, q, k, v, seqlens_k, caps.lse)
    assert out.dtype == q.dtype, f"{where}: out dtype {out.dtype}, expected {q.dtype}"
    assert tuple(out.shape) == tuple(q.shape), f"{where}: out shape {tuple(out.shape)}"

    dout = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(device, q.dtype)
    ref64 = case.reference(q, k, v, seqlens_k, torch.float64, dout, case.grad)
    ref_lp = case.reference(q, k, v, seqlens_k, q.dtype, dout, case.grad)

    assert_close(f"{where} out", out, ref64[0], ref_lp[0], q.dtype, factor=OUT_FACTOR)
    masked = case.masked_rows(seqlens_k).to(out.device).expand(out.shape[:3])
    if case.expect_masked_rows:
        assert masked.any(), f"{where}: the case was meant to contain fully-masked rows"
    if masked.any():
        assert (out[masked] == 0).all(), f"{where}: fully-masked rows must give out == 0"
    if lse is not None:
        want = torch.float64 if q.dtype == torch.float64 else torch.float32
        assert lse.dtype == want, f"{where}: lse dtype {lse.dtype}, expected {want}"
        assert tuple(lse.shape) == tuple(q.shape[:3]), f"{where}: lse shape {tuple(lse.shape)}"
        assert_close(f"{where} lse", lse, ref64[1], ref_lp[1], q.dtype, factor=OUT_FACTOR)
        if masked.any():
            assert (lse[masked] == float("-inf")).all(), \
                f"{where}: fully-masked rows must give lse == -inf"

    if case.tag == "overflow" and q.dtype == torch.float16:
        # The case is only meaningful if the textbook formula really overflows here.
        naive_out, _ = reference.naive(q.detach(), k.detach(), v.detach(),
                                       **case.options(seqlens_k))
        assert not torch.isfinite(naive_out).all(), f"{where}: inputs too small to overflow"

    if case.grad:
        # dout in out's layout (as a (B, S, H, D) model passes it): it reaches the backend
        # uncopied, so a backend that ignored dout's strides would fail here.
        grads = torch.autograd.grad(out, (q, k, v), torch.empty_like(out).copy_(dout))
        for name, g, t, g64, glp in zip("qkv", grads, (q, k, v), ref64[2], ref_lp[2]):
            assert g.dtype == t.dtype and g.shape == t.shape, (
                f"{where}: d{name} is {g.dtype} {tuple(g.shape)}, "
                f"expected {t.dtype} {tuple(t.shape)}")
            assert_close(f"{where} d{name}", g, g64, glp, q.dtype, factor=GRAD_FACTOR)
        if masked.any():
            assert (grads[0][masked] == 0).all(), f"{where}: fully-masked rows need dq == 0"


def test_repeatable(repeat_case, backend, backend_name, device):
    """The forward is bitwise deterministic; so is the backward, under
    ``torch.use_deterministic_algorithms(True)``, if the backend says so."""
    case = repeat_case
    caps = backend.capabilities
    gen, seed = _generator(case)
    q, k, v, seqlens_k = case.make_inputs(device, gen)
    grad = caps.backward
    q, k, v = (t.requires_grad_(grad) for t in (q, k, v))
    runs = []
    # A declared deterministic backward is one under torch's deterministic mode (warn_only:
    # torch ops without a deterministic kernel warn instead of failing the backend).
    was = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(caps.deterministic, warn_only=True)
    try:
        for _ in range(2):
            out, lse = _run(backend_name, case, q, k, v, seqlens_k, caps.lse)
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out)) if grad else ()
            runs.append((out, lse, grads))
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    (o1, l1, g1), (o2, l2, g2) = runs
    where = f"[seed {seed}] {case.id}"
    assert torch.equal(o1, o2), f"{where}: forward out differs between two identical runs"
    if l1 is not None:
        assert torch.equal(l1, l2), f"{where}: lse differs between two identical runs"
    if caps.deterministic:
        for name, a, b in zip("qkv", g1, g2):
            assert torch.equal(a, b), (
                f"{where}: d{name} differs between runs, but the backend declares a "
                "deterministic backward")


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
        cs = _cases.repeatable(caps, quick=metafunc.config.getoption("--attnkit-quick"))
        metafunc.parametrize("repeat_case", cs, ids=[f"{name}-{c.id}" for c in cs])
