"""Validation: bad input is refused before anything runs, with a message naming the tensor,
its shape, dtype and device."""

import math

import pytest
import torch

import attnkit
from attnkit.spec import AttentionProblem


def qkv(B=2, Hq=4, Hkv=2, Sq=5, Sk=7, D=16, dtype=torch.float32):
    return (torch.randn(B, Hq, Sq, D, dtype=dtype), torch.randn(B, Hkv, Sk, D, dtype=dtype),
            torch.randn(B, Hkv, Sk, D, dtype=dtype))


def run(q, k, v, **kw):
    return attnkit.attention(q, k, v, backend="reference", **kw)


@pytest.mark.parametrize("bad, exc, pattern", [
    (lambda q, k, v: (q[0], k, v), ValueError,
     r"q \(shape \(4, 5, 16\), dtype torch.float32, device cpu\) must have 4 dimensions"),
    (lambda q, k, v: (q, k[:1], v[:1]), ValueError, r"batch mismatch: .*B=2.*B=1"),
    (lambda q, k, v: (q, k[..., :8], v[..., :8]), ValueError, r"head dim mismatch.*D=16.*D=8"),
    (lambda q, k, v: (q, k[:, :1].expand(2, 3, 7, 16), v[:, :1].expand(2, 3, 7, 16)),
     ValueError, r"multiple of kv heads.*Hq=4.*Hkv=3"),
    (lambda q, k, v: (q, k, v[:, :, :6]), ValueError, r"k and v must have the same shape"),
    (lambda q, k, v: (q.half(), k, v), TypeError, r"share one dtype.*q \(.*float16"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, r"q .*dtype torch.int32 is not"),
    (lambda q, k, v: (q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn),
                      v.to(torch.float8_e4m3fn)), TypeError, r"float8_e4m3fn is not supported"),
    (lambda q, k, v: (q, k, v.to(torch.complex64)), TypeError, r"v .*complex64"),
    (lambda q, k, v: (q.tolist(), k, v), TypeError, r"q must be a torch.Tensor, got list"),
    (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0]), ValueError, r"head dim D must be"),
])
def test_bad_tensors(bad, exc, pattern):
    with pytest.raises(exc, match=pattern):
        run(*bad(*qkv()))


def test_mixed_devices_named():
    q, k, v = qkv()
    meta = torch.empty_like(k, device="meta")
    with pytest.raises(ValueError, match=r"one device: .*k \(shape \(2, 2, 7, 16\), dtype "
                                         r"torch.float32, device meta\)"):
        AttentionProblem.from_tensors(q, meta, v)


@pytest.mark.parametrize("kw, exc, pattern", [
    (dict(seqlens_k=torch.tensor([1, 2, 3])), ValueError, r"seqlens_k \(shape \(3,\).*\(2,\)"),
    (dict(seqlens_k=torch.tensor([1.0, 2.0])), TypeError, r"seqlens_k .*float32.*int32"),
    (dict(seqlens_k=torch.tensor([0, 8])), ValueError, r"in \[0, Sk=7\], got min 0, max 8"),
    (dict(seqlens_k=torch.tensor([-1, 3])), ValueError, r"got min -1"),
    (dict(seqlens_k=[1, 2]), TypeError, r"seqlens_k must be an int tensor"),
    (dict(window=(2,)), TypeError, r"window must be a \(left, right\) pair"),
    (dict(window=(-2, 0)), ValueError, r"window left must be >= 0, or -1"),
    (dict(window=(1.5, 0)), TypeError, r"window left must be an int"),
    (dict(window=(True, 0)), TypeError, r"window left must be an int"),
    (dict(softcap=0.0), ValueError, r"softcap must be finite and > 0"),
    (dict(softcap=-3), ValueError, r"softcap must be finite and > 0"),
    (dict(softcap=math.inf), ValueError, r"softcap must be finite"),
    (dict(softcap="3"), TypeError, r"softcap must be a positive float"),
    (dict(scale=math.nan), ValueError, r"scale must be finite"),
    (dict(scale=math.inf), ValueError, r"scale must be finite"),
    (dict(scale=torch.tensor(1.0)), TypeError, r"scale must be a float"),
    (dict(causal=1), TypeError, r"causal must be a bool"),
])
def test_bad_options(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        run(*qkv(), **kw)


def test_problem_normalizes():
    q, k, v = qkv(D=16)
    p = AttentionProblem.from_tensors(q, k, v, causal=True, window=(3, 2),
                                      seqlens_k=torch.tensor([3, 7]))
    assert p.scale == pytest.approx(0.25) and p.group_size == 2
    assert p.band == (3, 0)  # causal caps the right side at the diagonal
    assert AttentionProblem.from_tensors(q, k, v, window=(-1, 5)).band == (None, 5)
    assert hash(p) == hash(AttentionProblem.from_tensors(
        q, k, v, causal=True, window=(3, 2), seqlens_k=torch.tensor([1, 2])))
    assert "Hq=4" in p.describe() and "window=(3, 2)" in p.describe()


@pytest.mark.parametrize("shape", [(0, 4, 5, 7), (2, 4, 0, 7), (2, 4, 5, 0)])
def test_empty_problems(shape):
    B, Hq, Sq, Sk = shape
    q, k, v = qkv(B=B, Hq=Hq, Sq=Sq, Sk=Sk)
    q.requires_grad_(True)
    out, lse = attnkit.attention(q, k, v, return_lse=True, causal=True, backend="reference")
    assert out.shape == (B, Hq, Sq, 16) and lse.shape == (B, Hq, Sq)
    assert (out == 0).all() and (lse == float("-inf")).all()
    out.sum().backward()
    assert q.grad is not None and (q.grad == 0).all()
