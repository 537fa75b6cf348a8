"""Attention dropout in the `tl` kernels, through the Triton interpreter (``interpreter``: run
with TRITON_INTERPRET=1, as nox does): the tile mask helper bit for bit against
`attnkit.dropout`'s definition, the mask read back from the backend's output, and out and
gradients against the float64 reference with the same `Dropout` across the kernels' flags
(causal, window, GQA, softcap, seqlens_k, decode shapes). The interpreter tiles are 32x16
(forward) and 16x32 / 32x16 (backward), so the shapes below cross block edges."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from attnkit_triton import _backward, _forward  # noqa: E402
from attnkit_triton._dropout import dropout_state, keep_tile  # noqa: E402

import attnkit  # noqa: E402
from attnkit import reference  # noqa: E402
from attnkit.dropout import Dropout, draw_state, keep_mask, threshold  # noqa: E402
from attnkit.spec import AttentionProblem  # noqa: E402
from attnkit.testing.accuracy import GRAD_FACTOR, assert_close  # noqa: E402

pytestmark = pytest.mark.interpreter

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@triton.jit
def _mask_kernel(STATE, OUT, t, Sq, Sk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    seed, offset = dropout_state(STATE)
    for n0 in range(0, Sk, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        keep = keep_tile(seed, offset, bh, rows, n0, t, BLOCK_M, BLOCK_N)
        tl.store(OUT + (bh * Sq + rows[:, None]) * Sk + cols[None, :], keep.to(tl.int8),
                 mask=(rows[:, None] < Sq) & (cols[None, :] < Sk))


MASK_CASES = [  # (seed, state[1]), p, (BLOCK_M, BLOCK_N)
    ((0x0123456789ABCDEF, 7), 0.1, (16, 16)),
    ((-1, -(2**63)), 0.5, (32, 64)),  # every seed bit set; the offset's high word is unread
    ((-(2**62) + 12345, 0x7_FFFF_FFFF), 0.999, (16, 128)),
    ((1, 0xFFFF_FFFF), 1e-6, (16, 32)),  # threshold 0: everything kept
    ((2**40 + 3, 2**32 + 5), 0.25, (32, 16)),
]


@pytest.mark.parametrize("state, p, tile", MASK_CASES,
                         ids=[f"{c[1]}-{c[2][0]}x{c[2][1]}" for c in MASK_CASES])
def test_keep_tile_is_the_definition(state, p, tile):
    bm, bn = tile
    B, H, Sq, Sk = 2, 3, 37, 150
    st = torch.tensor(state, dtype=torch.int64)
    got = torch.full((B * H, Sq, Sk), -1, dtype=torch.int8)
    _mask_kernel[(triton.cdiv(Sq, bm), B * H)](st, got, threshold(p), Sq, Sk,
                                                BLOCK_M=bm, BLOCK_N=bn)
    want = keep_mask(st, p, B, H, Sq, Sk).view(B * H, Sq, Sk)
    bad = (got != want.to(torch.int8)).sum().item()
    assert bad == 0, f"{bad} of {want.numel()} keep decisions differ from attnkit.dropout's"


def _read_mask(seed, batch, heads_q, heads_kv, seqlen_q, dtype, causal=False):
    """The mask the backend applied: q = 0 gives each visible key P = 1/n, v = I puts key j's
    kept probability in column j (64 keys, head dim 64)."""
    S = 64
    q = torch.zeros(batch, heads_q, seqlen_q, S, dtype=dtype)
    eye = torch.eye(S, dtype=dtype).expand(batch, heads_kv, S, S)
    out = attnkit.attention(q, eye, eye, causal=causal, dropout_p=0.25,
                            generator=torch.Generator().manual_seed(seed), backend="triton")
    state = draw_state(torch.device("cpu"), torch.Generator().manual_seed(seed))
    return out, keep_mask(state, 0.25, batch, heads_q, seqlen_q, S)


@pytest.mark.parametrize("heads", [(3, 3), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype", [F16, F32], ids=str)
def test_mask_read_back_is_the_definition(heads, dtype):
    out, want = _read_mask(3, 2, *heads, 40, dtype)
    got = out > 0.5 / 64
    assert torch.equal(got, want), f"{(got != want).sum().item()} keep decisions differ"
    # Kept entries carry c / Sk = (1 / 0.75) / 64, the scale applied once.
    kept = out[want].float()
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (0.75 * 64)),
                               rtol=2e-3, atol=0)


def test_causal_mask_read_back():
    """Causal rows see keys up to the diagonal: the kept ones there are the definition's."""
    out, want = _read_mask(9, 1, 2, 2, 64, F32, causal=True)
    visible = torch.ones(64, 64, dtype=torch.bool).tril()
    assert torch.equal(out > 0, want & visible)


