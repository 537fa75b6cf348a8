"""`merge_attention`: exact, differentiable in every partial out and lse, NaN-preserving, and
strict about its arguments; gradients through the partials' lse reach q and k."""

import math
import random

import pytest
import torch

import attnkit
from attnkit import merge_attention
from attnkit.registry import registry


def _parts(P=3, shape=(2, 3, 5), D=4, dtype=torch.float64, grad=True):
    outs = [torch.randn(*shape, D, dtype=dtype, requires_grad=grad) for _ in range(P)]
    lses = [(torch.randn(*shape, dtype=dtype) * 3).requires_grad_(grad) for _ in range(P)]
    return outs, lses


def test_merge_is_the_softmax_over_the_union():
    outs, lses = _parts(P=4)
    out, lse = merge_attention(outs, lses)
    stack = torch.stack(lses)
    torch.testing.assert_close(lse, torch.logsumexp(stack, 0))
    w = torch.softmax(stack, 0).unsqueeze(-1)
    torch.testing.assert_close(out, (w * torch.stack(outs)).sum(0))


def test_gradients_of_outs_and_lses_match_finite_differences():
    outs, lses = _parts(P=3, shape=(2, 3), D=3)
    assert torch.autograd.gradcheck(lambda *t: merge_attention(t[:3], t[3:]), (*outs, *lses))


def test_empty_partials_get_zero_gradients_never_nan():
    """A part whose row saw no key (lse -inf) weighs nothing, whatever its out holds (even
    NaN): the result ignores it and its gradients are 0, as are a row's that no part saw."""
    outs, lses = _parts(P=3, grad=False)
    lses[1][0, 1] = float("-inf")
    outs[1][0, 1] = float("nan")
    for t in lses:
        t[1, 2, 3] = float("-inf")  # no part saw this row
    for t in (*outs, *lses):
        t.requires_grad_()
    out, lse = merge_attention(outs, lses)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[1, 2, 3] == 0).all() and lse[1, 2, 3] == float("-inf")
    clean = merge_attention([outs[0][0, 1], outs[2][0, 1]], [lses[0][0, 1], lses[2][0, 1]])
    torch.testing.assert_close(out[0, 1], clean[0])
    torch.testing.assert_close(lse[0, 1], clean[1])
    loss = (out * torch.randn_like(out)).sum() + torch.where(lse.isfinite(), lse, 0).sum()
    grads = torch.autograd.grad(loss, (*outs, *lses))
    assert all(g.isfinite().all() for g in grads)
    assert (grads[1][0, 1] == 0).all() and (grads[4][0, 1] == 0).all()
    assert all(g[1, 2, 3].eq(0).all() for g in grads)


@pytest.mark.parametrize("where", ["lse", "out"])
def test_nan_propagates(where):
    """A NaN lse part, or NaN in the out of a part that has weight, makes the row NaN; a NaN
    query row stays NaN through a merge."""
    outs, lses = _parts(P=3, grad=False)
    (lses if where == "lse" else outs)[2][1, 0, 4] = float("nan")
    out, lse = merge_attention(outs, lses)
    assert out[1, 0, 4].isnan().all()
    if where == "lse":
        assert lse[1, 0, 4].isnan()
    rows = torch.ones(lse.shape, dtype=torch.bool)
    rows[1, 0, 4] = False
    assert not out[rows].isnan().any() and not lse[rows].isnan().any()


def test_dtypes():
    outs, lses = _parts(P=2, dtype=torch.bfloat16, grad=False)
    out, lse = merge_attention(outs, [s.float() for s in lses])
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    out, lse = merge_attention([o.float() for o in outs], [s.double() for s in lses])
    assert out.dtype == torch.float32 and lse.dtype == torch.float64


@pytest.mark.parametrize("args, exc, message", [
    (lambda o, s: (o[0], s), TypeError, r"outs must be a list or tuple of tensors \(one per "
                                        r"partial\), got a tensor of shape \(2, 3, 5, 4\)"),
    (lambda o, s: (o, iter(s)), TypeError, r"lses must be a list or tuple .* got list_iterator"),
    (lambda o, s: (o, [s[0], s[1].tolist()]), TypeError, r"lses\[1\] must be a torch.Tensor, "
                                                         r"got list"),
    (lambda o, s: ([o[0], o[1].long()], s), TypeError, r"outs\[1\] \(shape \(2, 3, 5, 4\), "
                                                       r"dtype torch.int64.* floating point"),
    (lambda o, s: (o, s[:1]), ValueError, r"one lse per out .* 2 outs and 1 lses"),
    (lambda o, s: ([], []), ValueError, r"at least one pair; got 0 outs"),
    (lambda o, s: ([o[0], o[1][:1]], s), ValueError, r"every out must match outs\[0\] .*got "
                                                     r"outs\[1\] \(shape \(1, 3, 5, 4\)"),
    (lambda o, s: ([o[0], o[1].float()], s), ValueError, r"outs\[1\] .*float32"),
    (lambda o, s: (o, [s[0], s[1][..., None]]), ValueError, r"lses\[1\] \(shape \(2, 3, 5, 1\).*"
                                                            r"must have shape \(2, 3, 5\)"),
    (lambda o, s: (o, [s[0], s[1].to("meta")]), ValueError, r"lses\[1\] .*device meta.* on cpu"),
])
def test_bad_arguments_are_named(args, exc, message):
    outs, lses = _parts(P=2, grad=False)
    with pytest.raises(exc, match=message):
        merge_attention(*args(outs, lses))


