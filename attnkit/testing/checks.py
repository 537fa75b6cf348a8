"""The suite's per-case checks as functions: the core's suite modules call them, and so may
a backend's own conformance modules (`attnkit.testing`), e.g. with a kernel path forced."""

from __future__ import annotations

import random

import torch

import attnkit
from attnkit import reference

from .accuracy import GRAD_FACTOR, OUT_FACTOR, assert_close
from .cases import Case


def assert_grads(where: str, grads, inputs, ref64, ref_lp, saved, masked) -> None:
    """(dq, dk, dv) of ``inputs`` (q, k, v): each in its input's dtype and shape and within
    the accuracy rule against ``ref64`` with the low-precision references ``ref_lp`` (per
    gradient one tensor, or a tuple of them) and ``saved``; query rows in ``masked`` (they
    see no key) get dq == 0."""
    dtype = inputs[0].dtype
    for name, g, t, g64, glp, gs in zip("qkv", grads, inputs, ref64, ref_lp, saved):
        assert g.dtype == t.dtype and g.shape == t.shape, (
            f"{where}: d{name} is {g.dtype} {tuple(g.shape)}, expected {t.dtype} "
            f"{tuple(t.shape)}")
        lps = glp if isinstance(glp, tuple) else (glp,)
        assert_close(f"{where} d{name}", g, g64, (*lps, gs), dtype, factor=GRAD_FACTOR)
    if masked.any():
        assert (grads[0][masked] == 0).all(), f"{where}: rows that see no key need dq == 0"


def seeded(case: Case) -> tuple[torch.Generator, int]:
    """A generator for fresh inputs on every run, and its seed (printed on failure)."""
    seed = random.randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


def run(backend_name, case, q, k, v, seqlens_k, return_lse):
    """``(out, lse)`` of one call (lse None without ``return_lse``)."""
    res = attnkit.attention(q, k, v, **case.options(seqlens_k), return_lse=return_lse,
                            backend=backend_name)
    return res if return_lse else (res, None)


def matches_reference(case: Case, backend, device: str) -> None:
    """One case through ``attnkit.attention`` on ``backend`` (forward, lse, and backward with
    ``dout`` in out's layout) under the accuracy rule, with the rows that see no key held to
    0 / -inf / zero dq. Raises ``AssertionError`` naming the seed, the case and the numbers."""
    caps = backend.capabilities
    backend_name = backend.name
    gen, seed = seeded(case)
    q, k, v, seqlens_k = case.make_inputs(device, gen)
    if case.grad:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    where = f"[seed {seed}] {case.id}"

    out, lse = run(backend_name, case, q, k, v, seqlens_k, caps.lse)
    assert out.dtype == q.dtype, f"{where}: out dtype {out.dtype}, expected {q.dtype}"
    assert tuple(out.shape) == tuple(q.shape), f"{where}: out shape {tuple(out.shape)}"

    dout = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(device, q.dtype)
    ref64 = case.reference(q, k, v, seqlens_k, torch.float64, dout, case.grad)
    lps = case.low_precision_references(q, k, v, seqlens_k, dout, case.grad)

    assert_close(f"{where} out", out, ref64[0], [r[0] for r in lps], q.dtype, factor=OUT_FACTOR)
    masked = case.masked_rows(seqlens_k).to(out.device).expand(out.shape[:3])
    if case.expect_masked_rows:
        assert masked.any(), f"{where}: the case was meant to contain fully-masked rows"
    if masked.any():
        assert (out[masked] == 0).all(), f"{where}: fully-masked rows must give out == 0"
    if lse is not None:
        want = torch.float64 if q.dtype == torch.float64 else torch.float32
        assert lse.dtype == want, f"{where}: lse dtype {lse.dtype}, expected {want}"
        assert tuple(lse.shape) == tuple(q.shape[:3]), f"{where}: lse shape {tuple(lse.shape)}"
        assert_close(f"{where} lse", lse, ref64[1], [r[1] for r in lps], q.dtype,
                     factor=OUT_FACTOR)
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
        saved = case.saved_state_grads(q, k, v, seqlens_k, dout, out=out, lse=lse) or (None,) * 3
        per_grad = [tuple(r[2][i] for r in lps) for i in range(3)]
        assert_grads(where, grads, (q, k, v), ref64[2], per_grad, saved, masked)
