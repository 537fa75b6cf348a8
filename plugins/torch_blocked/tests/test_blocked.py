"""torch-blocked against `attnkit.reference.safe` in float64, over every feature.

Small blocks (16 x 24, not dividing the sequence lengths) make every case walk several query
and key blocks, masked and unmasked, so the skipping logic is what is tested, not one tile.
"""

from __future__ import annotations

import math

import pytest
import torch
from attnkit_torch_blocked import blocked
from attnkit_torch_blocked.backend import TorchBlockedBackend
from attnkit_torch_blocked.blocked import (
    BlockSizes,
    WorkCount,
    blocked_backward,
    blocked_forward,
    default_block_sizes,
    parse_blocks,
)

import attnkit
from attnkit import reference
from attnkit.spec import AttentionProblem
from attnkit.testing.accuracy import GRAD_FACTOR, OUT_FACTOR, assert_close, max_abs

SMALL = BlockSizes(16, 24)


def _inputs(B, Hq, Hkv, Sq, Sk, D, dtype, layout="bhsd", seed=0, magnitude=1.0):
    g = torch.Generator().manual_seed(seed)

    def rand(h, s, mag):
        shape = (B, s, h, D) if layout == "bshd" else (B, h, s, D)
        t = (torch.randn(shape, generator=g) * mag).to(dtype)
        return t.transpose(1, 2) if layout == "bshd" else t

    return rand(Hq, Sq, magnitude), rand(Hkv, Sk, magnitude), rand(Hkv, Sk, 1.0), g


def _ref(q, k, v, dout, dtype, **opts):
    qq, kk, vv = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    with torch.enable_grad():
        out, lse = reference.safe(qq, kk, vv, **opts)
        grads = torch.autograd.grad(out, (qq, kk, vv), dout.to(dtype))
    return out.detach(), lse.detach(), grads


def _run(q, k, v, dout, blocks=SMALL, mixed=None, **opts):
    problem = AttentionProblem.from_tensors(q, k, v, needs_grad=True, **opts)
    kw = dict(scale=problem.scale, band=problem.band, seqlens_k=opts.get("seqlens_k"),
              softcap=problem.softcap, blocks=blocks, mixed=mixed)
    out, lse = blocked_forward(q, k, v, **kw)
    grads = blocked_backward(q, k, v, out, lse, dout, **kw)
    return out, lse, grads


def _check(q, k, v, blocks=SMALL, mixed=None, **opts):
    """Forward, lse and gradients against ref64 under the conformance rule."""
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(q.dtype)
    out, lse, grads = _run(q, k, v, dout, blocks=blocks, mixed=mixed, **opts)
    ref64 = _ref(q, k, v, dout, torch.float64, **opts)
    ref_lp = _ref(q, k, v, dout, q.dtype, **opts)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert_close("out", out, ref64[0], ref_lp[0], q.dtype, factor=OUT_FACTOR)
    assert_close("lse", lse, ref64[1], ref_lp[1], q.dtype, factor=OUT_FACTOR)
    for name, g, t, g64, glp in zip("qkv", grads, (q, k, v), ref64[2], ref_lp[2]):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert_close(f"d{name}", g, g64, glp, q.dtype, factor=GRAD_FACTOR)
    # Rows that see no key: exactly 0 / -inf / 0.
    seq = opts.get("seqlens_k")
    vis = reference.visible_mask(q.shape[2], k.shape[2], causal=opts.get("causal", False),
                                 window=opts.get("window"), seqlens_k=seq)
    dead = (~vis.any(-1)).expand(q.shape[:3])
    assert (out[dead] == 0).all() and (lse[dead] == float("-inf")).all()
    assert (grads[0][dead] == 0).all()
    assert not any(torch.isnan(t).any() for t in (out, lse, *grads))
    return dead


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(dtype):
    q, k, v, _ = _inputs(2, 2, 2, 50, 61, 32, dtype)
    _check(q, k, v)


