"""Conformance: attention dropout (`attnkit.dropout` defines the keep mask).

(a) exactness: out and gradients equal the reference computed with the materialised mask,
under the accuracy rule; (b) identity: the mask read back from the backend's output (q = 0
makes P uniform, v = I puts key j in column j) is bit for bit `dropout_keep_mask`'s;
(c) statistics: keep rate within binomial bounds, different masks across batches, heads and
calls; (d) reproducibility: the same generator seed gives the same bits. A backend that does
not declare ``dropout`` must refuse it.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

import attnkit
import attnkit.testing
from attnkit import reference
from attnkit.dropout import Dropout, draw_state
from attnkit.registry import NoBackendError
from attnkit.testing import cases as _cases
from attnkit.testing.accuracy import GRAD_FACTOR, assert_close
from attnkit.testing.generate import parametrize_cases

P = 0.25


def dropout_cases(caps, quick: bool = False) -> list[_cases.Case]:
    return _cases.feature_variants(caps, quick) if caps.dropout else []


def pytest_generate_tests(metafunc):
    parametrize_cases(metafunc, {"dropout_case": dropout_cases})


def _generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def _require(backend):
    if not backend.capabilities.dropout:
        pytest.skip(f"backend {backend.name!r} does not declare dropout (its refusal is "
                    "checked by test_dropout_refused_unless_declared)")


def test_dropout_matches_reference_with_the_mask(dropout_case, backend_name, device):
    case = dropout_case
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, seqlens_k = case.make_inputs(device, gen)
    q, k, v = (t.requires_grad_(case.grad) for t in (q, k, v))
    opts = case.options(seqlens_k)
    out = attnkit.attention(q, k, v, **opts, dropout_p=P, generator=_generator(device, seed),
                            backend=backend_name)
    drop = Dropout(P, draw_state(q.device, _generator(device, seed)))
    where = f"[seed {seed}] {case.id} p={P}"

    def ref(dtype):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_(case.grad) for t in (q, k, v))
        with torch.enable_grad():
            o, _ = reference.safe(qq, kk, vv, **opts, dropout=drop)
        return o, (qq, kk, vv)

    (o64, in64), (olp, inlp) = ref(torch.float64), ref(q.dtype)
    assert_close(f"{where} out", out, o64, olp, q.dtype)
    if case.grad:
        dout = torch.randn(q.shape, generator=gen).to(device, q.dtype)
        got = torch.autograd.grad(out, (q, k, v), dout)
        want64 = torch.autograd.grad(o64, in64, dout.to(torch.float64))
        wantlp = torch.autograd.grad(olp, inlp, dout)
        # The accuracy rule's second low-precision reference, as in the suite without dropout.
        saved = case.saved_state_grads(q, k, v, seqlens_k, dout, out=out,
                                       dropout=drop) or (None,) * 3
        for name, g, g64, glp, gs in zip("qkv", got, want64, wantlp, saved):
            assert_close(f"{where} d{name}", g, g64, (glp, gs), q.dtype, factor=GRAD_FACTOR)


def _read_mask(backend_name, device, caps, seed, batch=2, heads=3, seqlen_q=40):
    """The keep mask the backend applied, read from its output: q = 0 gives every visible
    key P = 1/Sk, v = I puts key j's kept probability in column j."""
    S = min(64, caps.head_dim_max)
    dtype = _cases._primary_dtype(caps)
    q = torch.zeros(batch, heads, seqlen_q, S, dtype=dtype, device=device)
    eye = torch.eye(S, dtype=dtype, device=device).expand(batch, heads, S, S)
    out = attnkit.attention(q, eye, eye, dropout_p=P, generator=_generator(device, seed),
                            backend=backend_name)
    return out > 0.5 / S


def test_dropout_mask_is_the_definition(backend, backend_name, device):
    _require(backend)
    caps = backend.capabilities
    seed = random.randrange(2**31)
    got = _read_mask(backend_name, device, caps, seed)
    want = attnkit.testing.dropout_keep_mask(draw_state(torch.device(device),
                                                        _generator(device, seed)),
                                             P, *got.shape)
    bad = (got != want.to(got.device)).sum().item()
    assert bad == 0, f"[seed {seed}] {bad} of {got.numel()} keep decisions differ from " \
        "attnkit.dropout's mask"


def test_dropout_statistics_and_reproducibility(backend, backend_name, device, quick):
    _require(backend)
    caps = backend.capabilities
    seeds = random.Random().sample(range(2**31), 4 if quick else 12)
    masks = torch.stack([_read_mask(backend_name, device, caps, s) for s in seeds]).cpu()
    n = masks.numel()
    rate = masks.float().mean().item()
    sigma = (P * (1 - P) / n) ** 0.5
    assert abs(rate - (1 - P)) < 6 * sigma, f"keep rate {rate:.4f}, expected {1 - P}"
    flat = masks.flatten(1, 2).float()  # (calls, batch*heads, Sq, Sk)
    # Independent draws agree on a fraction p^2 + (1 - p)^2 of elements.
    agree = P**2 + (1 - P) ** 2
    across_heads = (flat[:, :1] == flat[:, 1:]).float().mean().item()
    across_calls = (flat[:1] == flat[1:]).float().mean().item()
    for what, a in (("batches and heads", across_heads), ("calls", across_calls)):
        assert abs(a - agree) < 0.03, f"masks across {what} agree on {a:.3f} of elements, " \
            f"independent draws on {agree:.3f}"
    again = _read_mask(backend_name, device, caps, seeds[0]).cpu()
    assert torch.equal(again, masks[0]), "the same generator seed gave a different mask"


def test_dropout_refused_unless_declared(backend, backend_name, device):
    if backend.capabilities.dropout:
        pytest.skip(f"backend {backend.name!r} declares dropout")
    caps = backend.capabilities
    case = replace(_cases.small_base(caps, True), grad=False)
    q, k, v, _ = case.make_inputs(device, torch.Generator().manual_seed(0))
    with pytest.raises(NoBackendError, match="dropout_p > 0 not supported"):
        attnkit.attention(q, k, v, dropout_p=P, backend=backend_name)
