"""Paged KV caches on the cupy backend: routing, argument checks and the split kernel's
parameter list (CPU); on a GPU (``cuda``), the paged kernel against the contiguous one over the
same keys, bit for bit, and against the float64 reference. `attnkit check cupy --device cuda
-- -k paged` runs the conformance suite's paged cases."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from attnkit_cupy import _compile, _decode, _launch
from attnkit_cupy.backend import CupyBackend

import attnkit
from attnkit import reference
from attnkit.paged import paged_problem
from attnkit.spec import AttentionProblem
from attnkit.testing.accuracy import check

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def _pools(N=6, Hkv=2, P=16, D=64, dtype=F16, device="cpu"):
    k, v = (torch.zeros(N, Hkv, P, D, dtype=dtype, device=device) for _ in range(2))
    return k, v


def _paged(B=2, Hq=4, Hkv=2, Sq=1, P=16, max_pages=3, D=64, dtype=F16, device="cpu", **kw):
    q = torch.zeros(B, Hq, Sq, D, dtype=dtype, device=device)
    k, v = _pools(6, Hkv, P, D, dtype, device)
    table = torch.zeros(B, max_pages, dtype=torch.int32, device=device)
    lens = torch.full((B,), P, dtype=torch.int32, device=device)
    return paged_problem(q, k, table, **kw), q, k, v, table, lens


# -- routing and declared limits ------------------------------------------------------------

def test_paged_is_declared_and_always_takes_the_split_kernel():
    assert CupyBackend.capabilities.paged
    for Sq in (1, 16, 17, 300):  # chunked prefill too: row blocks cover any query count
        p = _paged(Sq=Sq, P=5)[0]._replace(device=torch.device("cuda", 0))
        assert p.page_size == 5 and _decode.use_split_kv(p)
    assert not _decode.use_split_kv(_paged(B=0)[0])


WHOLE = _compile.FEAT_WHOLE_PAGES


@pytest.mark.parametrize("P, dtype, window, lookups", [
    (64, F16, None, WHOLE), (256, F16, None, WHOLE), (128, F16, (-1, 0), WHOLE),
    (16, F16, None, 0), (32, F16, None, 0), (96, F16, None, 0),
    (48, F16, (-1, 0), 0), (5, F16, None, 0), (8, F16, None, 0),
    (64, F16, (100, 0), 0), (16, F16, (100, 0), 0),  # a left window: splits start anywhere
    (64, F32, None, 0), (16, F32, None, 0),  # the fp32 kernel looks rows up one by one
])
def test_pages_of_whole_tiles_take_one_lookup_per_tile(P, dtype, window, lookups):
    p = _paged(P=P, dtype=dtype, causal=True, window=window)[0]
    feat = _decode._plan(p, 1, None).variant.feat
    assert feat == _compile.FEAT_PAGED | lookups
    if dtype == F16:  # the decode tile's keys: 64 at every head dim
        assert _decode._plan(p, 1, None).variant.tiles[1] == 64


def test_paged_grid_limits_are_refused_with_reasons():
    p = _paged()[0]
    assert _decode.grid_reasons(p) == []
    wide = p._replace(batch=40000)
    assert "batch x kv heads = 80000" in " ".join(_decode.grid_reasons(wide))
    tall = p._replace(seqlen_q=600000)  # 2 x 600000 rows: 75000 blocks of 16
    assert "rows must be" in " ".join(_decode.grid_reasons(tall))
    reasons = CupyBackend().not_supported_reasons(tall._replace(device=torch.device("cpu")))
    assert any("rows must be" in r for r in reasons)


# -- argument checks ------------------------------------------------------------------------

def test_paged_checks_accept_valid_arguments():
    p, q, k, v, table, lens = _paged(Sq=40, causal=True)
    _decode.check_args(p, q, k, v, lens, require_cuda=False, block_table=table)
    p, q, k, v, table, lens = _paged(P=5, Hq=8, Hkv=1, dtype=F32)
    _decode.check_args(p, q, k, v, lens, require_cuda=False, block_table=table)


def test_paged_checks_name_what_is_wrong():
    p, q, k, v, table, lens = _paged()
    with pytest.raises(ValueError, match="needs its block_table"):
        _decode.check_args(p, q, k, v, lens, require_cuda=False)
    with pytest.raises(ValueError, match="needs seqlens_k"):
        _decode.check_args(p, q, k, v, None, require_cuda=False, block_table=table)
    for bad in (table.to(torch.int64), table[:, :2], table.t().contiguous().t(),
                table[:1]):
        with pytest.raises(ValueError, match="block_table"):
            _decode.check_args(p, q, k, v, lens, require_cuda=False, block_table=bad)
    k5, v5 = _pools(P=5)
    with pytest.raises(ValueError, match="page_size=16"):
        _decode.check_args(p, q, k5, v5, lens, require_cuda=False, block_table=table)
    k3, _ = _pools(Hkv=3)
    with pytest.raises(ValueError, match="do not match the problem"):
        _decode.check_args(p, q, k3, v, lens, require_cuda=False, block_table=table)
    dense = AttentionProblem.from_tensors(q, q, q)
    with pytest.raises(ValueError, match="only for a paged problem"):
        _decode.check_args(dense, q, q, q, None, require_cuda=False, block_table=table)


# -- the split kernel's parameters ----------------------------------------------------------

def _kernel_params(name: str) -> list[str]:
    text = (_compile.KERNEL_DIR / "decode.cu").read_text()
    m = re.search(rf"{name}\((.*?)\)\s*\{{", text, re.S)
    assert m, f"{name} not found"
    return [" ".join(p.split()) for p in m.group(1).split(",")]


@pytest.mark.parametrize("kernel, dtype", [("decode_split_kernel", F16),
                                           ("decode_split_f32_kernel", F32)])
@pytest.mark.parametrize("paged", [False, True])
def test_split_arguments_match_the_kernels_parameters(kernel, dtype, paged):
    """Every argument the host passes has the kernel parameter's width and kind, pointers sit
    at the slots the launch refills, and the paged ones carry the table's geometry."""
    params = _kernel_params(kernel)
    if paged:
        p, q, k, v, table, lens = _paged(P=5, dtype=dtype)
    else:
        q = torch.zeros(2, 4, 1, 64, dtype=dtype)
        k = v = torch.zeros(2, 2, 300, 64, dtype=dtype)
        p, table = AttentionProblem.from_tensors(q, k, v), None
    plan = _decode._plan(p, 3, None)
    args = _decode.split_arguments(p, plan, q, k, v, True, table)
    assert len(args) == len(params)
    pointers = [i for i, prm in enumerate(params) if "*" in prm]
    assert tuple(pointers) == _decode._SPLIT_POINTERS
    for a, prm in zip(args, params):
        if "*" in prm or prm.startswith("i64"):
            assert type(a) is int, prm  # a 64-bit ctypes value
        elif prm.startswith("int"):
            assert type(a) is np.int32, prm
        else:
            assert prm.startswith("float") and type(a) is np.float32, prm
    names = [prm.split()[-1] for prm in params]
    tail = dict(zip(names[-4:], (int(x) for x in args[-4:])))
    if paged:
        assert tail == {"max_pages": 3, "page_size": 5, "page_shift": -1, "num_pages": 6}
        p16 = _paged(P=16, dtype=dtype)
        args16 = _decode.split_arguments(p16[0], _decode._plan(p16[0], 1, None), *p16[1:4],
                                         True, p16[4])
        assert int(args16[-2]) == 4  # 16 = 1 << 4: a shift, not a division
    else:
        assert set(tail.values()) == {0}
    assert plan.variant.feat == (_compile.FEAT_PAGED if paged else 0)  # 5 rows: per row


