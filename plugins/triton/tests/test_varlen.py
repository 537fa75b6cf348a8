"""Packed variable-length batches (`forward_varlen`, `backward_varlen`) through the Triton
interpreter, against dense reference calls on each sequence.

Sequence ``b`` is rows ``cu[b]:cu[b + 1]`` of the packed ``(total, H, D)`` tensors and must
come out exactly as a dense call of its lengths would: bottom-right causal per sequence,
window, softcap, GQA; rows that see no key give out 0, lse -inf and zero gradients. Lengths
cross the interpreter's 32-row query and 16-row key tiles and include 0 and 1. Key rows that
no query of their sequence sees hold NaN (K) and inf (V): a kernel that read them into a
result, or that ran into a neighbouring sequence's rows, would show it.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import itertools  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import attnkit  # noqa: E402
from attnkit.spec import UNBOUNDED, AttentionProblem  # noqa: E402
from attnkit.testing.accuracy import GRAD_FACTOR, OUT_FACTOR, assert_close  # noqa: E402

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@dataclass(frozen=True)
class VarlenCase:
    lens_q: tuple[int, ...]
    lens_k: tuple[int, ...]
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: torch.dtype
    causal: bool = False
    window: tuple[int, int] | None = None
    softcap: float | None = None
    #: "packed" (contiguous), "qkv" (slices of one packed projection; equal lengths) or
    #: "strided" (head stride 1, head-dim stride H)
    layout: str = "packed"
    #: Added to the longest lengths: the bounds a caller passes may exceed them.
    slack: int = 0
    expect_poison: bool = False  # some key row is seen by no query
    expect_masked_rows: bool = False  # some query row sees no key

    @property
    def id(self) -> str:
        parts = [f"q{'-'.join(map(str, self.lens_q))}", f"k{'-'.join(map(str, self.lens_k))}",
                 f"h{self.heads_q}x{self.heads_kv}", f"d{self.head_dim}",
                 str(self.dtype).replace("torch.", ""), self.layout]
        if self.causal:
            parts.append("causal")
        if self.window:
            parts.append(f"w{self.window[0]}_{self.window[1]}")
        if self.softcap:
            parts.append(f"cap{self.softcap:g}")
        return "-".join(parts)

    def problem(self) -> AttentionProblem:
        return AttentionProblem(
            len(self.lens_q), self.heads_q, self.heads_kv, max(self.lens_q) + self.slack,
            max(self.lens_k) + self.slack, self.head_dim, self.dtype, torch.device("cpu"),
            causal=self.causal, scale=self.head_dim ** -0.5,
            window=self.window or (UNBOUNDED, UNBOUNDED), softcap=self.softcap,
            return_lse=True, needs_grad=True, varlen=True)

    def options(self) -> dict:
        return dict(causal=self.causal, window=self.window, softcap=self.softcap)


CASES = [
    # A zero-length key sequence between two others, a single token, no mask.
    VarlenCase((5, 3, 37, 1), (20, 0, 45, 1), 2, 2, 32, F16, expect_masked_rows=True),
    # Causal per sequence with Sq > Sk (the first rows see nothing), zero-length queries
    # whose keys nobody sees, GQA, bounds above the longest lengths.
    VarlenCase((0, 33, 40, 18, 0), (17, 17, 9, 40, 6), 4, 2, 16, F32, causal=True, slack=5,
               expect_poison=True, expect_masked_rows=True),
    # A window that leaves the first keys unseen, with softcap and an odd head dim.
    VarlenCase((1, 30, 12), (40, 50, 3), 2, 1, 24, BF16, window=(4, 2), softcap=5.0,
               layout="strided", expect_poison=True, expect_masked_rows=True),
    # Self-attention read in place from one packed qkv projection, causal, MQA.
    VarlenCase((1, 40, 0, 23), (1, 40, 0, 23), 4, 1, 16, F16, causal=True, layout="qkv"),
]


def _band(case: VarlenCase, sq: int, sk: int) -> torch.Tensor:
    """(sq, sk) visibility of one sequence (attnkit.spec's band, bottom-right aligned)."""
    left, right = case.problem().band
    rel = torch.arange(sk)[None, :] - (torch.arange(sq)[:, None] + sk - sq)
    seen = torch.ones(sq, sk, dtype=torch.bool)
    if left is not None:
        seen &= rel >= -left
    if right is not None:
        seen &= rel <= right
    return seen


def _offsets(lens) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


def _inputs(case: VarlenCase, gen):
    """Clean q, k, v (total, H, D) in the case's layout, plus the unseen key rows and the
    query rows that see nothing."""
    tq, tk = sum(case.lens_q), sum(case.lens_k)
    Hq, Hkv, D = case.heads_q, case.heads_kv, case.head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(case.dtype)

    if case.layout == "qkv":
        assert case.lens_q == case.lens_k
        buf = randn(tq, Hq + 2 * Hkv, D)
        q, k, v = buf[:, :Hq], buf[:, Hq:Hq + Hkv], buf[:, Hq + Hkv:]
    elif case.layout == "strided":
        q = randn(tq, D, Hq).transpose(1, 2)
        k, v = (randn(tk, D, Hkv).transpose(1, 2) for _ in range(2))
    else:
        q, k, v = randn(tq, Hq, D), randn(tk, Hkv, D), randn(tk, Hkv, D)
    unseen_k = torch.zeros(tk, dtype=torch.bool)
    masked_q = torch.zeros(tq, dtype=torch.bool)
    cq, ck = _offsets(case.lens_q), _offsets(case.lens_k)
    for b, (sq, sk) in enumerate(zip(case.lens_q, case.lens_k)):
        seen = _band(case, sq, sk)
        unseen_k[ck[b]:ck[b + 1]] = ~seen.any(0)
        masked_q[cq[b]:cq[b + 1]] = ~seen.any(1)
    return q, k, v, unseen_k, masked_q


def _reference(case: VarlenCase, q, k, v, dout, dlse, dtype):
    """Packed (out, lse, dq, dk, dv) from one dense reference call per sequence, inputs
    cast to ``dtype``."""
    cq, ck = _offsets(case.lens_q), _offsets(case.lens_k)
    out = torch.zeros(q.shape, dtype=dtype)
    lse = torch.full((case.heads_q, q.shape[0]), float("-inf"), dtype=dtype)
    grads = [torch.zeros(t.shape, dtype=dtype) for t in (q, k, v)]
    for b in range(len(case.lens_q)):
        rq, rk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if case.lens_q[b] == 0 or case.lens_k[b] == 0:  # nothing seen: 0, -inf, 0
            continue

        def dense(t, rows):  # (S, H, D) rows -> (1, H, S, D)
            return t[rows].detach().to(dtype).transpose(0, 1).unsqueeze(0).requires_grad_()

        qb, kb, vb = dense(q, rq), dense(k, rk), dense(v, rk)
        ob, lb = attnkit.attention(qb, kb, vb, **case.options(), return_lse=True,
                                   backend="reference")
        gb = torch.autograd.grad((ob, lb), (qb, kb, vb),
                                 (dense(dout, rq), dlse[:, rq].to(dtype).unsqueeze(0)))
        out[rq] = ob.detach()[0].transpose(0, 1)
        lse[:, rq] = lb.detach()[0]
        for g, gd, rows in zip(grads, gb, (rq, rk, rk)):
            g[rows] = gd[0].transpose(0, 1)
    return out, lse, *grads


def _through_backend(problem, q, k, v, cq, ck, dout, dlse):
    backend = attnkit.backends()["triton"].backend
    assert not backend.not_supported_reasons(problem)
    out, lse = backend.forward_varlen(problem, q, k, v, cq, ck)
    return out, lse, *backend.backward_varlen(problem, q, k, v, out, lse, dout, cq, ck, dlse)


def _through_descriptors(problem, q, k, v, cq, ck, dout, dlse):
    """The launches with tensor descriptors forced (the backend takes them on sm_90+ only;
    the interpreter runs them too)."""
    from attnkit_triton._backward import launch_backward_varlen
    from attnkit_triton._configs import backward_configs, forward_config
    from attnkit_triton._forward import launch_forward_varlen

    args = (problem.head_dim, problem.causal, problem.dtype, q.device)
    fwd, (dkdv, dq) = forward_config(*args), backward_configs(*args)
    assert fwd.tma and dkdv.tma and dq.tma
    out, lse = launch_forward_varlen(problem, q, k, v, cq, ck, fwd, True)
    return out, lse, *launch_backward_varlen(problem, q, k, v, out, lse, dout, cq, ck, dkdv,
                                             dq, True, dlse)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_varlen_matches_dense_reference_per_sequence(case):
    _check(case, _through_backend)


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=[CASES[1].id, CASES[3].id])
def test_varlen_through_tensor_descriptors(case):
    """Descriptors built per sequence end at its last row: the next sequence's rows load as
    0 (out of bounds), stores stop there, and unseen keys inside a sequence (loaded as memory
    holds them) are selected away as in the dense kernels."""
    _check(case, _through_descriptors)