CASES = [
    # B, Hq, Hkv, Sq, Sk, D, dtype, options
    (1, 2, 2, 37, 45, 32, F16, {}),
    (2, 2, 2, 37, 45, 32, F32, {}),
    (1, 1, 1, 33, 29, 16, BF16, {}),
    (1, 4, 2, 45, 45, 32, F16, {"causal": True}),  # GQA
    (1, 4, 1, 20, 70, 16, F32, {"causal": True}),
    (1, 1, 1, 50, 17, 16, F32, {"causal": True}),  # the first rows see nothing
    (1, 2, 1, 60, 70, 16, F32, {"window": (16, 5)}),
    (1, 1, 1, 45, 50, 16, F16, {"window": (4, 4), "causal": True}),
    (1, 2, 2, 37, 40, 16, F32, {"softcap": 5.0}),
    (1, 1, 1, 30, 37, 40, F16, {"causal": True}),  # padded head dim
    (3, 1, 1, 33, 40, 16, F32, {"seqlens": [40, 0, 17]}),
]


@pytest.mark.parametrize("p", [0.1, 0.6])
@pytest.mark.parametrize("case", CASES, ids=[
    f"{str(c[6])[6:]}-B{c[0]}H{c[1]}x{c[2]}-q{c[3]}k{c[4]}d{c[5]}-"
    + "-".join(f"{k}{v}" for k, v in c[7].items()) for c in CASES])
def test_matches_reference_with_the_mask(case, p):
    B, Hq, Hkv, Sq, Sk, D, dtype, opts = case
    opts = dict(opts)
    seqlens = opts.pop("seqlens", None)
    if seqlens is not None:
        opts["seqlens_k"] = torch.tensor(seqlens, dtype=torch.int32)
    g = torch.Generator().manual_seed(Sq * 31 + Sk)
    q, k, v = (torch.randn((B, h, s, D), generator=g).to(dtype).requires_grad_()
               for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    out, lse = attnkit.attention(q, k, v, **opts, return_lse=True, dropout_p=p,
                                 generator=torch.Generator().manual_seed(5), backend="triton")
    drop = Dropout(p, draw_state(torch.device("cpu"), torch.Generator().manual_seed(5)))
    dout = torch.randn(q.shape, generator=g).to(dtype)

    def ref(dt):
        ins = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o, r_lse = reference.safe(*ins, **opts, dropout=drop)
        return o, r_lse, torch.autograd.grad(o, ins, dout.to(dt))

    (o64, lse64, g64), (olp, lselp, glp) = ref(torch.float64), ref(dtype)
    assert_close("out", out, o64, olp, dtype)
    assert_close("lse", lse, lse64, lselp.float(), dtype)  # dropout leaves lse alone
    got = torch.autograd.grad(out, (q, k, v), dout)
    for name, a, b64, blp in zip("qkv", got, g64, glp):
        assert_close(f"d{name}", a, b64, blp, dtype, factor=GRAD_FACTOR)


def test_decode_shape_takes_the_masked_kernel():
    """A decoding-shaped call (which the split-KV kernel takes without dropout) applies the
    mask: the split-KV kernel has none, so dropout routes to the `tl` forward."""
    from attnkit_triton import decode as decode_module

    g = torch.Generator().manual_seed(2)
    q = torch.randn((1, 8, 1, 64), generator=g).to(F16)
    k, v = (torch.randn((1, 2, 600, 64), generator=g).to(F16) for _ in range(2))
    assert decode_module.use_split_kv(AttentionProblem.from_tensors(q, k, v, causal=True))
    out = attnkit.attention(q, k, v, causal=True, dropout_p=0.3,
                            generator=torch.Generator().manual_seed(4), backend="triton")
    drop = Dropout(0.3, draw_state(torch.device("cpu"), torch.Generator().manual_seed(4)))
    r64, _ = reference.safe(q.double(), k.double(), v.double(), causal=True, dropout=drop)
    rlp, _ = reference.safe(q, k, v, causal=True, dropout=drop)
    assert_close("out", out, r64, rlp, F16)


def test_same_seed_same_result_and_calls_differ():
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn((1, 2, 40, 32), generator=g) for _ in range(3))

    def run(seed):
        return attnkit.attention(q, k, v, dropout_p=0.2,
                                 generator=torch.Generator().manual_seed(seed), backend="triton")

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_dropout_flag_and_scalars():
    """The DROPOUT constexpr follows ``dropout_p``; without it the kernels' threshold and
    scale arguments are fixed (so the no-dropout kernels and their launch keys are as
    before)."""
    q = torch.zeros(1, 1, 8, 16)
    plain = AttentionProblem.from_tensors(q, q, q)
    dropped = AttentionProblem.from_tensors(q, q, q, dropout_p=0.1)
    assert _forward._flags(plain, False, F32, False)["DROPOUT"] is False
    assert _forward._flags(dropped, False, F32, False)["DROPOUT"] is True
    assert _forward.dropout_scalars(plain) == (0, 1.0)
    assert _forward.dropout_scalars(dropped) == (threshold(0.1), 1.0 / 0.9)
    assert _forward.dropout_key(None) is None
    state = torch.zeros(4, dtype=torch.int64)
    assert _forward.dropout_key(Dropout(0.1, state[1:3])) == 8