@pytest.mark.parametrize("D", [1, 3, 8, 40, 111, 256])
def test_head_dims(D):
    q, k, v, _ = _inputs(1, 2, 1, 33, 29, D, torch.float32)
    _check(q, k, v, causal=True)


@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 70), (70, 1), (17, 50), (50, 17), (48, 48),
                                   (97, 97)])
@pytest.mark.parametrize("causal", [False, True])
def test_seqlens(sq, sk, causal):
    q, k, v, _ = _inputs(2, 2, 2, sq, sk, 16, torch.float32)
    dead = _check(q, k, v, causal=causal)
    assert dead.any() == (causal and sq > sk)  # bottom-right: first Sq - Sk rows see nothing


@pytest.mark.parametrize("window,causal,sq,sk", [
    ((8, 0), False, 60, 60), ((16, 16), False, 60, 60), ((-1, 4), False, 60, 60),
    ((3, -1), False, 60, 60), ((0, 0), False, 60, 60), ((4, 4), True, 60, 80),
    ((2, 0), False, 80, 30),  # rows of Sq > Sk fall off the left edge: fully masked rows
    ((5, 7), False, 30, 90),
])
def test_window(window, causal, sq, sk):
    q, k, v, _ = _inputs(2, 2, 2, sq, sk, 16, torch.float32)
    dead = _check(q, k, v, window=window, causal=causal)
    if window == (2, 0):
        assert dead.any()


@pytest.mark.parametrize("lens", [[0, 70, 35, 1], [70, 70, 70, 70], [0, 0, 0, 0], [9, 64, 3, 41]])
@pytest.mark.parametrize("causal", [False, True])
def test_seqlens_k(lens, causal):
    q, k, v, _ = _inputs(4, 2, 1, 40, 70, 16, torch.float32)
    seq = torch.tensor(lens, dtype=torch.int32)
    dead = _check(q, k, v, seqlens_k=seq, causal=causal)
    if 0 in lens:
        assert dead.any()


