"""The dropout keep mask (attnkit.dropout) and dropout through attention on the reference."""


import pytest
import torch
from dropout_checks import assert_checkpoint_regenerates, reference_without_dropout

import attnkit
from attnkit import reference
from attnkit.dropout import Dropout, draw_state, keep_mask, philox4x32_10, threshold
from attnkit.registry import NoBackendError


@pytest.mark.parametrize("counter,key,want", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, want):
    """Random123's known-answer vectors for Philox4x32-10."""
    assert tuple(int(x) for x in philox4x32_10(*counter, *key)) == want


def test_threshold_edges():
    assert threshold(0.0) == 0
    assert threshold(0.5) == 2**15
    assert threshold(1 - 2**-40) == 2**16 - 1


def test_keep_rate_and_independence():
    state = draw_state(torch.device("cpu"), torch.Generator().manual_seed(3))
    m = keep_mask(state, 0.25, 4, 4, 64, 64)
    n = m.numel()
    rate = m.float().mean().item()
    assert abs(rate - 0.75) < 5 * (0.75 * 0.25 / n) ** 0.5
    flat = m.view(16, -1).float()
    # Different (batch, head) slices are different draws: agreement near p^2 + (1-p)^2.
    agree = (flat[0] == flat[1:]).float().mean().item()
    assert abs(agree - (0.25**2 + 0.75**2)) < 0.02
    assert not torch.equal(m, keep_mask(draw_state(torch.device("cpu")), 0.25, 4, 4, 64, 64))


def _qkv(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 24, 16, generator=gen, dtype=dtype).requires_grad_(True)
            for _ in range(3)]


def test_reference_backend_applies_the_mask():
    q, k, v = _qkv()
    out = attnkit.attention(q, k, v, causal=True, dropout_p=0.2,
                            generator=torch.Generator().manual_seed(7), backend="reference")
    drop = Dropout(0.2, draw_state(q.device, torch.Generator().manual_seed(7)))
    p = torch.softmax(torch.where(reference.visible_mask(24, 24, causal=True),
                                  q @ k.transpose(-1, -2) * 0.25, float("-inf")), -1)
    keep = keep_mask(drop.state, 0.2, 2, 4, 24, 24)
    want = (torch.where(keep, p / 0.8, 0)) @ v
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    for g, w in zip(got, torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_seed_reproduces_and_calls_differ():
    q, k, v = _qkv()
    torch.manual_seed(1)
    a = attnkit.attention(q, k, v, dropout_p=0.5, backend="reference")
    b = attnkit.attention(q, k, v, dropout_p=0.5, backend="reference")
    torch.manual_seed(1)
    assert torch.equal(a, attnkit.attention(q, k, v, dropout_p=0.5, backend="reference"))
    assert not torch.equal(a, b)


def test_checkpoint_recomputes_the_same_mask():
    q, k, v = _qkv()

    def f(q, k, v):
        return attnkit.attention(q, k, v, dropout_p=0.3, backend="reference")

    assert_checkpoint_regenerates(f, q, k, v)


def test_compiled_matches_eager():
    q, k, v = _qkv()
    f = torch.compile(lambda q, k, v: attnkit.attention(q, k, v, dropout_p=0.3,
                                                        backend="reference"),
                      fullgraph=True, backend="aot_eager")
    torch.manual_seed(4)
    eager = attnkit.attention(q, k, v, dropout_p=0.3, backend="reference")
    torch.manual_seed(4)
    assert torch.equal(f(q, k, v), eager)


@pytest.mark.parametrize("p,err", [(1.0, ValueError), (-0.1, ValueError),
                                   (float("nan"), ValueError), ("0.1", TypeError),
                                   (True, TypeError)])
def test_bad_dropout_p(p, err):
    q, k, v = _qkv()
    with pytest.raises(err, match="dropout_p"):
        attnkit.attention(q, k, v, dropout_p=p, backend="reference")


def test_backend_without_dropout_refuses_saying_why():
    with reference_without_dropout("no-dropout"):
        q, k, v = _qkv(torch.float32)
        with pytest.raises(NoBackendError, match="no-dropout.*dropout_p > 0 not supported"):
            attnkit.attention(q, k, v, dropout_p=0.1, backend="no-dropout")


def test_p_zero_draws_nothing():
    q, k, v = _qkv()
    gen = torch.Generator().manual_seed(9)
    attnkit.attention(q, k, v, dropout_p=0.0, generator=gen, backend="reference")
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(9).get_state())
