"""GPU tests (``cuda``) of what the cupy kernels never read and what they must propagate.

Keys that exist for no query (at or past ``seqlens_k[b]``, or before the first key any query's
band reaches, ``max(0, Sk_b - Sq - left)``) may hold anything: filled with NaN, +inf or -inf
they leave out, lse and dq/dk/dv bit for bit as in the clean run, and their dK/dV are 0. The
shapes are picked so that the first key tile of a block crosses that first key at an offset
that is no multiple of a tile, through both loaders of the forward (vector RowStream at head
dims 64/128/256, the general one at 72), the dQ and dK/dV kernels (column-chunked at 256), the
fp32 kernels, and the split-KV decode kernel with several splits and its merge. A NaN query
row gives NaN out and NaN lse, leaving every other row's bits alone. The lse gradient (dlse)
matches the reference under the suite's accuracy rule.
"""

from __future__ import annotations

import pytest
import torch

from attnkit import attention
from attnkit.spec import AttentionProblem
from attnkit.testing import accuracy

pytestmark = pytest.mark.cuda

DEV = "cuda"
POISONS = (float("nan"), float("inf"), float("-inf"))

# (dtype, head dim, Hq, Hkv, Sq, Sk, seqlens_k or None, options)
CASES = [
    (torch.float16, 64, 4, 2, 100, 300, [300, 211, 0], dict(causal=True, window=(37, 0))),
    (torch.bfloat16, 128, 2, 1, 100, 300, [300, 211, 150], dict(window=(37, 5), softcap=20.0)),
    (torch.float16, 72, 2, 2, 90, 333, None, dict(window=(50, 0))),
    (torch.bfloat16, 256, 2, 1, 70, 260, [260, 97], dict(window=(20, 3))),
    (torch.float16, 64, 4, 1, 64, 200, [200, 37, 1], dict()),
    (torch.float32, 64, 2, 1, 50, 170, [170, 99], dict(window=(45, 2))),
    (torch.float32, 40, 2, 2, 33, 120, [120, 60], dict(causal=True, window=(9, 0))),
    # Decoding shapes: the split-KV kernel, several splits per row, then the merge.
    (torch.float16, 128, 8, 2, 3, 3000, [3000, 1234], dict(causal=True, window=(700, 0))),
    (torch.bfloat16, 64, 4, 4, 1, 2100, [2100, 333], dict()),
    (torch.float32, 128, 4, 2, 2, 1500, [1500, 800], dict(window=(400, 0))),
]


def _id(case):
    dtype, d, hq, hkv, sq, sk, sl, opts = case
    tail = "-".join(f"{k}{'_'.join(map(str, v)) if isinstance(v, tuple) else v}"
                    for k, v in opts.items())
    return f"{str(dtype)[6:]}-d{d}-h{hq}x{hkv}-{sq}x{sk}-{'sl' if sl else 'nosl'}-{tail}"


def _inputs(case, seed=0):
    dtype, d, hq, hkv, sq, sk, seqlens, opts = case
    g = torch.Generator().manual_seed(seed)
    b = len(seqlens) if seqlens else 2
    q = torch.randn(b, hq, sq, d, generator=g).to(DEV, dtype)
    k = torch.randn(b, hkv, sk, d, generator=g).to(DEV, dtype)
    v = torch.randn(b, hkv, sk, d, generator=g).to(DEV, dtype)
    dout = torch.randn(b, hq, sq, d, generator=g).to(DEV, dtype)
    sl = None if seqlens is None else torch.tensor(seqlens, dtype=torch.int32, device=DEV)
    return q, k, v, dout, sl, opts


def _absent(case) -> torch.Tensor:
    """(B, 1, Sk, 1) bool: keys that exist for no query of their batch."""
    dtype, d, hq, hkv, sq, sk, seqlens, opts = case
    left = (opts.get("window") or (-1, -1))[0]
    rows = []
    for skb in seqlens or [sk, sk]:
        j = torch.arange(sk)
        first = max(0, skb - sq - left) if left >= 0 else 0
        rows.append((j < first) | (j >= skb))
    return torch.stack(rows).view(len(rows), 1, sk, 1).to(DEV)