def _check(case, run):
    problem = case.problem()
    gen = torch.Generator().manual_seed(sum(map(ord, case.id)))
    q, k, v, unseen_k, masked_q = _inputs(case, gen)
    assert unseen_k.any() == case.expect_poison
    assert masked_q.any() == case.expect_masked_rows
    dout = torch.randn(q.shape, generator=gen).to(case.dtype)
    dlse = torch.randn(case.heads_q, q.shape[0], generator=gen)  # masked rows' too: ignored
    ref64 = _reference(case, q, k, v, dout, dlse, torch.float64)
    ref_lp = _reference(case, q, k, v, dout, dlse, case.dtype)

    # Poison what no query may see: NaN in K, inf in V (written through the views, so a
    # qkv projection's other slices keep their values).
    k[unseen_k] = float("nan")
    v[unseen_k] = float("inf")
    cq, ck = _offsets(case.lens_q), _offsets(case.lens_k)
    out, lse, dq, dk, dv = run(problem, q, k, v, cq, ck, dout, dlse)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (case.heads_q, q.shape[0])
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), (q, k, v)):
        assert got.dtype == want.dtype and got.shape == want.shape, name

    assert_close(f"{case.id} out", out, ref64[0], ref_lp[0], case.dtype, factor=OUT_FACTOR)
    assert_close(f"{case.id} lse", lse, ref64[1], ref_lp[1], case.dtype, factor=OUT_FACTOR)
    for name, got, g64, glp in zip(("dq", "dk", "dv"), (dq, dk, dv), ref64[2:], ref_lp[2:]):
        assert_close(f"{case.id} {name}", got, g64, glp, case.dtype, factor=GRAD_FACTOR)
    assert (out[masked_q] == 0).all() and (lse[:, masked_q] == float("-inf")).all()
    assert (dq[masked_q] == 0).all()
    assert (dk[unseen_k] == 0).all() and (dv[unseen_k] == 0).all()


