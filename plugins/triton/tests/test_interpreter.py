"""The Triton backend on CPU through the Triton interpreter, against the float64 reference.

Shapes are tiny (the interpreter steps numpy per program) but chosen to cross block edges:
the interpreter tiles are 32x16 (forward) and 16x32 / 32x16 (backward), so 37 or 45 rows
leave partial blocks and causal/window bands cut blocks in every position.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

import attnkit  # noqa: E402
from attnkit.testing.accuracy import GRAD_FACTOR, OUT_FACTOR, assert_close  # noqa: E402
from attnkit.testing.cases import Case  # noqa: E402

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

CASES = [
    Case(batch=1, heads_q=2, heads_kv=2, seqlen_q=37, seqlen_k=45, head_dim=32, dtype=F16),
    Case(batch=1, heads_q=2, heads_kv=2, seqlen_q=37, seqlen_k=45, head_dim=32, dtype=F32),
    Case(batch=1, heads_q=1, heads_kv=1, seqlen_q=33, seqlen_k=29, head_dim=16, dtype=BF16),
    Case(batch=1, heads_q=2, heads_kv=2, seqlen_q=45, seqlen_k=45, head_dim=32, dtype=F16,
         causal=True),
    Case(batch=1, heads_q=2, heads_kv=2, seqlen_q=20, seqlen_k=70, head_dim=16, dtype=F32,
         causal=True),
    # Sq > Sk with bottom-right causal: the first rows see nothing.
    Case(batch=1, heads_q=1, heads_kv=1, seqlen_q=50, seqlen_k=17, head_dim=16, dtype=F16,
         causal=True, expect_masked_rows=True),
    # Odd head dims: padded inside the kernel with masks.
    Case(batch=1, heads_q=1, heads_kv=1, seqlen_q=37, seqlen_k=40, head_dim=40, dtype=F16),
    Case(batch=1, heads_q=1, heads_kv=1, seqlen_q=30, seqlen_k=37, head_dim=72, dtype=F32,
         causal=True),
    Case(batch=1, heads_q=1, heads_kv=1, seqlen_q=9, seqlen_k=21, head_dim=3, dtype=F32),
    # Sliding windows, alone and with causal, including far-off windows.
    Case(batch=1, heads_q=1, heads_kv=1, seqlen_q=60, seqlen_k=60, head_dim=16, dtype=F16,
         window=(8, 0)),
    Case(batch=1, heads_q=1, heads_kv=1, seqlen_q=60, seqlen_k=70, head_dim=16, dtype=F32,
         window=(16, 5)),
    Case(batch=1, heads_q=1, heads_kv=1, seqlen_q=40, seqlen_k=60, head_dim=16, dtype=F16,
         window=(-1, 4)),
    Case(batch=1, heads_q=1, heads_kv=1, seqlen_q=40, seqlen_k=60, head_dim=16, dtype=F32,
         window=(3, -1)),
    Case(batch=1, heads_q=1, heads_kv=1, seqlen_q=45, seqlen_k=50, head_dim=16, dtype=F16,
         window=(4, 4), causal=True),
    Case(batch=1, heads_q=1, heads_kv=1, seqlen_q=60, seqlen_k=20, head_dim=16, dtype=F32,
         window=(2, 0), expect_masked_rows=True),
    # seqlens_k: random, zero, mixed (0, Sk, Sk/2, 1), with causal.
    Case(batch=3, heads_q=1, heads_kv=1, seqlen_q=33, seqlen_k=40, head_dim=16, dtype=F16,
         seqlens_k="random"),
    Case(batch=2, heads_q=1, heads_kv=1, seqlen_q=20, seqlen_k=40, head_dim=16, dtype=F32,
         seqlens_k="zero", expect_masked_rows=True),
    Case(batch=4, heads_q=1, heads_kv=1, seqlen_q=33, seqlen_k=40, head_dim=16, dtype=F32,
         seqlens_k="mixed", causal=True, expect_masked_rows=True),
    # Softcap, with large scores so tanh saturates.
    Case(batch=1, heads_q=2, heads_kv=2, seqlen_q=37, seqlen_k=40, head_dim=16, dtype=F32,
         softcap=5.0, magnitude=3.0),
    Case(batch=1, heads_q=1, heads_kv=1, seqlen_q=37, seqlen_k=40, head_dim=32, dtype=F16,
         softcap=30.0, causal=True),
    # GQA and MQA: kv heads indexed, dK/dV summed over each group.
    Case(batch=1, heads_q=6, heads_kv=2, seqlen_q=37, seqlen_k=33, head_dim=16, dtype=F16),
    Case(batch=2, heads_q=4, heads_kv=1, seqlen_q=37, seqlen_k=45, head_dim=16, dtype=F32,
         causal=True),
    # (B, S, H, D) tensors passed transposed: read in place through their strides.
    Case(batch=2, heads_q=2, heads_kv=2, seqlen_q=37, seqlen_k=40, head_dim=32, dtype=F16,
         layout="bshd"),
    Case(batch=1, heads_q=4, heads_kv=2, seqlen_q=33, seqlen_k=33, head_dim=16, dtype=F32,
         layout="bshd", causal=True),
    # Scores up to ~50: overflows fp16 without max-subtraction.
    Case(batch=1, heads_q=1, heads_kv=1, seqlen_q=37, seqlen_k=40, head_dim=32, dtype=F16,
         magnitude=8.0, tag="overflow"),
    Case(batch=1, heads_q=1, heads_kv=1, seqlen_q=1, seqlen_k=1, head_dim=16, dtype=F32),
    Case(batch=1, heads_q=1, heads_kv=1, seqlen_q=1, seqlen_k=50, head_dim=16, dtype=F16,
         causal=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_forward_backward_match_reference(case):
    _check_against_reference(case)


def _check_against_reference(case):
    gen = torch.Generator().manual_seed(hash(case.id) % 2**31)
    q, k, v, seqlens_k = case.make_inputs("cpu", gen)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))

    out, lse = attnkit.attention(q, k, v, **case.options(seqlens_k), return_lse=True,
                                 backend="triton")
    dout = torch.randn(out.shape, generator=gen).to(q.dtype)
    ref64 = case.reference(q, k, v, seqlens_k, torch.float64, dout)
    ref_lp = case.reference(q, k, v, seqlens_k, case.dtype, dout)

    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert_close(f"{case.id} out", out, ref64[0], ref_lp[0], case.dtype, factor=OUT_FACTOR)
    assert_close(f"{case.id} lse", lse, ref64[1], ref_lp[1], case.dtype, factor=OUT_FACTOR)

    grads = torch.autograd.grad(out, (q, k, v), dout)
    for name, g, t, g64, glp in zip("qkv", grads, (q, k, v), ref64[2], ref_lp[2]):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close(f"{case.id} d{name}", g, g64, glp, case.dtype, factor=GRAD_FACTOR)

    masked = case.masked_rows(seqlens_k).expand(out.shape[:3])
    if case.expect_masked_rows:
        assert masked.any()
    if masked.any():
        assert (out[masked] == 0).all()
        assert (lse[masked] == float("-inf")).all()
        assert (grads[0][masked] == 0).all()


def _check_with_tiles(monkeypatch, tiles, case):
    """``case`` against the reference with `table_configs` answering ``tiles``; returns the
    lookups made (the interpreter otherwise runs its one tile, so others are forced)."""
    from attnkit_triton import _configs, backend

    def forget():  # the config lookups and the backend's routes are cached per problem
        _configs._forward_config.cache_clear()
        _configs._backward_configs.cache_clear()
        backend._routes.clear()

    asked = []
    forget()
    monkeypatch.setattr(_configs, "table_configs", lambda *args: asked.append(args) or tiles)
    try:
        _check_against_reference(case)
    finally:
        forget()
    return asked


def test_fp32_tiles_for_small_shared_memory(monkeypatch):
    """fp32 at head dims 129..256 off Hopper takes its own tiles per kernel (16 and 32 rows,
    sized for sm_86's 99 KB; tools/compile_tables.py)."""
    from attnkit_triton import _configs

    tiles = _configs.table_configs(86, 256, True, F32)
    assert tiles == _configs._FP32_SMALL_256
    assert tiles != _configs.table_configs(90, 256, True, F32)
    asked = _check_with_tiles(monkeypatch, tiles, Case(
        batch=1, heads_q=2, heads_kv=1, seqlen_q=37, seqlen_k=45, head_dim=136, dtype=F32,
        causal=True))
    assert len(asked) == 2  # the forward's lookup and the backward's


@pytest.mark.parametrize("causal", [False, True])
def test_hopper_head_dim_256_tiles(monkeypatch, causal):
    """sm_90's fp16/bf16 tiles at head dims 129..256 (dK/dV 32x64, dQ 128x32), through
    pointers: sequences that leave partial blocks of each, GQA, a padded head dim."""
    from dataclasses import replace

    from attnkit_triton import _configs

    tiles = tuple(replace(c, tma=False) for c in _configs.table_configs(90, 256, causal, F16))
    _check_with_tiles(monkeypatch, tiles, Case(
        batch=1, heads_q=4, heads_kv=2, seqlen_q=150, seqlen_k=200, head_dim=192,
        dtype=BF16 if causal else F16, causal=causal))


def test_refuses_gpus_older_than_sm80(monkeypatch):
    """Capabilities.cuda_capability_min, which the base class checks."""
    from attnkit.spec import AttentionProblem

    backend = attnkit.backends()["triton"].backend
    problem = AttentionProblem(1, 2, 2, 64, 64, 64, F16, torch.device("cuda", 1))
    monkeypatch.setattr(attnkit.backend, "cuda_capability", lambda device: (7, 5))
    why = ("cuda:1 has compute capability 7.5; the triton backend needs 8.0 or newer")
    assert why in backend.not_supported_reasons(problem)
    monkeypatch.setattr(attnkit.backend, "cuda_capability", lambda device: (8, 6))
    assert not any("compute capability" in r for r in backend.not_supported_reasons(problem))


def test_strided_inputs_are_not_copied():
    """BSHD views go to the kernels as they are: out keeps q's layout, nothing contiguous."""
    case = Case(batch=1, heads_q=2, heads_kv=2, seqlen_q=20, seqlen_k=20, head_dim=16,
                dtype=F32, layout="bshd", grad=False)
    q, k, v, _ = case.make_inputs("cpu", torch.Generator().manual_seed(0))
    assert not q.is_contiguous()
    out = attnkit.attention(q, k, v, backend="triton")
    assert out.stride() == q.stride()


@pytest.mark.parametrize("D", [16, 40])
def test_prep_zeroes_the_gluon_dq_it_is_given(D):
    """The prep kernel also zeroes the float32 dQ the Gluon backward sums into (whole rows
    of every head, q's layout kept; a padded head dim's columns too), and computes the same
    delta and lse2 with or without it."""
    from attnkit_triton._backward import launch_prep, prepare

    g = torch.Generator().manual_seed(2)
    B, H, S = 2, 3, 70
    q, out, dout = (torch.randn(B, S, H, D, generator=g).transpose(1, 2) for _ in range(3))
    lse = torch.randn(B, H, S, generator=g)
    dq = torch.full_like(q, float("nan"))
    without = prepare(q, out, lse, dout, 64)
    with_dq = torch.full_like(without, float("nan"))
    launch_prep(q, out, lse, dout, with_dq, dq)
    assert dq.stride() == q.stride() and torch.equal(dq, torch.zeros_like(dq))
    assert torch.equal(with_dq, without)
    delta, lse2 = with_dq.unbind(0)
    assert torch.allclose(delta[:, :S].reshape(B, H, S), (out * dout).sum(-1), atol=1e-5)
    assert torch.equal(lse2[:, :S].reshape(B, H, S), lse * 1.4426950408889634)
    assert (delta[:, S:] == 0).all() and (lse2[:, S:] == float("inf")).all()


def test_cast_dense_keeps_the_layout():
    from attnkit_triton._backward import cast_dense

    x = torch.randn(2, 70, 3, 40).transpose(1, 2)  # (B, H, S, D) view of (B, S, H, D)
    y = torch.empty_like(x, dtype=torch.float16)  # (the interpreter rounds to bfloat16 its
    cast_dense(x, y)                               # own way)
    assert y.stride() == x.stride() and torch.equal(y, x.to(torch.float16))


def test_forward_is_repeatable():
    case = Case(batch=2, heads_q=2, heads_kv=1, seqlen_q=37, seqlen_k=45, head_dim=16,
                dtype=F16, causal=True)
    q, k, v, _ = case.make_inputs("cpu", torch.Generator().manual_seed(1))
    a = attnkit.attention(q, k, v, causal=True, backend="triton", return_lse=True)
    b = attnkit.attention(q, k, v, causal=True, backend="triton", return_lse=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("switch", ["ATTNKIT_TRITON_GLUON", "ATTNKIT_TRITON_GLUON_BWD",
                                    "ATTNKIT_TRITON_TMA"])
def test_path_switches_are_read_on_every_call(monkeypatch, switch):
    """The backend remembers each signature's path, keyed by the switches' values too: a
    switch forced on (which cannot apply under the interpreter) is an error at once, even
    right after the same call ran, and nothing after it is stale."""
    q, k, v = (torch.randn(1, 1, 16, 16, requires_grad=True) for _ in range(3))

    def step():
        torch.autograd.grad(attnkit.attention(q, k, v, causal=True, backend="triton").sum(),
                            (q, k, v))

    step()
    monkeypatch.setenv(switch, "1")
    with pytest.raises(ValueError, match=f"{switch}=1 but .* not on a CUDA device"):
        step()
    monkeypatch.setenv(switch, "0")
    step()


def test_refuses_float64_and_large_head_dims():
    q = torch.randn(1, 1, 4, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="triton"):
        attnkit.attention(q, q, q, backend="triton")
    q = torch.randn(1, 1, 4, 264)
    with pytest.raises(ValueError, match="head dim"):
        attnkit.attention(q, q, q, backend="triton")


def test_takes_problems_over_2_31_elements_with_backward():
    """64-bit offsets everywhere: a 2^31-element problem is taken, backward included
    (on a GPU the suite's `attnkit.testing.cuda_checks` run problems past 2^31 elements)."""
    from attnkit.spec import AttentionProblem

    backend = attnkit.backends()["triton"].backend
    big = AttentionProblem(4, 16, 16, 1 << 19, 1 << 19, 64, torch.float16, torch.device("cpu"),
                           causal=True, window=(64, 0), needs_grad=True)
    assert big.batch * big.heads_q * big.seqlen_q * big.head_dim == 1 << 31
    assert backend.not_supported_reasons(big) == []


def test_availability_under_interpreter():
    ok, why = attnkit.backends()["triton"].backend.availability()
    assert ok, why


# -- keys no query sees, NaN query rows, the gradient reaching lse -------------------------

POISONS = (float("nan"), float("inf"), float("-inf"))
GRAD_NAMES = ("out", "lse", "dq", "dk", "dv")

UNSEEN_CASES = [
    # Past seqlens_k[b] (0, Sk, Sk / 2, 1): the last key block cut at every length.
    Case(batch=4, heads_q=2, heads_kv=1, seqlen_q=20, seqlen_k=45, head_dim=16, dtype=F16,
         seqlens_k="mixed", causal=True, expect_masked_rows=True),
    # Left of the first query's window: keys below Sk - Sq - 2, the cut inside a key block.
    Case(batch=1, heads_q=1, heads_kv=1, seqlen_q=9, seqlen_k=45, head_dim=16, dtype=F32,
         window=(2, 0)),
    # Both, with a right bound, random lengths and (B, S, H, D) tensors.
    Case(batch=3, heads_q=2, heads_kv=2, seqlen_q=13, seqlen_k=50, head_dim=32, dtype=F16,
         window=(5, 3), seqlens_k="random", layout="bshd"),
    # One query per head and a head dim below the tile's.
    Case(batch=2, heads_q=1, heads_kv=1, seqlen_q=1, seqlen_k=16, head_dim=8, dtype=F32,
         seqlens_k="mixed", expect_masked_rows=True),
]


def _unseen_keys(case, seqlens_k) -> torch.Tensor:
    """Boolean (B or 1, Sk): keys no query of the batch sees."""
    from attnkit.reference import visible_mask

    seen = visible_mask(case.seqlen_q, case.seqlen_k, causal=case.causal, window=case.window,
                        seqlens_k=seqlens_k)
    return ~seen.any(-2)[:, 0]


def _everything(case, q, k, v, seqlens_k, dout) -> dict:
    """out, lse, dq, dk, dv of one triton call, detached."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out, lse = attnkit.attention(q, k, v, **case.options(seqlens_k), return_lse=True,
                                 backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return dict(zip(GRAD_NAMES, (out.detach(), lse.detach(), *grads)))


@pytest.mark.parametrize("case", UNSEEN_CASES, ids=[c.id for c in UNSEEN_CASES])
def test_keys_no_query_sees_are_never_read(case):
    """K/V rows at or past seqlens_k[b] or outside every query's band, holding NaN or
    +-inf: out, lse and every gradient are the clean run's bit for bit, and dK/dV of those
    keys are 0 (boundary blocks select the rows to 0; nothing multiplies them by 0)."""
    gen = torch.Generator().manual_seed(11)
    q, k, v, seqlens_k = case.make_inputs("cpu", gen)
    unseen = _unseen_keys(case, seqlens_k)
    assert unseen.any()
    where = unseen[:, None, :, None]  # (B or 1, 1, Sk, 1)
    dout = torch.randn(q.shape, generator=gen).to(q.dtype)
    clean = _everything(case, q, k, v, seqlens_k, dout)
    for name in ("dk", "dv"):
        g = clean[name]
        assert (g.masked_select(where.expand_as(g)) == 0).all(), name
    for value in POISONS:
        kp, vp = (t.clone().masked_fill_(where, value) for t in (k, v))
        got = _everything(case, q, kp, vp, seqlens_k, dout)
        bad = [n for n in GRAD_NAMES if not torch.equal(got[n], clean[n])]
        assert not bad, f"{case.id}: unseen keys set to {value} changed {bad}"


def test_kvcache_positions_past_the_cache_are_never_read():
    """A cache whose unused positions hold NaN: the appended step's out is the one over a
    cache of zeros there (nothing NaN)."""
    g = torch.Generator().manual_seed(3)
    q, k_new, v_new = (torch.randn(2, 1, 1, 8, generator=g) for _ in range(3))
    levels = torch.tensor([3, 7], dtype=torch.int32)
    outs = []
    for fill in (0.0, float("nan")):
        kc, vc = (torch.full((2, 1, 16, 8), fill) for _ in range(2))
        for b, n in enumerate(levels.tolist()):
            kc[b, :, :n] = torch.randn(1, n, 8, generator=torch.Generator().manual_seed(b))
            vc[b, :, :n] = torch.randn(1, n, 8, generator=torch.Generator().manual_seed(9 + b))
        outs.append(attnkit.attention_with_kvcache(q, kc, vc, levels, k_new, v_new,
                                                   backend="triton"))
    assert not outs[1].isnan().any()
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("window", [None, (3, 0)])
def test_split_kv_decode_never_reads_unseen_keys(window):
    """The split-KV kernel, three splits (so some see no key of a short batch, and the merge
    weighs empty partials): NaN/inf past seqlens_k or left of every window change nothing."""
    from attnkit_triton.decode import decode_forward

    from attnkit.spec import AttentionProblem

    g = torch.Generator().manual_seed(4)
    q = torch.randn(3, 4, 2, 16, generator=g)
    k, v = (torch.randn(3, 2, 40, 16, generator=g) for _ in range(2))
    seqlens_k = torch.tensor([0, 9, 40], dtype=torch.int32)
    case = Case(batch=3, heads_q=4, heads_kv=2, seqlen_q=2, seqlen_k=40, head_dim=16,
                dtype=F32, window=window, causal=window is not None)
    problem = AttentionProblem.from_tensors(q, k, v, causal=case.causal, window=window,
                                            seqlens_k=seqlens_k)
    where = _unseen_keys(case, seqlens_k)[:, None, :, None]
    clean = decode_forward(problem, q, k, v, seqlens_k, splits=3)
    for value in POISONS:
        kp, vp = (t.clone().masked_fill_(where, value) for t in (k, v))
        got = decode_forward(problem, q, kp, vp, seqlens_k, splits=3)
        assert torch.equal(got[0], clean[0]) and torch.equal(got[1], clean[1]), value
    assert (clean[0][0] == 0).all() and (clean[1][0] == float("-inf")).all()


NAN_ROW_CASES = [
    Case(batch=1, heads_q=2, heads_kv=2, seqlen_q=37, seqlen_k=45, head_dim=16, dtype=F16),
    Case(batch=2, heads_q=4, heads_kv=2, seqlen_q=37, seqlen_k=45, head_dim=16, dtype=F32,
         causal=True, window=(6, -1), seqlens_k="random"),
    Case(batch=1, heads_q=2, heads_kv=1, seqlen_q=33, seqlen_k=40, head_dim=16, dtype=F32,
         softcap=5.0),
]


def _nan_row_check(out, lse, clean_out, clean_lse, row):
    assert out[row].isnan().all(), out[row]
    assert lse[row].isnan(), lse[row]  # not -inf: the row saw keys, NaN ones
    others = torch.ones(out.shape[:3], dtype=torch.bool)
    others[row] = False
    assert torch.equal(out[others], clean_out[others])
    assert torch.equal(lse[others], clean_lse[others])


@pytest.mark.parametrize("case", NAN_ROW_CASES, ids=[c.id for c in NAN_ROW_CASES])
def test_nan_query_row_gives_nan_out_and_lse(case):
    q, k, v, seqlens_k = case.make_inputs("cpu", torch.Generator().manual_seed(6))
    if seqlens_k is not None:
        seqlens_k[-1] = case.seqlen_k  # the poisoned row below sees keys
    row = (case.batch - 1, case.heads_q - 1, case.seqlen_q // 2)
    opts = dict(**case.options(seqlens_k), return_lse=True, backend="triton")
    clean = attnkit.attention(q, k, v, **opts)
    qn = q.clone()
    qn[row + (0,)] = float("nan")
    _nan_row_check(*attnkit.attention(qn, k, v, **opts), *clean, row)


def test_split_kv_decode_nan_query_row():
    """NaN in one query row through the split kernel and its merge (each split's partial
    and the merged lse NaN, not -inf); rows sharing its program are untouched."""
    from attnkit_triton.decode import decode_forward

    from attnkit.spec import AttentionProblem

    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 4, 2, 16, generator=g)
    k, v = (torch.randn(2, 2, 40, 16, generator=g) for _ in range(2))
    problem = AttentionProblem.from_tensors(q, k, v)
    clean = decode_forward(problem, q, k, v, None, splits=3)
    qn = q.clone()
    qn[1, 2, 1, 5] = float("nan")
    _nan_row_check(*decode_forward(problem, qn, k, v, None, splits=3), *clean, (1, 2, 1))


DLSE_CASES = [
    Case(batch=2, heads_q=4, heads_kv=2, seqlen_q=37, seqlen_k=45, head_dim=16, dtype=F32,
         causal=True),
    # Causal with lengths 0 and 1: rows that see no key share query blocks with rows that do.
    Case(batch=4, heads_q=1, heads_kv=1, seqlen_q=33, seqlen_k=40, head_dim=16, dtype=F16,
         seqlens_k="mixed", causal=True, expect_masked_rows=True),
    Case(batch=1, heads_q=2, heads_kv=2, seqlen_q=30, seqlen_k=37, head_dim=16, dtype=F32,
         window=(8, 3), softcap=5.0, magnitude=2.0),
]


@pytest.mark.parametrize("case", DLSE_CASES, ids=[c.id for c in DLSE_CASES])
def test_loss_on_lse_matches_reference(case):
    """A loss on out and lse: dS = P (dP - (delta - dlse)); dlse holds NaN on rows that see
    no key, whose gradients stay 0."""
    from attnkit import reference

    gen = torch.Generator().manual_seed(12)
    q, k, v, seqlens_k = case.make_inputs("cpu", gen)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out, lse = attnkit.attention(q, k, v, **case.options(seqlens_k), return_lse=True,
                                 backend="triton")
    dout = torch.randn(out.shape, generator=gen).to(q.dtype)
    dlse = torch.randn(lse.shape, generator=gen)
    masked = case.masked_rows(seqlens_k).expand(lse.shape)
    assert masked.any() == case.expect_masked_rows
    poisoned = dlse.masked_fill(masked, float("nan"))
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, poisoned))

    def ref(dtype):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
        o, s = reference.safe(qq, kk, vv, **case.options(seqlens_k))
        return torch.autograd.grad((o, s), (qq, kk, vv),
                                   (dout.to(dtype), dlse.masked_fill(masked, 0).to(s.dtype)))

    for name, g, g64, glp in zip("qkv", grads, ref(torch.float64), ref(case.dtype)):
        assert_close(f"{case.id} d{name}", g, g64, glp, case.dtype, factor=GRAD_FACTOR)
    if masked.any():
        assert (grads[0][masked] == 0).all()


def test_prep_subtracts_dlse_from_delta():
    """delta - dlse on rows that saw keys; rows with lse -inf keep delta, whatever dlse
    holds (P = 0 there); lse2 is unchanged."""
    from attnkit_triton._backward import prepare

    g = torch.Generator().manual_seed(5)
    B, H, S, D = 2, 3, 70, 16
    q, out, dout = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    lse = torch.randn(B, H, S, generator=g)
    lse[0, 1, 3:9] = float("-inf")
    dlse = torch.randn(B, H, S, generator=g)
    dlse[0, 1, 3:9] = float("nan")
    without = prepare(q, out, lse, dout, 64)
    with_dlse = prepare(q, out, lse, dout, 64, dlse=dlse)
    seen = (lse != float("-inf")).reshape(B * H, S)
    delta, want = with_dlse[0, :, :S], without[0, :, :S] - dlse.reshape(B * H, S)
    assert torch.equal(delta[seen], want[seen])
    assert torch.equal(delta[~seen], without[0, :, :S][~seen])
    assert torch.equal(with_dlse[1], without[1]) and (with_dlse[0, :, S:] == 0).all()


def test_dlse_calls_take_the_keyed_prep(monkeypatch):
    """The kept sites are the prep without dlse: a call with dlse launches its prep through
    the key (the kept dK/dV and dQ sites still run directly) and never replaces the kept
    sites. Bookkeeping only: fakes stand in for the launches."""
    from types import SimpleNamespace

    from attnkit_triton import _backward

    log = []

    def site(name):
        return SimpleNamespace(compiled=True, run=lambda stream, *a: log.append((name, a)))

    def keyed(name):
        def launch(*args, **kwargs):
            log.append((name, kwargs.get("dlse")))
            return site(name)
        return launch

    for name in ("prep", "dkdv", "dq"):
        monkeypatch.setattr(_backward, f"launch_{name}", keyed(name))
    monkeypatch.setattr(_backward, "fast_launches", lambda: True)
    monkeypatch.setattr(_backward, "current_stream", lambda index: 7)
    cfg = SimpleNamespace(block_m=64, tma=False)
    q, k, v, dout = (torch.randn(1, 2, 70, 16) for _ in range(4))
    out, lse, dlse = torch.empty_like(q), torch.empty(1, 2, 70), torch.randn(1, 2, 70)
    kept = _backward.BackwardSites()

    def call(d):
        log.clear()
        _backward.launch_backward(None, q, k, v, out, lse, dout, None, cfg, cfg, False,
                                  "layout", kept, d)
        return log[0]

    assert call(dlse) == ("prep", dlse) and kept.sites is None
    assert call(None) == ("prep", None) and kept.sites is not None
    first = kept.sites
    prep = call(dlse)
    assert prep == ("prep", dlse) and [n for n, _ in log[1:]] == ["dkdv", "dq"]
    assert kept.sites is first
    name, args = call(None)
    assert name == "prep" and args[-1] is lse  # the direct prep: lse as the unread dlse


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "descriptors"])
def test_unseen_keys_on_each_load_path(tma):
    """The kernels called directly on each load path (the interpreter runs tensor
    descriptors too, which load unseen rows as memory holds them): poisoned unseen keys
    change nothing, with a softcap (whose tanh of a NaN score must not reach dS) and GQA."""
    from attnkit_triton._backward import launch_backward
    from attnkit_triton._configs import backward_configs, forward_config
    from attnkit_triton._forward import launch_forward

    from attnkit.spec import AttentionProblem

    case = Case(batch=2, heads_q=4, heads_kv=2, seqlen_q=9, seqlen_k=45, head_dim=16,
                dtype=F32, window=(2, 0), softcap=5.0, magnitude=2.0)
    gen = torch.Generator().manual_seed(13)
    q, k, v, _ = case.make_inputs("cpu", gen)
    seqlens_k = torch.tensor([30, 45], dtype=torch.int32)
    problem = AttentionProblem.from_tensors(q, k, v, window=case.window, softcap=case.softcap,
                                            seqlens_k=seqlens_k, needs_grad=True)
    fwd = forward_config(16, False, F32, q.device, True)
    dkdv, dq = backward_configs(16, False, F32, q.device, True)
    dout = torch.randn(q.shape, generator=gen)

    def run(k, v):
        out, lse = launch_forward(problem, q, k, v, seqlens_k, fwd, tma)
        return (out, lse, *launch_backward(problem, q, k, v, out, lse, dout, seqlens_k, dkdv,
                                           dq, tma))

    where = _unseen_keys(case, seqlens_k)[:, None, :, None]
    clean = run(k, v)
    for value in POISONS:
        got = run(*(t.clone().masked_fill_(where, value) for t in (k, v)))
        bad = [n for n, a, b in zip(GRAD_NAMES, got, clean) if not torch.equal(a, b)]
        assert not bad, f"unseen keys set to {value} changed {bad}"