# -- GPU ------------------------------------------------------------------------------------

gpu = pytest.mark.cuda
DEV = "cuda"

# dtype, B, Hq, Hkv, Sq, lengths, page size, D, options, layout
GPU_CASES = [
    (BF16, 3, 8, 2, 1, [0, 5000, 777], 16, 128, dict(causal=True), "nhpd"),
    (F16, 4, 4, 4, 3, [1, 64, 65, 300], 64, 64, dict(causal=True), "nhpd"),
    (BF16, 2, 4, 1, 1, [4, 1000], 1, 64, dict(), "nhpd"),
    (F16, 3, 8, 2, 2, [3, 99, 1200], 5, 128, dict(causal=True, window=(100, 0)), "nphd"),
    (F32, 2, 4, 2, 1, [700, 33], 256, 64, dict(softcap=20.0), "nhpd"),
    (F32, 2, 2, 1, 3, [10, 400], 5, 40, dict(causal=True), "nphd"),
    (BF16, 2, 8, 2, 40, [40, 900], 16, 128, dict(causal=True), "nhpd"),  # chunked prefill
    (F16, 2, 4, 2, 1, [300, 520], 16, 36, dict(), "nhpd"),                # element loads
]


def _gpu_inputs(case, gen):
    dtype, B, Hq, Hkv, Sq, lengths, P, D, opts, layout = case
    need = [-(-L // P) for L in lengths]
    max_pages = max(need) + 1
    n_pages = sum(need) + 3
    S = max_pages * P
    kc, vc = (torch.randn(B, Hkv, S, D, generator=gen, device=DEV).to(dtype) for _ in range(2))
    order = torch.randperm(n_pages, generator=gen, device=DEV).tolist()
    table = torch.full((B, max_pages), -1, dtype=torch.int32)
    shape = (n_pages, P, Hkv, D) if layout == "nphd" else (n_pages, Hkv, P, D)
    pools = [torch.full(shape, float("nan"), dtype=dtype, device=DEV) for _ in range(2)]
    pools = [t.transpose(1, 2) if layout == "nphd" else t for t in pools]
    used = 0
    for b, L in enumerate(lengths):
        for j in range(need[b]):
            page = order[used]
            used += 1
            table[b, j] = page
            n = min(P, L - j * P)
            for pool, src in zip(pools, (kc, vc)):
                pool[page, :, :n] = src[b, :, j * P:j * P + n]
    table[0, -1] = 1 << 30  # past what sequence 0 needs: never read
    # The contiguous cache holds NaN past each length too: neither kernel may read it.
    for b, L in enumerate(lengths):
        kc[b, :, L:], vc[b, :, L:] = float("nan"), float("nan")
    q = torch.randn(B, Hq, Sq, D, generator=gen, device=DEV).to(dtype)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    return q, kc, vc, pools[0], pools[1], table.to(DEV), lens, opts


@gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{str(c[0])[6:]}-P{c[6]}-q{c[4]}-"
                         f"d{c[7]}-{c[9]}")
def test_paged_equals_the_contiguous_kernel_and_the_reference(case):
    gen = torch.Generator(device=DEV).manual_seed(sum(case[5]) + case[6])
    q, kc, vc, kp, vp, table, lens, opts = _gpu_inputs(case, gen)
    problem = paged_problem(q, kp, table, return_lse=True, **opts)
    dense = AttentionProblem.from_tensors(q, kc, vc, seqlens_k=lens, return_lse=True, **opts)
    for splits in (None, 3):
        out, lse = _decode.decode_forward(problem, q, kp, vp, lens, splits=splits,
                                          block_table=table)
        if q.shape[2] <= _decode.MAX_DECODE_QUERIES:  # the contiguous kernel's query limit
            want = _decode.decode_forward(dense, q, kc, vc, lens, splits=splits)
            # Same splits, tiles and order: only where the rows are loaded from differs.
            assert torch.equal(out, want[0]) and torch.equal(lse, want[1]), f"splits {splits}"
    keep = torch.arange(kc.shape[2], device=DEV) < lens[:, None]
    kz, vz = (torch.where(keep[:, None, :, None], t, 0) for t in (kc, vc))
    r64 = reference.safe(q.double(), kz.double(), vz.double(), seqlens_k=lens, **opts)
    rlp = reference.safe(q, kz, vz, seqlens_k=lens, **opts)
    for name, got, a, b in (("out", out, r64[0], rlp[0]), ("lse", lse, r64[1], rlp[1].float())):
        ok, msg = check(name, got, a, b, q.dtype, 2.0)
        assert ok, msg
    assert not torch.isnan(out).any()


@gpu
def test_backend_forward_paged_through_the_public_call():
    gen = torch.Generator(device=DEV).manual_seed(5)
    case = (BF16, 2, 8, 2, 1, [17, 2000], 16, 128, dict(causal=True), "nhpd")
    q, kc, vc, kp, vp, table, lens, opts = _gpu_inputs(case, gen)
    out = attnkit.attention_with_kvcache(q, kp, vp, lens, block_table=table, backend="cupy")
    dense = AttentionProblem.from_tensors(q, kc, vc, seqlens_k=lens, causal=True)
    want, _ = _decode.decode_forward(dense, q, kc, vc, lens)
    assert torch.equal(out, want)
    assert _launch.limit_reasons(paged_problem(q, kp, table)) == []
