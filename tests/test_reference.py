"""The references against each other, against PyTorch SDPA, and under gradcheck."""

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit import reference
from attnkit.reference import visible_mask
from attnkit.reference_backend import ReferenceBackend
from attnkit.spec import AttentionProblem

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


# Keys no query row sees: beyond seqlens_k[b], or outside every row's band.
UNSEEN = [
    dict(window=(2, 0)),  # Sq=4, Sk=11: keys 0..4 are left of every row's window
    dict(window=(1, 1), seqlens_k=torch.tensor([11, 6, 0])),
    dict(causal=True, seqlens_k=torch.tensor([3, 11, 7])),
]


def _unseen(q, k, opts):
    mask = visible_mask(q.shape[2], k.shape[2], causal=opts.get("causal", False),
                        window=opts.get("window"), seqlens_k=opts.get("seqlens_k"))
    return (~mask.any(-2)).unsqueeze(-1).expand_as(k)


@pytest.mark.parametrize("opts", UNSEEN, ids=lambda o: "-".join(o))
@pytest.mark.parametrize("name", ["naive", "safe", "online"])
def test_keys_no_row_sees_are_never_read(name, opts):
    q, k, v = _qkv(Sq=4, Sk=11)
    unseen = _unseen(q, k, opts)
    assert unseen.any()
    k2, v2 = k.masked_fill(unseen, float("nan")), v.masked_fill(unseen, float("inf"))
    f = reference.REFERENCES[name]
    out, lse = f(q, k, v, **opts)
    out2, lse2 = f(q, k2, v2, **opts)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)
    dout = torch.randn_like(out)
    grads = reference.backward(q, k, v, out, lse, dout, **opts)
    grads2 = reference.backward(q, k2, v2, out, lse, dout, **opts)
    for g, g2 in zip(grads, grads2):
        assert torch.equal(g2, g)
    assert (grads2[1][unseen] == 0).all() and (grads2[2][unseen] == 0).all()
    # Autograd through the reference: zero gradient for those keys, nothing else changed.
    leaves = [t.clone().requires_grad_(True) for t in (q, k2, v2)]
    auto = torch.autograd.grad(f(*leaves, **opts)[0], leaves, dout)
    for g, g2 in zip(grads, auto):
        torch.testing.assert_close(g2, g, rtol=1e-10, atol=1e-10)


def test_reference_backend_never_reads_unseen_keys():
    q, k, v = _qkv(B=1, Hq=2, Hkv=2, Sq=1, Sk=16, dtype=torch.float32)
    want = attnkit.attention(q, k, v, window=(3, 0), backend="reference")
    k[:, :, :12] = v[:, :, :12] = float("nan")
    assert torch.equal(attnkit.attention(q, k, v, window=(3, 0), backend="reference"), want)


@pytest.mark.parametrize("opts", [dict(), dict(causal=True, seqlens_k=torch.tensor([5, 11, 2]))],
                         ids=["plain", "masked"])
@pytest.mark.parametrize("name", ["naive", "safe", "online", "backend"])
def test_nan_query_row_is_nan(name, opts):
    q, k, v = _qkv(Sq=6, Sk=11)
    nan_rows = torch.zeros(q.shape[:3], dtype=torch.bool)
    nan_rows[0, 1, 5] = nan_rows[2, 3, 4] = True  # rows that see keys
    q2 = q.masked_fill(nan_rows.unsqueeze(-1), float("nan"))
    if name == "backend":
        def f(q, k, v, **o):
            return attnkit.attention(q, k, v, return_lse=True, backend="reference", **o)
    else:
        f = reference.REFERENCES[name]
    out, lse = f(q, k, v, **opts)
    out2, lse2 = f(q2, k, v, **opts)
    assert out2[nan_rows].isnan().all() and lse2[nan_rows].isnan().all()
    assert torch.equal(out2[~nan_rows], out[~nan_rows])
    assert torch.equal(lse2[~nan_rows], lse[~nan_rows])


DLSE_OPTIONS = [
    dict(),
    dict(causal=True),  # Sq=15 > Sk=11: rows that see no key (lse = -inf)
    dict(window=(3, 2), seqlens_k=torch.tensor([0, 4, 11])),
    dict(softcap=2.0, causal=True),
]


def _naive_grads(q, k, v, dout, dlse, **opts):
    """Gradients of ``sum(out * dout) + sum(lse * dlse)`` by autograd through `naive`."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = reference.naive(*leaves, **opts)
    seen = torch.isfinite(lse)  # a row that sees nothing has a constant lse = -inf
    loss = (out * dout).sum() + (torch.where(seen, lse, 0) * dlse).sum()
    return out.detach(), lse.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("opts", DLSE_OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_backward_with_dlse_matches_autograd(opts):
    q, k, v = _qkv(Sq=15)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(q.shape, generator=g, dtype=q.dtype)
    dlse = torch.randn(q.shape[:3], generator=g, dtype=q.dtype)
    out, lse, want = _naive_grads(q, k, v, dout, dlse, **opts)
    got = reference.backward(q, k, v, out, lse, dout, dlse=dlse, **opts)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # The backend takes dlse as a keyword, in fp32 like its lse.
    problem = AttentionProblem.from_tensors(q, k, v, needs_grad=True, **opts)
    backend = ReferenceBackend()
    got = backend.backward(problem, q, k, v, out, lse, dout, opts.get("seqlens_k"),
                           dlse=dlse.float())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got[0], backend.backward(problem, q, k, v, out, lse, dout,
                                                    opts.get("seqlens_k"))[0])
