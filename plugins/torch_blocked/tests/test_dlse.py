"""The gradient reaching ``lse`` (``dlse``) against autograd through the float64 naive
attention: ``d(sum(out * dout) + sum(lse * dlse))``."""

from __future__ import annotations

import pytest
import torch
from attnkit_torch_blocked.backend import TorchBlockedBackend
from attnkit_torch_blocked.blocked import BlockSizes, blocked_backward, blocked_forward

import attnkit
from attnkit import reference
from attnkit.registry import registry
from attnkit.spec import AttentionProblem

SMALL = BlockSizes(16, 24)

OPTIONS = [
    dict(),
    dict(causal=True),  # Sq > Sk: rows that see no key, lse = -inf
    dict(window=(6, 2), seqlens_k=torch.tensor([0, 41], dtype=torch.int32)),
    dict(softcap=3.0, causal=True),
]


def _inputs(dtype=torch.float64, Hq=4, Hkv=2, Sq=45, Sk=41, D=16):
    g = torch.Generator().manual_seed(3)
    q, dout = (torch.randn(2, Hq, Sq, D, generator=g, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(2, Hkv, Sk, D, generator=g, dtype=dtype) for _ in range(2))
    dlse = torch.randn(2, Hq, Sq, generator=g, dtype=dtype)
    return q, k, v, dout, dlse


def _naive_grads(q, k, v, dout, dlse, **opts):
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    out, lse = reference.naive(*leaves, **opts)
    seen = torch.isfinite(lse)  # a row that sees nothing has a constant lse = -inf
    loss = (out * dout.double()).sum() + (torch.where(seen, lse, 0) * dlse.double()).sum()
    return torch.autograd.grad(loss, leaves)


def _blocked(q, k, v, dout, dlse, blocks=SMALL, **opts):
    problem = AttentionProblem.from_tensors(q, k, v, needs_grad=True, **opts)
    kw = dict(scale=problem.scale, band=problem.band, seqlens_k=opts.get("seqlens_k"),
              softcap=problem.softcap, blocks=blocks)
    out, lse = blocked_forward(q, k, v, **kw)
    return blocked_backward(q, k, v, out, lse, dout, dlse=dlse, **kw)


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("blocks", [SMALL, None], ids=["small", "default"])
def test_dlse_matches_autograd(opts, blocks):
    q, k, v, dout, dlse = _inputs()
    want = _naive_grads(q, k, v, dout, dlse, **opts)
    got = _blocked(q, k, v, dout, dlse, blocks, **opts)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"d{name}")
    # dlse changes dq and dk (not dv: lse does not depend on v).
    plain = _blocked(q, k, v, dout, None, blocks, **opts)
    assert not torch.equal(plain[0], got[0]) and torch.equal(plain[2], got[2])


def test_dlse_alone():
    """With dout = 0 only lse carries gradient, and none of it reaches v."""
    q, k, v, _, dlse = _inputs()
    dout = torch.zeros_like(q)
    want = _naive_grads(q, k, v, dout, dlse, causal=True)
    got = _blocked(q, k, v, dout, dlse, causal=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert (got[2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dlse_through_the_backend(dtype):
    """The backend's ``backward(..., dlse=)``: fp32 dlse, inputs in their own dtype."""
    q, k, v, dout, dlse = (t.to(dtype) for t in _inputs())
    dlse = dlse.float()
    opts = dict(causal=True, window=(6, 2), seqlens_k=torch.tensor([30, 41], dtype=torch.int32))
    problem = AttentionProblem.from_tensors(q, k, v, needs_grad=True, **opts)
    backend = TorchBlockedBackend(block_q=16, block_k=24)
    out, lse = backend.forward(problem, q, k, v, opts["seqlens_k"])
    got = backend.backward(problem, q, k, v, out, lse, dout, opts["seqlens_k"], dlse=dlse)
    want = _naive_grads(q, k, v, dout, dlse, **opts)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, **tol, msg=f"d{name}")


@pytest.mark.parametrize("backend", ["torch-blocked", "reference"])
def test_loss_on_lse_through_the_api(backend):
    """Both backends declare ``lse_grad``; a loss on out and lse reaches q and k through
    ``attnkit.attention``'s autograd."""
    assert registry.get(backend).capabilities.lse_grad
    q, k, v, dout, dlse = _inputs()
    opts = dict(causal=True, seqlens_k=torch.tensor([41, 30], dtype=torch.int32))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = attnkit.attention(*leaves, return_lse=True, backend=backend, **opts)
    loss = (out * dout).sum() + (torch.where(torch.isfinite(lse), lse, 0) * dlse).sum()
    got = torch.autograd.grad(loss, leaves)
    want = _naive_grads(q, k, v, dout, dlse, **opts)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"d{name}")