def test_kept_backward_sites_take_the_state(monkeypatch):
    """The backward's kept sites pass the dropout state as the kernels' last pointer; a state
    at another address modulo 16 goes through the keyed launches (the kept sites hold the
    aligned state's specialization). Bookkeeping only: fakes stand in for the launches."""
    from types import SimpleNamespace

    log = []

    def site(name):
        return SimpleNamespace(compiled=True, run=lambda stream, *a: log.append((name, a)))

    def keyed(name):
        def launch(*args, **kw):
            log.append((name, None))
            return site(name)
        return launch

    for name in ("launch_prep", "launch_dkdv", "launch_dq"):
        monkeypatch.setattr(_backward, name, keyed(name))
    monkeypatch.setattr(_backward, "fast_launches", lambda: True)
    monkeypatch.setattr(_backward, "current_stream", lambda index: 7)
    cfg = SimpleNamespace(block_m=64, tma=False)
    q = torch.randn(1, 2, 50, 16)
    out, lse = torch.empty_like(q), torch.empty(1, 2, 50)
    buf = torch.zeros(4, dtype=torch.int64)
    aligned, odd = Dropout(0.1, buf[:2]), Dropout(0.1, buf[1:3])
    kept = _backward.BackwardSites()
    for drop, keyed_path in ((aligned, True), (aligned, False), (odd, True)):
        log.clear()
        _backward.launch_backward(None, q, q, q, out, lse, q, None, cfg, cfg, False,
                                  "layout", kept, dropout=drop)
        if keyed_path:
            assert [a for _, a in log] == [None, None, None]
        else:
            assert [n for n, _ in log] == ["launch_prep", "launch_dkdv", "launch_dq"]
            assert all(a[-1] is drop.state for _, a in log[1:])


def test_dropout_tiles_stay_within_the_mask_budget():
    """Kernels with dropout take the table's tile with key blocks halved until BLOCK_M x
    BLOCK_N <= DROPOUT_TILE (sm_90's D=128 forward: 128x128 would need 241 KB of shared
    memory); tiles already within it are the table's own."""
    from attnkit_triton import _configs

    for arch in (86, 90, 120):
        for bd in (16, 32, 64, 128, 256):
            for dtype in (BF16, F32):
                for causal in (False, True):
                    plain = _configs.table_configs(arch, bd, causal, dtype)
                    drop = _configs.table_configs(arch, bd, causal, dtype, dropout=True)
                    for a, b in zip(plain, drop):
                        assert b.block_m * b.block_n <= _configs.DROPOUT_TILE
                        assert (b.block_m, b.num_warps, b.num_stages, b.tma) == (
                            a.block_m, a.num_warps, a.num_stages, a.tma)
                        assert b == a or (b.block_n < a.block_n
                                          and a.block_m * a.block_n > _configs.DROPOUT_TILE)
    fwd = _configs.table_configs(90, 128, False, BF16, dropout=True)[0]
    assert (fwd.block_m, fwd.block_n) == (128, 64)
