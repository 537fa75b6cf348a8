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


def test_fp32_tiles_for_small_shared_memory(monkeypatch):
    """fp32 at head dims 129..256 off Hopper takes its own tiles per kernel (16 and 32 rows,
    sized for sm_86's 99 KB; scripts/compile_tables.py). The interpreter otherwise runs its
    one tile, so they are forced here."""
    from attnkit_triton import _configs, backend

    tiles = _configs.table_configs(86, 256, True, F32)
    assert tiles == _configs._FP32_SMALL_256
    assert tiles != _configs.table_configs(90, 256, True, F32)

    def forget():  # the config lookups and the backend's routes are cached per problem
        _configs._forward_config.cache_clear()
        _configs._backward_configs.cache_clear()
        backend._routes.clear()

    asked = []
    forget()
    monkeypatch.setattr(_configs, "table_configs", lambda *args: asked.append(args) or tiles)
    try:
        _check_against_reference(Case(batch=1, heads_q=2, heads_kv=1, seqlen_q=37,
                                      seqlen_k=45, head_dim=136, dtype=F32, causal=True))
    finally:
        forget()
    assert len(asked) == 2  # the forward's lookup and the backward's


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
    (checked on the H100 by scripts/check_cuda.py's large case, both load paths)."""
    from attnkit.spec import AttentionProblem

    backend = attnkit.backends()["triton"].backend
    big = AttentionProblem(4, 16, 16, 1 << 19, 1 << 19, 64, torch.float16, torch.device("cpu"),
                           causal=True, window=(64, 0), needs_grad=True)
    assert big.batch * big.heads_q * big.seqlen_q * big.head_dim == 1 << 31
    assert backend.not_supported_reasons(big) == []


def test_availability_under_interpreter():
    ok, why = attnkit.backends()["triton"].backend.availability()
    assert ok, why
