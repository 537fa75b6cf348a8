"""The references against each other, against PyTorch SDPA, and under gradcheck."""

import pytest
import torch
import torch.nn.functional as F

from attnkit import reference
from attnkit.reference import visible_mask

OPTIONS = [
    dict(),
    dict(causal=True),
    dict(window=(3, 2)),
    dict(window=(2, 0), causal=True),
    dict(softcap=2.0),
    dict(seqlens_k=torch.tensor([0, 4, 11])),
    dict(seqlens_k=torch.tensor([5, 11, 2]), causal=True),
]


def _qkv(B=3, Hq=4, Hkv=2, Sq=6, Sk=11, D=8, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
    return mk(B, Hq, Sq, D), mk(B, Hkv, Sk, D), mk(B, Hkv, Sk, D)


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("sq", [1, 6, 15])
def test_references_agree(opts, sq):
    q, k, v = _qkv(Sq=sq)
    o_safe, l_safe = reference.safe(q, k, v, **opts)
    for f in (reference.naive, lambda *a, **kw: reference.online(*a, block_k=4, **kw)):
        o, l = f(q, k, v, **opts)
        torch.testing.assert_close(o, o_safe, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(l, l_safe, rtol=1e-12, atol=1e-12)


def test_fully_masked_rows_are_zero_and_minus_inf():
    q, k, v = _qkv(Sq=15, Sk=11)  # causal, Sq > Sk: the first 4 rows see nothing
    for f in reference.REFERENCES.values():
        o, l = f(q, k, v, causal=True)
        assert (o[:, :, :4] == 0).all() and (l[:, :, :4] == float("-inf")).all()
        assert torch.isfinite(o).all()


def test_matches_sdpa_in_float64():
    q, k, v = _qkv(Hq=2, Hkv=2, Sq=6, Sk=11)
    torch.testing.assert_close(reference.safe(q, k, v)[0], F.scaled_dot_product_attention(q, k, v))
    # SDPA's is_causal is top-left; attnkit's bottom-right causal is SDPA with the
    # diagonal shifted by Sk - Sq, passed as an explicit mask.
    mask = torch.ones(6, 11, dtype=torch.bool).tril(diagonal=11 - 6)
    torch.testing.assert_close(reference.safe(q, k, v, causal=True)[0],
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert torch.equal(visible_mask(6, 11, causal=True)[0, 0], mask)
    # With Sq == Sk both conventions coincide.
    qs = q[:, :, :6]
    ks, vs = k[:, :, :6], v[:, :, :6]
    torch.testing.assert_close(reference.safe(qs, ks, vs, causal=True)[0],
                               F.scaled_dot_product_attention(qs, ks, vs, is_causal=True))


@pytest.mark.parametrize("opts", OPTIONS[:5], ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("name", ["naive", "safe", "online"])
def test_gradcheck(name, opts):
    q, k, v = _qkv(B=1, Hq=2, Hkv=1, Sq=4, Sk=5, D=3, requires_grad=True)
    f = reference.REFERENCES[name]
    assert torch.autograd.gradcheck(lambda q, k, v: f(q, k, v, **opts)[0], (q, k, v))


def test_naive_overflows_in_fp16_where_safe_does_not():
    q, k, v = _qkv(Hq=2, Hkv=2, Sq=8, Sk=8, D=64, dtype=torch.float32)
    q, k, v = (q * 8).half(), (k * 8).half(), v.half()  # scores of several tens: exp > 65504
    naive_out, _ = reference.naive(q, k, v)
    safe_out, _ = reference.safe(q, k, v)
    assert not torch.isfinite(naive_out).all()
    assert torch.isfinite(safe_out).all()
    ref64, _ = reference.safe(q.double(), k.double(), v.double())
    assert (safe_out.double() - ref64).abs().max() < 2e-2


def test_online_never_holds_the_score_matrix(monkeypatch):
    q, k, v = _qkv(Sq=6, Sk=40)
    shapes = []
    real = reference._scores
    monkeypatch.setattr(reference, "_scores",
                        lambda *a: shapes.append(real(*a).shape) or real(*a))
    reference.online(q, k, v, block_k=8)
    assert max(s[-1] for s in shapes) == 8


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_explicit_backward_matches_autograd(opts):
    q, k, v = _qkv(Sq=15, requires_grad=True)
    out, lse = reference.safe(q, k, v, **opts)
    dout = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), dout)
    got = reference.backward(q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
                             dout, **opts)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["naive", "safe", "online"])
def test_missing_keys_may_hold_nan(name):
    q, k, v = _qkv(Sq=3, Sk=11, requires_grad=False)
    seqlens = torch.tensor([4, 11, 0])
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 4:] = float("nan")
    v2[0, :, 4:] = float("inf")
    f = reference.REFERENCES[name]
    out, lse = f(q, k2, v2, seqlens_k=seqlens)
    want, want_lse = f(q, k, v, seqlens_k=seqlens)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)
    dout = torch.randn_like(out)
    grads = reference.backward(q, k2, v2, out, lse, dout, seqlens_k=seqlens)
    assert all(torch.isfinite(g).all() for g in grads)