def test_seqlens_k_with_window_decode():
    q, k, v, _ = _inputs(3, 4, 2, 1, 90, 16, torch.float32)
    _check(q, k, v, seqlens_k=torch.tensor([90, 17, 55], dtype=torch.int32), causal=True,
           window=(20, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softcap(dtype):
    q, k, v, _ = _inputs(2, 2, 2, 45, 45, 16, dtype, magnitude=3.0)
    _check(q, k, v, softcap=5.0)
    _check(q, k, v, softcap=30.0, causal=True)


@pytest.mark.parametrize("hq,hkv", [(6, 2), (4, 1)])
def test_gqa(hq, hkv):
    q, k, v, _ = _inputs(2, hq, hkv, 37, 41, 16, torch.float32)
    _check(q, k, v, causal=True)
    _check(q, k, v, window=(6, 2), seqlens_k=torch.tensor([41, 20], dtype=torch.int32))


def test_non_contiguous_inputs():
    q, k, v, _ = _inputs(2, 4, 2, 39, 45, 16, torch.float32, layout="bshd")
    assert not q.is_contiguous()
    _check(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_large_scores_do_not_overflow(dtype):
    q, k, v, _ = _inputs(1, 2, 2, 40, 40, 64, dtype, magnitude=8.0)
    _check(q, k, v)


@pytest.mark.parametrize("dtype,magnitude", [(torch.float32, 1e4), (torch.bfloat16, 1e5)])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_backward_at_huge_scores(dtype, magnitude, masked):
    """Scores of ~1e8 (fp32) and ~1e10 (bf16): the backward's P must come from the very
    scores the forward's max was taken over; an lse converted between log bases is an ulp
    of the score off, which exp turns into a factor of thousands."""
    q, k, v, _ = _inputs(2, 2, 2, 40, 40, 16, dtype, magnitude=magnitude)
    opts = dict(causal=True, window=(9, 0),
                seqlens_k=torch.tensor([40, 23], dtype=torch.int32)) if masked else {}
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    out, lse, grads = _run(q, k, v, dout, **opts)
    ref64 = _ref(q, k, v, dout, torch.float64, **opts)
    ref_lp = _ref(q, k, v, dout, dtype, **opts)
    assert_close("out", out, ref64[0], ref_lp[0], dtype, factor=OUT_FACTOR)
    assert_close("lse", lse, ref64[1], ref_lp[1], dtype, factor=OUT_FACTOR)
    assert_close("dv", grads[2], ref64[2][2], ref_lp[2][2], dtype, factor=GRAD_FACTOR)
    # The softmax is one-hot, so dq = dk = 0 exactly, and any backward that forms
    # dS = P * (dP - rowsum(dO * O)) is left with their rounding difference times |q|, |k|.
    # The reference backend computes the same way: hold dq and dk to its error.
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref_out = attnkit.attention(qq, kk, vv, backend="reference", **opts)
    ref_grads = torch.autograd.grad(ref_out, (qq, kk, vv), dout)
    for name, g, r, g64 in zip("qk", grads, ref_grads, ref64[2]):
        err, ref_err = max_abs(g, g64), max_abs(r, g64)
        assert err <= 2 * ref_err + 1e-6 * magnitude, (name, err, ref_err)


def test_mixed_precision_path(monkeypatch):
    """The CUDA path (half GEMM operands, fp32 results), emulated on CPU: operands stay in
    fp16/bf16 and the emulated GEMM accumulates in fp32 like cuBLAS's fp32-output GEMM."""
    calls = []

    def fake_bmm(a, b):
        assert a.dtype in (torch.float16, torch.bfloat16) and a.dtype == b.dtype
        calls.append(a.dtype)
        return torch.bmm(a.float(), b.float())

    monkeypatch.setattr(blocked, "_bmm_fp32_out", fake_bmm)
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v, _ = _inputs(2, 4, 2, 45, 50, 16, dtype, magnitude=2.0)
        _check(q, k, v, mixed=True, causal=True, softcap=20.0)
        _check(q, k, v, mixed=True, seqlens_k=torch.tensor([0, 33], dtype=torch.int32))
    assert calls


def test_block_sizes_do_not_change_results_much():
    q, k, v, _ = _inputs(1, 2, 2, 70, 70, 16, torch.float32)
    outs = [blocked_forward(q, k, v, scale=0.25, band=(None, 0), blocks=b)[0]
            for b in (BlockSizes(1, 1), BlockSizes(7, 13), BlockSizes(64, 64),
                      BlockSizes(512, 512))]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-6)


def _count(S, band, blocks, seqlens_k=None, B=1, H=2):
    q, k, v, _ = _inputs(B, H, H, S, S, 8, torch.float32)
    work = WorkCount()
    blocked_forward(q, k, v, scale=0.3, band=band, seqlens_k=seqlens_k, blocks=blocks,
                    work=work)
    return work


def test_causal_skips_about_half_the_work():
    full = _count(512, (None, None), BlockSizes(32, 32))
    causal = _count(512, (None, 0), BlockSizes(32, 32))
    assert full.masked_tiles == 0 and full.tiles == 16 * 16
    assert full.elements == 2 * 512 * 512
    # 16 query blocks: 120 fully visible tiles below the diagonal plus 16 diagonal ones.
    assert causal.tiles == 136 and causal.masked_tiles == 16
    ratio = causal.elements / full.elements
    assert 0.5 <= ratio <= 0.5 + 32 / 512, ratio


def test_window_work_is_linear_in_length():
    w1 = _count(256, (16, 0), BlockSizes(32, 32))
    w2 = _count(512, (16, 0), BlockSizes(32, 32))
    # Each query block sees at most its own 32 keys plus 16 to the left: O(S * window).
    for w, S in ((w1, 256), (w2, 512)):
        assert w.elements <= 2 * S * (32 + 16)
    assert w2.elements - w1.elements <= 2 * 256 * (32 + 16)


def test_only_boundary_tiles_are_masked():
    # Causal, blocks aligned to the diagonal: exactly one masked tile per query block.
    w = _count(256, (None, 0), BlockSizes(64, 64))
    assert w.masked_tiles == 4 and w.tiles == 10


def test_seqlens_k_skips_keys_beyond_the_longest():
    seq = torch.tensor([100, 60], dtype=torch.int32)
    w = _count(512, (None, None), BlockSizes(64, 64), seqlens_k=seq, B=2)
    # Keys >= 100 exist in no batch: only [0, 100) is ever computed.
    assert w.elements == 2 * 2 * 512 * 100
    none = _count(512, (None, None), BlockSizes(64, 64),
                  seqlens_k=torch.tensor([0, 0], dtype=torch.int32), B=2)
    assert none.tiles == 0 and none.empty_query_blocks == none.query_blocks


def test_through_attnkit_api_and_autograd():
    q, k, v, _ = _inputs(2, 4, 2, 33, 47, 16, torch.float32)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out, lse = attnkit.attention(q, k, v, causal=True, return_lse=True,
                                 backend="torch-blocked")
    ref, ref_lse = reference.safe(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    # Chosen automatically on CPU.
    assert attnkit.explain(q, k, v).chosen == "torch-blocked"


def test_backend_blocks_constructor_and_env(monkeypatch):
    assert TorchBlockedBackend(block_q=8, block_k=16).blocks == BlockSizes(8, 16)
    with pytest.raises(ValueError):
        TorchBlockedBackend(block_q=8)
    with pytest.raises(ValueError):
        BlockSizes(0, 4)
    assert parse_blocks("128x512") == BlockSizes(128, 512) == parse_blocks("128,512")
    with pytest.raises(ValueError, match="BQxBK"):
        parse_blocks("big")
    monkeypatch.setenv(blocked.BLOCKS_ENV, "8x8")
    q, k, v, _ = _inputs(1, 1, 1, 20, 20, 8, torch.float32)
    work = WorkCount()
    blocked_forward(q, k, v, scale=0.3, work=work)
    assert work.block_sizes == BlockSizes(8, 8) and work.tiles == 9


def test_default_block_sizes():
    assert default_block_sizes("cpu", torch.float32, 1, 8, 64) == BlockSizes(256, 512)
    # Budget-limited: more heads -> shorter key blocks, never below 256 keys / 128 rows.
    assert default_block_sizes("cpu", torch.float32, 4, 16, 64) == BlockSizes(128, 256)
    assert default_block_sizes("cpu", torch.float32, 1, 1, 64) == BlockSizes(256, 4096)
    assert default_block_sizes("cpu", torch.float64, 1, 8, 64).k == 256
    assert default_block_sizes("cpu", torch.float32, 1, 8, 256).k == 256
    assert default_block_sizes("cuda", torch.float16, 1, 8, 64) == BlockSizes(1024, 1024)
    assert default_block_sizes("cuda", torch.float16, 32, 32, 64) == BlockSizes(128, 1024)


def test_deterministic():
    q, k, v, _ = _inputs(2, 4, 2, 70, 70, 16, torch.float32)
    dout = torch.randn(q.shape)
    a = _run(q, k, v, dout, causal=True)
    b = _run(q, k, v, dout, causal=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


def test_lse_is_natural_log():
    q, k, v, _ = _inputs(1, 1, 1, 5, 9, 4, torch.float64)
    _, lse = blocked_forward(q, k, v, scale=0.5, blocks=SMALL)
    s = (q @ k.transpose(-1, -2)) * 0.5
    assert abs(float(lse[0, 0, 0]) - math.log(float(s[0, 0, 0].exp().sum()))) < 1e-12


def test_fp32_gemms_are_not_tf32_on_cuda():
    """The guard forces exact fp32 GEMMs on CUDA for fp32 inputs and restores the caller's
    setting (checked without a GPU: only the device type is read)."""
    fp32 = blocked._Precision(torch.float32, torch.float32)
    mixed = blocked._Precision(torch.float32, torch.float16)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        with blocked._ieee_fp32(fp32, torch.device("cuda")):
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
        with blocked._ieee_fp32(mixed, torch.device("cuda")):  # half GEMMs: untouched
            assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