def _tiny(lens_q, lens_k):
    case = VarlenCase(tuple(lens_q), tuple(lens_k), 2, 1, 16, F32, causal=True)
    gen = torch.Generator().manual_seed(0)
    return case, *_inputs(case, gen)[:3]


@pytest.mark.parametrize("lens_q, lens_k", [((0, 0), (3, 4)), ((3, 4), (0, 0))],
                         ids=["no-queries", "no-keys"])
def test_empty_totals(lens_q, lens_k):
    """No queries at all (the bounds still say keys exist), or no keys: nothing launches on
    empty tensors; rows that see nothing give 0 / -inf / zero gradients."""
    backend = attnkit.backends()["triton"].backend
    case, q, k, v = _tiny(lens_q, lens_k)
    problem = case.problem()._replace(seqlen_q=4, seqlen_k=4)
    cq, ck = _offsets(lens_q), _offsets(lens_k)
    out, lse = backend.forward_varlen(problem, q, k, v, cq, ck)
    assert out.shape == q.shape and lse.shape == (2, q.shape[0])
    assert (out == 0).all() and (lse == float("-inf")).all()
    grads = backend.backward_varlen(problem, q, k, v, out, lse, torch.ones_like(out), cq, ck)
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and (g == 0).all()


def test_more_sequences_than_a_grid_axis_takes():
    from attnkit_triton._forward import varlen_grid

    assert varlen_grid(3, 8, 65535) == (3, 8, 65535)
    with pytest.raises(ValueError, match="at most 65535 sequences"):
        varlen_grid(3, 8, 65536)


def test_dense_launches_keep_varlen_off():
    """The varlen kernels' branch is a constexpr: a dense call compiles without it."""
    from attnkit_triton._forward import _flags

    dense = AttentionProblem(1, 2, 2, 8, 8, 16, F32, torch.device("cpu"))
    assert _flags(dense, False, F32, False)["VARLEN"] is False
    assert _flags(dense._replace(varlen=True), False, F32, False)["VARLEN"] is True
    assert attnkit.backends()["triton"].backend.capabilities.varlen


def test_equal_lengths_match_the_dense_kernels_bit_for_bit():
    """Equal lengths are a dense batch laid out (B, S, H, D): the dense call on that view
    runs the same tiles through the same kernels (the varlen branch only moves the bases), so
    out, lse and every gradient (with an lse gradient) agree bit for bit."""
    from attnkit.testing.accuracy import bit_difference

    B, S, Hq, Hkv, D = 2, 37, 2, 1, 16
    case = VarlenCase((S,) * B, (S,) * B, Hq, Hkv, D, F16, causal=True)
    gen = torch.Generator().manual_seed(1)
    q, k, v = _inputs(case, gen)[:3]
    dout = torch.randn(q.shape, generator=gen).to(F16)
    dlse = torch.randn(Hq, B * S, generator=gen)
    backend = attnkit.backends()["triton"].backend
    cq = ck = _offsets(case.lens_q)
    out, lse = backend.forward_varlen(case.problem(), q, k, v, cq, ck)
    grads = backend.backward_varlen(case.problem(), q, k, v, out, lse, dout, cq, ck, dlse)

    def dense(t):  # (B * S, H, D) -> (B, H, S, D), in place
        return t.detach().view(B, S, t.shape[1], D).transpose(1, 2).requires_grad_()

    qd, kd, vd = dense(q), dense(k), dense(v)
    out_d, lse_d = attnkit.attention(qd, kd, vd, causal=True, return_lse=True,
                                     backend="triton")
    grads_d = torch.autograd.grad((out_d, lse_d), (qd, kd, vd),
                                  (dense(dout), dlse.view(Hq, B, S).transpose(0, 1)))

    def packed(t):  # (B, H, S, D) -> (B * S, H, D)
        return t.detach().transpose(1, 2).reshape(B * S, t.shape[1], D)

    pairs = [("out", out, packed(out_d)),
             ("lse", lse, lse_d.detach().transpose(0, 1).reshape(Hq, B * S))]
    pairs += [(f"d{n}", g, packed(gd)) for n, g, gd in zip("qkv", grads, grads_d)]
    diffs = [bit_difference(name, got, want) for name, got, want in pairs]
    assert not any(diffs), "\n".join(d for d in diffs if d)