# -- key splits: each part one attention call, merged, against one call ------------------

def _lse_grad_backends():
    names = ["lse-grad-reference"]
    if registry.get("reference").capabilities.lse_grad:
        names.append("reference")
    return names


@pytest.fixture(params=_lse_grad_backends())
def backend(request):
    if request.param == "lse-grad-reference":
        from plugins_for_tests.lse_grad import LseGradReference

        registry.register(LseGradReference(), priority=None)
        yield request.param
        registry.unregister(request.param)
    else:
        yield request.param


def _split_attention(q, k, v, cuts, *, causal, window, seqlens_k, softcap, backend):
    """Attention over keys cut at ``cuts``, one call per part and batch: each part is its
    key slice, and the masks are re-aligned to it. With ``Sk_b`` valid keys and a part
    ``[a, a + L)``, the part's diagonal sits ``sh = Sk_b - a - L`` keys left of the full
    call's, so its window is ``(left - sh, right + sh)``, causal being ``right = 0``."""
    B, Sk = q.shape[0], k.shape[2]
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0 if right == -1 else min(right, 0)
    parts = []
    for a, e in zip(cuts, cuts[1:]):
        outs, lses = [], []
        for b in range(B):
            sk_b = Sk if seqlens_k is None else int(seqlens_k[b])
            L = max(0, min(e, sk_b) - a)
            sh = sk_b - a - L
            if L == 0:  # no key of this batch in the part: an empty call
                part_window = None
            else:
                assert left == -1 or left >= sh, "a left window this split cannot express"
                part_window = (-1 if left == -1 else left - sh,
                               -1 if right == -1 else right + sh)
            out, lse = attnkit.attention(
                q[b:b + 1], k[b:b + 1, :, a:a + L], v[b:b + 1, :, a:a + L], window=part_window,
                softcap=softcap, return_lse=True, backend=backend)
            outs.append(out)
            lses.append(lse)
        parts.append((torch.cat(outs), torch.cat(lses)))
    return merge_attention([o for o, _ in parts], [s for _, s in parts])


@pytest.mark.parametrize("n_parts", [2, 3, 5, 8])
@pytest.mark.parametrize("options", [
    dict(),
    dict(causal=True),
    dict(causal=True, seqlens_k=[24, 5]),  # batch 1: three queries see no key
    dict(window=(20, 2), seqlens_k=[24, 21]),
    dict(causal=True, window=(21, -1), softcap=4.0),
], ids=["dense", "causal", "causal-seqlens", "window-seqlens", "causal-left-softcap"])
def test_key_split_merge_gradients_equal_one_call(backend, n_parts, options):
    rng = random.Random(n_parts)
    torch.manual_seed(n_parts)
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 8, 24, 16
    q = torch.randn(B, Hq, Sq, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, Sk, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, Sk, D, dtype=torch.float64, requires_grad=True)
    inner = sorted(rng.sample(range(4, Sk), n_parts - 1))  # a first part of 4+ keys
    cuts = [0, *inner, Sk]
    kw = dict(causal=options.get("causal", False), window=options.get("window"),
              softcap=options.get("softcap"),
              seqlens_k=(torch.tensor(options["seqlens_k"]) if "seqlens_k" in options
                         else None))
    out, lse = attnkit.attention(q, k, v, return_lse=True, backend=backend, **kw)
    m_out, m_lse = _split_attention(q, k, v, cuts, backend=backend, **kw)
    torch.testing.assert_close(m_out, out)
    torch.testing.assert_close(m_lse, lse)
    g = torch.randn_like(out)
    h = torch.randn_like(lse)

    def loss(o, s):
        return (o * g).sum() + (torch.where(s.isfinite(), s, 0) * h).sum()

    want = torch.autograd.grad(loss(out, lse), (q, k, v))
    got = torch.autograd.grad(loss(m_out, m_lse), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        assert a.isfinite().all(), f"d{name} has non-finite entries"
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"d{name}: {m}")
    if "seqlens_k" in options and options["seqlens_k"][1] < Sq:
        assert math.isinf(lse[1, 0, 0].item()) and (got[0][1, :, 0] == 0).all()