def _run(q, k, v, dout, sl, opts, grads=True):
    q, k, v = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
    out, lse = attention(q, k, v, seqlens_k=sl, return_lse=True, backend="cupy", **opts)
    if not grads:
        return out.detach(), lse.detach()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), lse.detach(), dq, dk, dv


def _splits(case) -> int:
    """Key splits of the split-KV decode kernel for this case (0: the forward kernel)."""
    from attnkit_cupy import _decode

    from attnkit.backend_utils import sm_count

    q, k, v, _, sl, opts = _inputs(case)
    problem = AttentionProblem.from_tensors(q, k, v, seqlens_k=sl, **opts)
    if not _decode.use_split_kv(problem):
        return 0
    return _decode.num_splits(problem, sm_count(q.device))


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_absent_keys_are_never_read(case):
    q, k, v, dout, sl, opts = _inputs(case)
    absent = _absent(case)
    assert absent.any(), "the case must hold keys that exist for no query"
    clean = _run(q, k, v, dout, sl, opts)
    names = ("out", "lse", "dq", "dk", "dv")
    for poison in POISONS:
        kp, vp = k.masked_fill(absent, poison), v.masked_fill(absent, poison)
        got = _run(q, kp, vp, dout, sl, opts)
        for name, a, b in zip(names, got, clean):
            assert torch.equal(a, b), f"{name} changed with {poison} in absent keys"
        for name, g in zip(("dk", "dv"), got[3:]):
            assert bool((g.masked_select(absent) == 0).all()), f"{name} of absent keys not 0"


def test_decoding_cases_take_the_split_kv_kernel_with_several_splits():
    # Else the decoding cases above would test the forward kernel twice, or no merge.
    splits = [_splits(c) for c in CASES]
    assert [s > 1 for s in splits] == [c[4] <= 16 for c in CASES], splits
    assert [s == 0 for s in splits] == [c[4] > 16 for c in CASES], splits


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_nan_query_row_gives_nan_out_and_lse(case):
    q, k, v, dout, sl, opts = _inputs(case)
    out0, lse0 = _run(q, k, v, dout, sl, opts, grads=False)
    qn = q.clone()
    qn[0, -1, q.shape[2] // 2, 3] = float("nan")  # one element poisons the whole row
    out, lse = _run(qn, k, v, dout, sl, opts, grads=False)
    row = (0, q.shape[1] - 1, q.shape[2] // 2)
    assert bool(out[row].isnan().all()), "out of the NaN row is not all NaN"
    assert bool(lse[row].isnan()), f"lse of the NaN row is {float(lse[row])}, not NaN"
    keep = torch.ones(lse.shape, dtype=torch.bool, device=DEV)
    keep[row] = False
    assert torch.equal(out[keep], out0[keep]) and torch.equal(lse[keep], lse0[keep])
    if sl is not None and int(sl.min()) == 0:  # rows that see no key stay 0 and -inf
        b = int(torch.argmin(sl))
        assert bool((out[b] == 0).all()) and bool((lse[b] == float("-inf")).all())


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_lse_gradient_matches_the_reference(case):
    q, k, v, dout, sl, opts = _inputs(case)
    glse = torch.randn(q.shape[:3], generator=torch.Generator().manual_seed(1)).to(DEV)

    def grads(backend, dtype):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        out, lse = attention(qq, kk, vv, seqlens_k=sl, return_lse=True, backend=backend,
                             **opts)
        loss = (out * dout.to(dtype)).sum() + (torch.nan_to_num(lse, neginf=0.0) * glse).sum()
        return torch.autograd.grad(loss, (qq, kk, vv))

    got = grads("cupy", q.dtype)
    ref64 = grads("reference", torch.float64)
    ref_lp = grads("reference", q.dtype)
    for name, g, r64, rlp in zip(("dq", "dk", "dv"), got, ref64, ref_lp):
        accuracy.assert_close(name, g, r64, rlp, q.dtype, accuracy.GRAD_FACTOR)
